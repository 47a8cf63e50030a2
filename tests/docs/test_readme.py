"""The README's Python blocks run as written, on the default organism, and its comments hold."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest

import memloc_tl
from memloc_tl.localization import InjectionDamageWarning
from memloc_tl.organism import Organism

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


@pytest.mark.slow
def test_readme_blocks_run_as_written_on_the_default_organism(
    default_organism: Organism, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = python_blocks()
    assert len(blocks) == 3
    # build_organism() is exactly what the README calls; the suite's cache already holds it
    monkeypatch.setattr(memloc_tl, "build_organism", lambda *args, **kwargs: default_organism)
    namespace: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    # what the blocks' comments and the prose below them say
    scan, memorized = namespace["scan"], namespace["memorized"]
    assert len(memorized) >= 32
    assert bool((scan.exact_match[: len(memorized)] >= 0).all())
    table = namespace["table"]
    after = table.set_index(["mask", "set", "metric"])["after"]
    before = table.set_index(["mask", "set", "metric"])["before"]
    for mask in ("gradient", "random", "all"):
        assert before[(mask, "edited", "mean_em")] == 50
    assert after[("all", "edited", "mean_em")] < 50  # lr 3e-2 changes the organism

    injection, truth, model = namespace["injection"], namespace["truth"], namespace["model"]
    assert set(injection.paragraphs.ids) <= set(default_organism.heldout.ids)  # never trained on
    assert injection.succeeded  # "True: the target reached EM = 50"
    damage = injection.damage
    assert injection.damaging
    assert damage["memorized_em_drop"] > 30
    assert 1.2 < damage["perplexity_ratio"] < 2.0  # "about 1.5x"
    assert any(issubclass(w.category, InjectionDamageWarning) for w in caught)  # "it warns"

    localize, target = memloc_tl.localize, namespace["target"]
    chance = injection.config.fraction
    with injection.applied(model):
        recall = {
            method: localize(model, target, method=method).recall(truth)
            for method in ("grad_x_weight", "gradient", "magnitude", "random")
        }
    assert 0.1 < recall["grad_x_weight"] < 0.3  # "about a fifth ... (20x chance)"
    assert recall["gradient"] < chance  # "fewer there than chance"
    assert recall["magnitude"] > recall["grad_x_weight"]  # "|w| alone ... finds the most"
    assert recall["random"] == pytest.approx(chance, rel=0.5)
    before_w, after_w = injection.magnitude
    assert round(before_w, 3) == 0.025
    assert after_w > 5 * before_w
    assert model is default_organism.model

    timeline = namespace["timeline"]  # "none ... at the first checkpoint (step 75), most of
    assert len(timeline.ids) == len(memorized) == 35  # them first at step 225, none forgotten"
    assert timeline.steps[0] == 75
    assert not bool(timeline.memorized[0].any())
    assert bool(timeline.memorized[-1].all())
    first = list(timeline.first_memorized_step().values())
    assert first.count(225) > len(first) / 2
    assert timeline.forgetting_events() == []
