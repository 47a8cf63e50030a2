"""The docs: the API reference is current and every page is reachable from the index."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import memloc_tl
import memloc_tl.viz

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _api_reference_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "api_reference", ROOT / "scripts/api_reference.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_current() -> None:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    assert text == _api_reference_module().render(), "run: python scripts/api_reference.py"


def test_api_reference_covers_every_public_name() -> None:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    for name in memloc_tl.__all__:
        if not name.startswith("__"):
            assert f"### `{name}`" in text, name
    for name in memloc_tl.viz.__all__:
        assert f"### `viz.{name}`" in text, name


def test_every_page_is_linked_from_the_index_and_every_link_exists() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(([\w.-]+\.md)\)", index))
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert pages == linked


def test_every_test_the_docs_name_exists() -> None:
    """A claim that cites a test (``tests/dir/test_x.py::test_name``) points at a real one."""
    texts = [ROOT / "README.md", *(p for p in (ROOT / "docs").glob("*.md") if p.name != "api.md")]
    cited = 0
    for text in texts:
        for path, name in re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", text.read_text()):
            source = ROOT / path
            assert source.is_file(), f"{text.name} cites {path}, which does not exist"
            if name:
                assert re.search(rf"def {name}\(", source.read_text()), (
                    f"{text.name} cites {path}::{name}, which is not a test there"
                )
            cited += 1
    assert cited > 20
