#!/usr/bin/env bash
# Install memloc-tl (editable) into the current Python environment.
#   bash scripts/setup.sh         the library, the `memloc` command and widget progress bars
#                                 for Jupyter (the [notebook] extra)
#   bash scripts/setup.sh --dev   plus the test and lint tools, and Chromium (Debian's package)
#                                 for the tests that open the HTML report in a real browser
# A torch that is already installed (a CUDA build, say) is kept. Only where none is installed
# does this pin torch==2.13.0 first: on machines with a local CPU wheel of it that is a fast
# install, where an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
if [[ "${1:-}" == "--dev" ]]; then
  "$PYTHON" -m pip install --quiet -e ".[dev]"
  if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == "0" ]]; then
      echo "installing Chromium (Debian's package) for the browser tests"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "note: no Chromium and no root apt-get here; the browser tests will be skipped" >&2
    fi
  fi
else
  "$PYTHON" -m pip install --quiet -e ".[notebook]"
fi
