#!/usr/bin/env bash
# Install memloc-tl (editable) into the current Python environment.
#   bash scripts/setup.sh         the library and the `memloc` command
#   bash scripts/setup.sh --dev   plus the test and lint tools
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
else
  "$PYTHON" -m pip install --quiet -e .
fi
