"""The README's Python blocks run as written (on the tiny organism instead of the default one)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import memloc_tl
from memloc_tl.organism import Organism

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def test_readme_blocks_run_as_written(organism: Organism, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks()
    assert len(blocks) == 2
    # build_organism() would build the default organism; the suite's tiny one has the same API
    monkeypatch.setattr(memloc_tl, "build_organism", lambda *args, **kwargs: organism)
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    # what the blocks' comments promise
    scan, memorized = namespace["scan"], namespace["memorized"]
    assert len(memorized) > 0
    assert (scan.exact_match[: len(memorized)] >= 0).all()
    table = namespace["table"]
    after = table.set_index(["mask", "set", "metric"])["after"]
    before = table.set_index(["mask", "set", "metric"])["before"]
    for mask in ("gradient", "random", "all"):
        assert before[(mask, "edited", "mean_em")] == 50
    assert after[("all", "edited", "mean_em")] < 50  # lr 3e-2 changes the organism
    found, injection = namespace["found"], namespace["injection"]
    assert injection.succeeded  # the README says to check it first; on this organism it holds
    assert found.rank_of(injection.truth[0]) == 1  # "on the small test organism ... first"
