#!/usr/bin/env bash
# Run the suite on TransformerLens 4, in its own environment.
#   bash scripts/test_tl4.sh [pytest args]   (the whole suite; scripts/test.sh, after its run on
#                                             TransformerLens 3, runs it with -m backend)
# The environment (.venv-tl4, or $MEMLOC_TL4_VENV) sees the packages of $PYTHON's environment
# (torch, the test tools; a virtualenv's as well as the system's) and adds TransformerLens 4 on
# top, so only that install is new. With MEMLOC_BACKEND_REFERENCE set to the file a
# TransformerLens 3 run wrote, the bridge's numbers are compared with it (1e-5).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${MEMLOC_TL4_VENV:-.venv-tl4}"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
# The first environment's site directories, after this one's own (so TransformerLens 4 wins).
# site.addsitedir also runs their .pth files, which `--system-site-packages` would not do for a
# virtualenv's packages.
"$PYTHON" - "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" <<'PY'
import sys
import sysconfig
from pathlib import Path

paths = sysconfig.get_paths()
lines = [f"import site; site.addsitedir({p!r})" for p in dict.fromkeys((paths["purelib"], paths["platlib"]))]
Path(sys.argv[1], "memloc-first-environment.pth").write_text("\n".join(lines) + "\n")
PY
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "transformer-lens>=4,<5"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e .
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
import sys

version = m.version("transformer-lens")
assert version.startswith("4."), f"expected TransformerLens 4 in the second environment, got {version}"
print(f"== memloc-tl tests, run 2: TransformerLens {version} ({sys.prefix})")
PY
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
