#!/usr/bin/env bash
# The test command of the README and of CI:
#   1. the whole suite on the installed TransformerLens (3: the HookedTransformer and the
#      bridge side by side), which also writes its numbers for step 2;
#   2. what differs on TransformerLens 4, in a second environment (scripts/test_tl4.sh).
# Both runs share one build of the test organism. Extra arguments go to the first pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
shared="$(mktemp -d "${TMPDIR:-/tmp}/memloc-test-XXXXXX")"
trap 'rm -rf "$shared"' EXIT
export MEMLOC_TEST_ORGANISM_CACHE="$shared/organisms"
export MEMLOC_BACKEND_REFERENCE="$shared/tl3-numbers.safetensors"
"$PYTHON" -m pytest "$@"
bash scripts/test_tl4.sh
