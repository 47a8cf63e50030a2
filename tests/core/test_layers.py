"""The layering: the import contracts in pyproject.toml hold, and results draw through a registry.

``lint-imports`` (import-linter) reads the contracts from pyproject.toml; this test runs it, so
CI fails on an import that runs up a layer. It also shows the linter would notice one: a
contract that forbids an import the package does make is reported broken.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import memloc_tl
from memloc_tl.core.rendering import qualified_name, registered, render
from memloc_tl.core.results import Drawable

ROOT = Path(__file__).resolve().parents[2]


def _lint(*args: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(*sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_import_contracts_hold() -> None:
    done = _lint()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
    assert "viz is on top" in done.stdout


def test_the_linter_reports_an_import_that_runs_up(tmp_path: Path) -> None:
    config = tmp_path / "upward.toml"
    config.write_text(
        textwrap.dedent(
            """
            [tool.importlinter]
            root_package = "memloc_tl"
            exclude_type_checking_imports = true

            [[tool.importlinter.contracts]]
            name = "the report may not import viz (it does)"
            type = "forbidden"
            source_modules = ["memloc_tl.report"]
            forbidden_modules = ["memloc_tl.viz"]
            """
        )
    )
    done = _lint(str(config))
    assert done.returncode != 0
    assert "BROKEN" in done.stdout
    assert "memloc_tl.report -> memloc_tl.viz" in done.stdout


def test_every_public_result_that_draws_has_a_renderer() -> None:
    table = registered()
    for kind, view in table:  # every registered name is a class of the package
        module, _, name = kind.rpartition(".")
        assert inspect.isclass(getattr(importlib.import_module(module), name)), kind
        assert view in ("figure", "heatmap")
    drawing = {
        getattr(memloc_tl, name)
        for name in memloc_tl.__all__
        if inspect.isclass(getattr(memloc_tl, name))
        and issubclass(getattr(memloc_tl, name), Drawable)
    }
    assert len(drawing) >= 15
    keys = {(kind, view) for kind, view in table}
    for kind in drawing:  # a view that asks render(...) has a renderer (others delegate)
        for view in ("figure", "heatmap"):
            method = getattr(kind, view, None)
            if method is None or "render(" not in inspect.getsource(method):
                continue
            found = any((qualified_name(base), view) in keys for base in kind.__mro__)
            assert found, f"{kind.__name__}.{view}"


def test_render_refuses_a_result_without_a_renderer() -> None:
    class Unknown(Drawable):
        pass

    with pytest.raises(TypeError, match="no 'figure' renderer for Unknown"):
        render(Unknown())


def test_no_module_imports_another_modules_private_names() -> None:
    import ast

    package = ROOT / "memloc_tl"
    found = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("memloc_tl"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                private = [name for name in private if not name.startswith("__")]
                if private:
                    found.append(f"{path.relative_to(ROOT)}: {node.module} {private}")
    assert found == []


def test_no_module_is_in_an_import_circle() -> None:
    """No module reaches itself through imports, lazy ones inside functions included (the
    contracts above order the layers; this also covers modules within one layer)."""
    import grimp  # import-linter's import graph

    graph = grimp.build_graph("memloc_tl", exclude_type_checking_imports=True)
    circles = [
        graph.find_shortest_chain(importer=imported, imported=importer)
        for importer in sorted(graph.modules)
        for imported in graph.find_modules_directly_imported_by(importer)
        if graph.chain_exists(importer=imported, imported=importer)
    ]
    assert circles == [], f"import circles: {circles}"


def _public_callables() -> list[tuple[str, object]]:
    import pkgutil

    found = []
    for info in pkgutil.walk_packages(memloc_tl.__path__, "memloc_tl."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(value):
                found.append((f"{module.__name__}.{name}", value))
            elif inspect.isclass(value):
                for attr, member in vars(value).items():
                    function = getattr(member, "__func__", member)
                    if not attr.startswith("_") and inspect.isfunction(function):
                        found.append((f"{module.__name__}.{name}.{attr}", function))
    return found


def test_no_public_function_takes_more_than_eight_parameters() -> None:
    """Settings travel in one frozen config per verb (EditConfig, PerturbConfig, ...)."""
    too_many = {}
    for name, function in _public_callables():
        parameters = [
            p
            for p in inspect.signature(function).parameters.values()  # type: ignore[arg-type]
            if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if len(parameters) > 8:
            too_many[name] = len(parameters)
    assert len(_public_callables()) > 100  # the walk found the package
    assert too_many == {}, f"public functions with more than 8 parameters: {too_many}"
