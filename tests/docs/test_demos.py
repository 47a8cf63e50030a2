"""The demo notebooks run top to bottom, offline, on the (tiny) organism."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from memloc_tl.organism import Organism

DEMOS = sorted((Path(__file__).resolve().parents[2] / "demos").glob("*.ipynb"))


def test_there_are_five_demos() -> None:
    assert [p.name[:2] for p in DEMOS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", DEMOS, ids=lambda p: p.stem)
def test_demo_runs_offline(
    path: Path, organism: Organism, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The kernel inherits the environment: the tiny organism, already built in the test cache.
    monkeypatch.setenv("MEMLOC_DEMO_MODEL", "organism-tiny")
    monkeypatch.setenv("MEMLOC_TL_CACHE", str(organism.path.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # progress bars stay on, as for a user: with ipywidgets they are widgets, not stderr text
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    notebook = nbformat.read(path, as_version=4)
    # The demos call the library: no analysis logic defined in them.
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not re.search(r"^\s*(def|class) ", cell.source, re.MULTILINE), cell.source
    NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    stderr = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not [t for t in stderr if "IProgress" in t or "TqdmWarning" in t], stderr
    assert not [t for t in stderr if not t.strip()], "empty stderr outputs"
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert html, "the demo shows no figure or view"
    for page in html:
        # figures and views carry their scripts inline: nothing is fetched from a CDN
        assert not re.search(r"<script[^>]*\bsrc=", page), page[:300]
    assert os.environ["MEMLOC_DEMO_MODEL"] == "organism-tiny"
