#!/usr/bin/env bash
# The test command of the README and of CI: two runs.
#   1. the whole suite on the installed TransformerLens (scripts/setup.sh installs 3: the
#      HookedTransformer and the bridge side by side), which also writes the HookedTransformer's
#      numbers to a file;
#   2. on TransformerLens 4 in a second environment (scripts/test_tl4.sh), what differs between
#      the two versions: the tests marked `backend` (the backend layer, loading, export, the
#      tests of every module that branches on the backend, and the bridge's numbers for every
#      analysis, which must equal that file's within 1e-5). tests/docs/test_ci.py checks that
#      every module and test that branches on the backend is marked.
# Both runs share one build of each test organism. Extra arguments go to both pytest runs.
# With CI=true a skipped test fails, except those that need the real GPT-Neo 125M weights or a
# GPU (tests/conftest.py), so that neither run can pass without testing what it claims.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
shared="$(mktemp -d "${TMPDIR:-/tmp}/memloc-test-XXXXXX")"
trap 'rm -rf "$shared"' EXIT
export MEMLOC_TEST_ORGANISM_CACHE="$shared/organisms"
export MEMLOC_BACKEND_REFERENCE="$shared/tl3-numbers.safetensors"

first="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("transformer-lens"))')"
echo "== memloc-tl tests, run 1: TransformerLens $first ($("$PYTHON" -c 'import sys; print(sys.prefix)'))"
if [[ "$first" != 3.* ]]; then
  echo "note: run 1 wants TransformerLens 3 (its HookedTransformer writes the reference numbers);" \
    "this environment has $first. bash scripts/setup.sh installs 3 where none is installed." >&2
fi
start=$SECONDS
"$PYTHON" -m pytest "$@"
echo "== run 1 (TransformerLens $first) took $((SECONDS - start)) s"
start=$SECONDS
bash scripts/test_tl4.sh -m backend "$@"
echo "== run 2 (TransformerLens 4) took $((SECONDS - start)) s, installing it included"
