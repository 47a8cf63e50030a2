"""Rare-token attention: equal to an independent computation, and a known-answer test."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch

import memloc_tl.analysis.rare_tokens as rare_tokens
from memloc_tl.analysis import RareTokenAttentionAnalyzer, rare_token_attention
from memloc_tl.analysis.rare_tokens import kendall_tau_b
from memloc_tl.core.heads import HeadRef
from memloc_tl.organism import Organism


def brute_tau(x: list[float], y: list[float]) -> float:
    """Kendall tau-b by counting pairs, written out."""
    concordant = discordant = tied_x = tied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tied_x += 1
        elif dy == 0:
            tied_y += 1
        elif dx * dy > 0:
            concordant += 1
        else:
            discordant += 1
    n_x = concordant + discordant + tied_y  # pairs not tied in x
    n_y = concordant + discordant + tied_x
    if n_x == 0 or n_y == 0:
        return math.nan
    return (concordant - discordant) / math.sqrt(n_x * n_y)


def dense_rank(values: list[int]) -> list[int]:
    order = sorted(set(values))
    return [order.index(v) for v in values]


def test_kendall_tau_b_with_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (6, 12), generator=generator).double()
    y = torch.randint(0, 5, (6, 12), generator=generator).double()
    ours = kendall_tau_b(x, y)
    for row in range(6):
        assert ours[row].item() == pytest.approx(brute_tau(x[row].tolist(), y[row].tolist()))
    assert kendall_tau_b(torch.arange(5.0), torch.arange(5.0)).item() == pytest.approx(1.0)
    assert kendall_tau_b(torch.arange(5.0), -torch.arange(5.0)).item() == pytest.approx(-1.0)
    assert kendall_tau_b(torch.ones(5), torch.arange(5.0)).isnan()


def test_equals_an_independent_computation(organism: Organism, unchanged: Any) -> None:
    model, paragraphs, counts = organism.model, organism.planted, organism.corpus_counts
    with unchanged(model):
        result = rare_token_attention(
            model, paragraphs, counts, k_rarest=3, batch_size=5, progress=False
        )
    _, cache = model.run_with_cache(paragraphs.tokens, names_filter=lambda n: "hook_pattern" in n)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    tau_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    by_rank = torch.zeros(n_layers, n_heads, 50, dtype=torch.float64)
    rare_mass = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    occupancy = [0] * 50
    for n, row in enumerate(paragraphs.tokens):
        token_counts = [int(counts[t]) for t in row[:50]]
        ranks = dense_rank(token_counts)
        for r in set(ranks):
            occupancy[r] += 1
        rarest = sorted(range(50), key=lambda p: (token_counts[p], p))[:3]
        for layer, head in itertools.product(range(n_layers), range(n_heads)):
            attention = cache["pattern", layer][n, head, 49, :50].double()
            tau_sum[layer, head] += brute_tau(attention.tolist(), [float(r) for r in ranks])
            for p in range(50):
                by_rank[layer, head, ranks[p]] += attention[p]
            rare_mass[layer, head] += attention[rarest].sum()
    n = len(paragraphs)
    torch.testing.assert_close(result.tau.scores, (tau_sum / n).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(result.attention_by_rank, by_rank.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(result.rare_mass.scores, (rare_mass / n).float(), atol=1e-5, rtol=0)
    assert result.rank_occupancy.tolist() == occupancy
    for layer, head in itertools.product(range(n_layers), range(n_heads)):
        pooled_sum = brute_tau(list(range(50)), by_rank[layer, head].tolist())
        assert result.pooled_tau_sum.scores[layer, head].item() == pytest.approx(
            pooled_sum, abs=1e-5
        )
        occupied = [r for r in range(50) if occupancy[r]]
        means = [by_rank[layer, head, r].item() / occupancy[r] for r in occupied]
        pooled_mean = brute_tau([float(r) for r in occupied], means)
        assert result.pooled_tau_mean.scores[layer, head].item() == pytest.approx(
            pooled_mean, abs=1e-5
        )
    assert result.n_paragraphs == n


def test_known_answer_with_a_hand_built_pattern(organism: Organism) -> None:
    """Head 0 attends in proportion to rarity, head 1 to frequency: tau -1 and +1."""
    model = organism.model
    counts = torch.zeros(model.cfg.d_vocab, dtype=torch.long)
    prefix = torch.arange(10, 60)  # 50 distinct tokens
    counts[prefix] = torch.arange(1, 51) * 10  # token 10 is the rarest
    tokens = torch.cat([prefix, torch.zeros(50, dtype=torch.long)])[None]
    analyzer = RareTokenAttentionAnalyzer(model, counts, k_rarest=2, layers=[0])
    analyzer.prepare(tokens)
    pattern = torch.zeros(1, model.cfg.n_heads, 100, 100)
    weights = torch.arange(50, 0, -1).float()
    pattern[0, 0, 49, :50] = weights / weights.sum()  # decreasing with rank
    pattern[0, 1, 49, :50] = weights.flip(0) / weights.sum()  # increasing with rank
    pattern[0, 2, 49, 0] = 1.0  # all on the rarest
    ((_, hook),) = analyzer.hooks()
    hook(pattern, None)
    result = analyzer.result()
    assert result.tau["L0H0"] == pytest.approx(-1.0)
    assert result.tau["L0H1"] == pytest.approx(1.0)
    assert result.pooled_tau_sum["L0H0"] == pytest.approx(-1.0)
    assert result.rare_mass["L0H2"] == pytest.approx(1.0)
    assert result.rare_mass["L0H0"] == pytest.approx(float((50 + 49) / weights.sum()))
    assert result.top(1)[0][0] == HeadRef(0, 0)
    assert math.isnan(result.tau["L1H0"])  # layer 1 not analyzed


def test_bad_input_and_raising_analyzer_leave_model_unchanged(
    organism: Organism, unchanged: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, counts = organism.model, organism.corpus_counts
    with pytest.raises(ValueError, match="one count per token id"):
        rare_token_attention(model, organism.planted, counts[:10], progress=False)
    with pytest.raises(ValueError, match="cannot see the whole prefix"):
        rare_token_attention(model, organism.planted, counts, query_pos=10, progress=False)

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("boom")

    monkeypatch.setattr(rare_tokens, "kendall_tau_b", broken)
    with unchanged(model), pytest.raises(RuntimeError, match="boom"):
        rare_token_attention(model, organism.planted, counts, progress=False)
