"""Head rankings with their uncertainty: a seeded bootstrap over paragraphs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from memloc_tl import HeadRef, PerturbConfig, patching_sweep, perturb_prefixes, rare_token_attention
from memloc_tl.organism import Organism
from memloc_tl.uncertainty import bootstrap_heads


def _per_paragraph(n: int, gap: float, seed: int = 0) -> torch.Tensor:
    """[n, 2, 3] scores: head L0H1 leads by ``gap`` on average, with noise."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, 2, 3, generator=generator, dtype=torch.float64)
    scores[:, 0, 1] += gap
    return scores


def test_bootstrap_equals_a_hand_written_resampling_loop() -> None:
    values = _per_paragraph(12, gap=0.3)
    ranking = bootstrap_heads(
        lambda index: values[index].mean(0), 12, name="s", n_resamples=200, seed=3
    )
    # independent: the same draws, statistics and ranks by numpy
    generator = torch.Generator().manual_seed(3)
    draws = [torch.randint(0, 12, (12,), generator=generator).numpy() for _ in range(200)]
    data = values.numpy()
    samples = np.stack([data[d].mean(0) for d in draws])  # [200, 2, 3]
    firsts = np.zeros((2, 3))
    for sample in samples:
        layer, head = np.unravel_index(np.argmax(sample), sample.shape)
        firsts[layer, head] += 1
    np.testing.assert_allclose(ranking.p_first.numpy(), firsts / 200, atol=1e-6)
    np.testing.assert_allclose(ranking.low.numpy(), np.quantile(samples, 0.025, axis=0), atol=1e-5)
    np.testing.assert_allclose(ranking.high.numpy(), np.quantile(samples, 0.975, axis=0), atol=1e-5)
    np.testing.assert_allclose(ranking.scores.numpy(), data.mean(0), atol=1e-6)
    ranks = np.argsort(np.argsort(-samples.reshape(200, -1), axis=1, kind="stable"), axis=1) + 1
    assert ranking.rank_low.flatten().tolist() == np.floor(np.quantile(ranks, 0.025, 0)).tolist()
    # seeded: the same seed gives the same ranking, another seed other draws
    again = bootstrap_heads(lambda i: values[i].mean(0), 12, name="s", n_resamples=200, seed=3)
    assert torch.equal(again.p_first, ranking.p_first)


def test_a_clear_leader_is_resolved_and_a_tie_is_not() -> None:
    clear = _per_paragraph(40, gap=3.0)
    ranking = bootstrap_heads(lambda i: clear[i].mean(0), 40, name="dNLL", n_resamples=300)
    assert ranking.first == HeadRef(0, 1)
    assert ranking.resolved
    assert ranking.verdict().startswith("resolved: L0H1:")
    assert "n = 40 paragraphs, 300 bootstrap resamples" in ranking.verdict()
    tied = _per_paragraph(8, gap=0.0, seed=1)
    tied[:, 1, 2] = tied[:, 0, 1]  # two heads with the same scores... but for noise
    tied[:, 1, 2] += 0.01 * torch.randn(8, dtype=torch.float64)
    ranking = bootstrap_heads(lambda i: tied[i].mean(0), 8, name="dNLL", n_resamples=300)
    assert not ranking.resolved
    assert ranking.verdict().startswith("not resolved:")
    assert len(ranking.candidates()) >= 2
    frame = ranking.to_frame()
    assert frame["p_first"].sum() == pytest.approx(1.0)
    assert (frame["low"] <= frame["score"] + 1e-6).all()
    assert (frame["score"] <= frame["high"] + 1e-6).all()
    assert ranking.figure().data[0].x[0] == str(ranking.first)
    with pytest.raises(ValueError, match="level must be"):
        bootstrap_heads(lambda i: tied[i].mean(0), 8, name="x", level=1.5)


def test_rare_token_and_patching_rankings_carry_their_interval(
    organism: Organism, unchanged: Any
) -> None:
    memorized = organism.planted[:6]
    with unchanged(organism.model):
        rare = rare_token_attention(
            organism.model, memorized, organism.corpus_counts, batch_size=4, progress=False
        )
    ranking = rare.bootstrap(200, seed=1)
    # the point estimate is the result's own statistic (recomputed from the stored paragraphs)
    torch.testing.assert_close(ranking.scores, rare.pooled_tau_mean.scores, equal_nan=True)
    assert ranking.first == rare.top(1)[0][0]
    assert ranking.n_paragraphs == 6
    assert 0 < float(ranking.p_first.max()) <= 1
    perturbed = perturb_prefixes(
        organism.model, memorized, config=PerturbConfig(n_samples=1), progress=False
    ).perturbed
    assert perturbed is not None
    sweep = patching_sweep(organism.model, memorized, perturbed, progress=False)
    ranking = sweep.bootstrap(200, seed=1)
    torch.testing.assert_close(ranking.scores, sweep.mean_delta_nll.scores.float())
    assert ranking.first == sweep.top(1)[0][0]


def test_bootstrap_difference_matches_a_hand_written_resampling() -> None:
    from memloc_tl.uncertainty import bootstrap_difference

    a = torch.tensor([3.0, 5.0, 4.0, 8.0, float("nan")])
    b = torch.tensor([10.0, 12.0, 9.0])
    result = bootstrap_difference(a, b, name="d", n_resamples=200, seed=3)
    # the same draws by hand: NaN dropped, each group resampled on its own
    clean = a[~a.isnan()].double()
    generator = torch.Generator().manual_seed(3)
    pick_a = torch.randint(0, 4, (200, 4), generator=generator)
    pick_b = torch.randint(0, 3, (200, 3), generator=generator)
    by_hand = [float(clean[pick_a[i]].mean() - b.double()[pick_b[i]].mean()) for i in range(200)]
    ordered = torch.tensor(by_hand, dtype=torch.float64)
    assert result.point == pytest.approx(5.0 - 31.0 / 3)
    assert result.low == pytest.approx(float(ordered.quantile(0.025)))
    assert result.high == pytest.approx(float(ordered.quantile(0.975)))
    assert (result.n_a, result.n_b) == (4, 3)
    assert result.resolved  # every resample is negative
    assert "n = 4 vs 3" in result.describe()
    same = bootstrap_difference(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]), name="d")
    assert not same.resolved
    with pytest.raises(ValueError, match="both groups need values"):
        bootstrap_difference(torch.tensor([float("nan")]), b, name="d")
