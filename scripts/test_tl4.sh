#!/usr/bin/env bash
# Run what differs between TransformerLens 3 and 4 on TransformerLens 4, in its own environment.
#   bash scripts/test_tl4.sh             (after the suite ran on TransformerLens 3: scripts/test.sh)
# The environment (.venv-tl4, or $MEMLOC_TL4_VENV) sees this interpreter's packages and adds
# TransformerLens 4 on top, so only that install is new. With MEMLOC_BACKEND_REFERENCE set to
# the file a TransformerLens 3 run wrote, the bridge's numbers are compared with it (1e-5).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${MEMLOC_TL4_VENV:-.venv-tl4}"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet "transformer-lens>=4,<5"
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
version = m.version("transformer-lens")
assert version.startswith("4."), f"expected TransformerLens 4 in the second environment, got {version}"
print(f"TransformerLens {version}")
PY
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_backends.py tests/test_models.py tests/test_export.py tests/test_memorization.py \
  tests/test_perturbation.py
