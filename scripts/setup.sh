#!/usr/bin/env bash
# Install memloc-tl (editable) into the current Python environment.
#   bash scripts/setup.sh         the library, the `memloc` command and what the demo notebooks
#                                 need in Jupyter and headless (the [notebook] extra)
#   bash scripts/setup.sh --dev   plus the test and lint tools, and Chromium (Debian's package)
#                                 for the tests that open the HTML report in a real browser
# What is already installed is kept:
#   - torch: a build you have (a CUDA build, say) stays. Only where none is installed does this
#     pin torch==2.13.0 first: on machines with a local CPU wheel of it that is a fast install,
#     where an unpinned torch would pull a multi-GB CUDA build.
#   - TransformerLens: a 3.9+ or 4.x you have stays. Only where none is installed does this
#     install TransformerLens 3 (transformer-lens>=3.9,<4), whose HookedTransformer memloc-tl
#     is built around; `pip install memloc-tl` alone accepts both (>=3.9,<5), and then pip
#     picks the newest, 4.x.
# Set PYTHON to install into another interpreter than python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "memloc-tl setup: no torch installed; installing torch==2.13.0"
  pip_install "torch==2.13.0"
fi
# The installed TransformerLens version, or nothing (metadata only: importing it takes seconds).
tl_version() {
  "$PYTHON" - <<'PY'
import importlib.metadata as metadata
try:
    print(metadata.version("transformer-lens"))
except metadata.PackageNotFoundError:
    pass
PY
}
if [[ -z "$(tl_version)" ]]; then
  echo "memloc-tl setup: no TransformerLens installed; installing TransformerLens 3 (>=3.9,<4)"
  pip_install "transformer-lens>=3.9,<4"
fi

if [[ "${1:-}" == "--dev" ]]; then
  pip_install -e ".[dev]"
  if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == "0" ]]; then
      echo "memloc-tl setup: installing Chromium (Debian's package) for the browser tests"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "note: no Chromium and no root apt-get here; the browser tests will be skipped" >&2
    fi
  fi
else
  pip_install -e ".[notebook]"
fi

version="$(tl_version)"
case "$version" in
  3.*) backend="HookedTransformer (TransformerLens 3; backend=\"bridge\" gives its TransformerBridge)" ;;
  4.*) backend="TransformerBridge in compatibility mode (TransformerLens 4)" ;;
  *) backend="unknown: memloc-tl needs TransformerLens 3.9+ or 4" ;;
esac
echo "memloc-tl setup: torch $("$PYTHON" -c 'import importlib.metadata as m; print(m.version("torch"))'), TransformerLens $version; load_model() gives a $backend"
