"""CI cannot pass without testing what it claims: in CI a skip fails (but for the tests that need
the real weights or a GPU), the TransformerLens 3 = 4 comparison never skips, and run 2 (on
TransformerLens 4) runs every test of what differs between the two versions."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memloc_tl.core.backend import tl_major

ROOT = Path(__file__).resolve().parents[2]

# The functions of memloc_tl.core.backend that tell the backends apart: code that calls one runs
# differently on TransformerLens 4's bridge than on TransformerLens 3's HookedTransformer.
BRANCHES = ("is_bridge", "tl_major", "shares_prefix_cache", "skips_early_blocks")
# Each module that branches on the backend, and the test module that runs in run 2 for it.
RUN_2_MODULES = {
    "memloc_tl/core/backend.py": "tests/core/test_backends.py",
    "memloc_tl/core/forward.py": "tests/core/test_forward.py",
    "memloc_tl/models.py": "tests/memorization/test_models.py",
    "memloc_tl/export.py": "tests/memorization/test_export.py",
    "memloc_tl/analysis/patching.py": "tests/analysis/test_patching.py",
    "memloc_tl/analysis/perturbation.py": "tests/analysis/test_perturbation.py",
}

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


@pytest.mark.backend
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


def _names(tree: ast.AST) -> set[str]:
    """Every name a piece of code reads, imports or calls (``x``, ``a.x``, ``from m import x``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found.add(node.id)
        elif isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.alias):
            found.add(node.name.rsplit(".", 1)[-1])
        elif isinstance(node, ast.arg):
            found.add(node.arg)  # a fixture argument such as `bridge`
    return found


def _marked_backend(decorators: list[ast.expr]) -> bool:
    return any("backend" in _names(d) and "mark" in _names(d) for d in decorators)


def _module_marked(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            return "backend" in _names(node.value)
    return False


def _derived(tree: ast.Module) -> set[str]:
    """A test module's own names that stand for a branch: a module-level value computed from one
    (``HAS_PREFIX_KV = tl_major() < 4``) or a helper or fixture that reads one, and so on."""
    found: set[str] = set()
    while True:
        more = set()
        for node in tree.body:
            if isinstance(node, ast.Assign):
                named, body = [t.id for t in node.targets if isinstance(t, ast.Name)], node.value
            elif isinstance(node, ast.FunctionDef) and not node.name.startswith("test_"):
                named, body = [node.name], node
            else:
                continue
            if (set(BRANCHES) | found) & _names(body):
                more.update(n for n in named if n not in found)
        if not more:
            return found
        found |= more


def test_the_branches_are_what_tells_the_backends_apart() -> None:
    """Every public predicate of a model in memloc_tl.core.backend is in BRANCHES (one of a
    cache, such as ``holds_positions``, says nothing of the backend)."""
    tree = ast.parse((ROOT / "memloc_tl/core/backend.py").read_text())
    predicates = {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and not node.name.startswith("_")
        and isinstance(node.returns, ast.Name)
        and node.returns.id == "bool"
        and [a.arg for a in node.args.args[:1]] == ["model"]
    }
    assert {"is_bridge", "shares_prefix_cache"} <= predicates, "the AST walk found no predicate"
    assert predicates == set(BRANCHES) - {"tl_major"}, (
        "memloc_tl.core.backend's predicates changed: list them in BRANCHES (tests/docs/test_ci.py)"
    )


def test_run_2_runs_the_tests_of_every_module_that_branches_on_the_backend() -> None:
    """A module that calls one of BRANCHES has its test module marked `backend` (run 2 runs
    `-m backend`), so TransformerLens 4's path through it is tested."""
    branching = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "memloc_tl").rglob("*.py")
        if path.name != "__init__.py"
        and (path.name == "backend.py" or set(BRANCHES) & _names(ast.parse(path.read_text())))
    )
    assert branching == sorted(RUN_2_MODULES), (
        f"modules that branch on the backend: {branching}; add each one's test module to "
        "RUN_2_MODULES (tests/docs/test_ci.py) and mark it `pytestmark = pytest.mark.backend`"
    )
    unmarked = [
        t for t in RUN_2_MODULES.values() if not _module_marked(ast.parse((ROOT / t).read_text()))
    ]
    assert not unmarked, f"{unmarked} must carry `pytestmark = pytest.mark.backend`"


def test_every_test_that_branches_on_the_backend_runs_in_run_2() -> None:
    """A test that reads one of BRANCHES (or a name of its module that stands for one: a value
    such as HAS_PREFIX_KV, a helper or fixture that reads one) or takes the `bridge` fixture is
    marked `backend`, itself or by its module."""
    unmarked = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        if _module_marked(tree):
            continue
        branching = set(BRANCHES) | {"bridge"} | _derived(tree)
        for node in tree.body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            if branching & _names(node) and not _marked_backend(node.decorator_list):
                unmarked.append(f"{path.relative_to(ROOT)}::{node.name}")
    assert not unmarked, (
        f"mark these @pytest.mark.backend (they differ on TransformerLens 4): {unmarked}"
    )


def test_run_2_selects_the_backend_tests() -> None:
    """scripts/test.sh hands run 2 `-m backend`, a marker pytest knows (pyproject.toml)."""
    assert 'bash scripts/test_tl4.sh -m backend "$@"' in (ROOT / "scripts/test.sh").read_text()
    assert '"backend: ' in (ROOT / "pyproject.toml").read_text()
