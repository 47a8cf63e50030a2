"""CI cannot pass without testing what it claims: in CI a skip fails (but for the tests that need
the real weights or a GPU), and the TransformerLens 3 = 4 comparison never skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from memloc_tl.core.backend import tl_major

ROOT = Path(__file__).resolve().parents[2]

SKIPPING = """
import pytest

def test_skips():
    pytest.skip("nothing installed for this")

@pytest.mark.needs_hub
def test_needs_the_weights():
    pytest.skip("GPT-Neo 125M is not in the cache")
"""


def _pytest(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    dropped = ("CI", "PYTEST_ADDOPTS", "MEMLOC_BACKEND_REFERENCE")
    environment = {k: v for k, v in os.environ.items() if k not in dropped}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_in_ci_a_skip_fails_unless_the_test_needs_the_weights_or_a_gpu(tmp_path: Path) -> None:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    args = ["-p", "tests.conftest", "--rootdir", str(tmp_path), str(tmp_path)]
    local = _pytest(args)
    assert local.returncode == 0, local.stdout
    assert "2 skipped" in local.stdout
    ci = _pytest(args, CI="true")
    assert ci.returncode == 1, ci.stdout
    assert "1 failed, 1 skipped" in ci.stdout
    assert "skipped in CI (Skipped: nothing installed for this)" in ci.stdout
    assert "only tests marked needs_hub or needs_gpu may skip" in ci.stdout


def test_in_ci_the_backend_comparison_fails_without_its_reference(
    organism_cache: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-reference.safetensors"
    env = {"CI": "true", "MEMLOC_TEST_ORGANISM_CACHE": str(organism_cache)}
    if tl_major() >= 4:  # run 2: the file the TransformerLens 3 run writes is not there
        env["MEMLOC_BACKEND_REFERENCE"] = str(missing)
    result = _pytest(["tests/core/test_backends.py", "-k", "one_set_of_numbers"], **env)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "1 failed" in result.stdout
    assert "MEMLOC_BACKEND_REFERENCE" in result.stdout
    assert "bash scripts/test.sh" in result.stdout  # the message names the fix
