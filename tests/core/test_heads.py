"""HeadRef, hook names and the shared result types."""

from __future__ import annotations

import pytest
import torch

from memloc_tl.core.heads import HeadRef, all_heads
from memloc_tl.core.hooks import hook_name
from memloc_tl.core.results import HeadScores


def test_head_ref_round_trip() -> None:
    head = HeadRef(layer=1, head=2)
    assert str(head) == "L1H2"
    assert repr([(head, 0.5)]) == "[(L1H2, 0.5)]"  # how scores.top(k) prints in a notebook
    assert HeadRef.parse("L1H2") == head
    assert HeadRef.parse(" l1h2 ") == head
    assert HeadRef.parse(head) is head
    assert sorted([HeadRef(2, 0), HeadRef(1, 3), HeadRef(1, 2)])[0] == head
    with pytest.raises(ValueError, match="looks like 'L1H2'"):
        HeadRef.parse("layer1head2")
    with pytest.raises(TypeError, match="non-negative int"):
        HeadRef(-1, 0)


def test_head_check_and_all_heads() -> None:
    class Cfg:
        n_layers, n_heads = 2, 3

    assert len(all_heads(Cfg)) == 6
    assert all_heads(Cfg)[4] == HeadRef(1, 1)
    with pytest.raises(ValueError, match="2 layers of 3 heads"):
        HeadRef(2, 0).check(Cfg)


def test_hook_name_speaks_transformer_lens() -> None:
    assert hook_name("pattern", 1) == "blocks.1.attn.hook_pattern"
    assert hook_name("z", 0) == "blocks.0.attn.hook_z"


def test_head_scores_top_and_frame() -> None:
    scores = HeadScores("x", torch.tensor([[0.1, -0.9], [0.5, float("nan")]]))
    assert scores.top(1) == [(HeadRef(1, 0), 0.5)]
    assert scores.top(1, order="smallest")[0][0] == HeadRef(0, 1)
    assert scores.top(1, order="abs")[0][0] == HeadRef(0, 1)
    assert scores["L0H1"] == pytest.approx(-0.9)
    # rank: the place in top()'s full ranking; NaN (not analyzed) last
    assert [scores.rank(h) for h in ("L1H0", "L0H0", "L0H1", "L1H1")] == [1, 2, 3, 4]
    assert scores.rank("L0H1", order="smallest") == 1
    assert scores.rank(HeadRef(1, 0), order="abs") == 2
    with pytest.raises(ValueError, match="L5H0"):
        scores.rank("L5H0")
    frame = scores.to_frame()
    assert frame.loc[frame.label == "L1H0", "score"].item() == pytest.approx(0.5)
    assert "L0H1" in repr(scores)
    with pytest.raises(ValueError, match="n_layers, n_heads"):
        HeadScores("bad", torch.zeros(3))
