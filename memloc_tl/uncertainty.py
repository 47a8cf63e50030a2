"""How sure is a head ranking? A bootstrap over paragraphs, seeded.

A ranking of heads computed from 8 paragraphs can name another head than the same statistic on
35 (seen on the organism: the rare-token head of the report flipped). :func:`bootstrap_heads`
recomputes a per-head statistic on paragraph sets drawn with replacement and gives, per head,
a percentile interval of the score, the interval of its rank, and how often it ranked first.
A verdict is *resolved* only when the top head ranks first in at least ``level`` of the
resamples; otherwise it is reported as not resolved, with the candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from memloc_tl.core.heads import HeadRef
from memloc_tl.core.rendering import render
from memloc_tl.core.results import Drawable, HeadScores, head_order
from memloc_tl.core.validation import check_positive_int, check_real

Order = Literal["largest", "smallest"]


def _ranks(scores: Tensor, order: Order) -> Tensor:
    """1-based ranks of ``[..., n_layers, n_heads]`` scores; NaN (not analyzed) ranks last."""
    positions = head_order(scores, order)
    ranks = torch.empty_like(positions)
    ranks.scatter_(-1, positions, torch.arange(1, positions.shape[-1] + 1).expand_as(positions))
    return ranks.view(scores.shape)


@dataclass(frozen=True)
class HeadRanking(Drawable):
    """A head ranking with its bootstrap uncertainty over paragraphs.

    Attributes:
        name: what the score is.
        order: ``"largest"`` or ``"smallest"`` score ranks first.
        scores: the point estimate on all paragraphs, ``[n_layers, n_heads]``.
        low, high: the percentile interval of each head's score (``level``).
        rank_low, rank_high: the interval of each head's rank (1 = first).
        p_first: the share of resamples in which each head ranked first.
        n_paragraphs: paragraphs the statistic was computed from.
        n_resamples: bootstrap resamples.
        level: interval level (e.g. 0.95), also the bar for a resolved verdict.
        seed: the seed of the resampling.
    """

    name: str
    order: Order
    scores: Float[Tensor, "n_layers n_heads"]
    low: Float[Tensor, "n_layers n_heads"]
    high: Float[Tensor, "n_layers n_heads"]
    rank_low: Float[Tensor, "n_layers n_heads"]
    rank_high: Float[Tensor, "n_layers n_heads"]
    p_first: Float[Tensor, "n_layers n_heads"]
    n_paragraphs: int
    n_resamples: int
    level: float
    seed: int

    @property
    def point(self) -> HeadScores:
        return HeadScores(self.name, self.scores)

    def top(self, k: int = 5) -> list[tuple[HeadRef, float]]:
        """The ``k`` first heads of the point estimate (the same order as ``HeadScores.top``)."""
        return self.point.top(k, order=self.order)

    @property
    def first(self) -> HeadRef:
        return self.top(1)[0][0]

    @property
    def resolved(self) -> bool:
        """The top head ranked first in at least ``level`` of the resamples."""
        first = self.first
        return float(self.p_first[first.layer, first.head]) >= self.level

    def candidates(self, min_share: float = 0.05) -> list[tuple[HeadRef, float]]:
        """Heads that ranked first in at least ``min_share`` of the resamples, most often first."""
        n_heads = self.scores.shape[1]
        flat = self.p_first.flatten()
        order = flat.argsort(descending=True, stable=True)
        return [
            (HeadRef(int(i) // n_heads, int(i) % n_heads), float(flat[i]))
            for i in order
            if float(flat[i]) >= min_share
        ]

    def describe(self, head: HeadRef | str) -> str:
        """``L0H0: -0.70 (95% interval -0.81 to -0.55; rank 1-2 of 32; first in 87%)``."""
        ref = HeadRef.parse(head).check_grid(*self.scores.shape)
        at = (ref.layer, ref.head)
        percent = round(100 * self.level)
        return (
            f"{ref}: {float(self.scores[at]):.2f} ({percent}% interval "
            f"{float(self.low[at]):.2f} to {float(self.high[at]):.2f}; rank "
            f"{int(self.rank_low[at])}-{int(self.rank_high[at])} of {self.scores.numel()}; "
            f"first in {float(self.p_first[at]):.0%} of resamples)"
        )

    def verdict(self) -> str:
        """One line: the top head and whether the data resolve it, with the sample size."""
        sample = (
            f"n = {self.n_paragraphs} paragraphs, {self.n_resamples} bootstrap resamples "
            f"(seed {self.seed})"
        )
        if self.resolved:
            return f"resolved: {self.describe(self.first)}; {sample}"
        others = ", ".join(f"{h} {p:.0%}" for h, p in self.candidates())
        return (
            f"not resolved: {self.first} ranks first on all paragraphs but only in "
            f"{float(self.p_first[self.first.layer, self.first.head]):.0%} of resamples "
            f"(first in: {others}); {sample}"
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per head: score, interval, rank interval, share of resamples ranked first."""
        n_layers, n_heads = self.scores.shape
        rows = []
        for layer in range(n_layers):
            for head in range(n_heads):
                at = (layer, head)
                rows.append(
                    {
                        "layer": layer,
                        "head": head,
                        "label": str(HeadRef(layer, head)),
                        "score": float(self.scores[at]),
                        "low": float(self.low[at]),
                        "high": float(self.high[at]),
                        "rank_low": int(self.rank_low[at]),
                        "rank_high": int(self.rank_high[at]),
                        "p_first": float(self.p_first[at]),
                    }
                )
        return pd.DataFrame(rows)

    def figure(self, k: int = 10) -> Any:
        """The top ``k`` heads with their intervals."""
        return render(self, k=k)

    def __repr__(self) -> str:
        return f"HeadRanking({self.name}: {self.verdict()})"


def bootstrap_heads(
    statistic: Callable[[Tensor], Tensor],
    n_paragraphs: int,
    *,
    name: str,
    order: Order = "largest",
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> HeadRanking:
    """Bootstrap a per-head statistic over paragraphs.

    Args:
        statistic: ``statistic(index)`` gives the ``[n_layers, n_heads]`` scores of the
            paragraphs ``index`` (a long tensor, with repeats); ``statistic(arange(n))`` is
            the point estimate.
        n_paragraphs: how many paragraphs there are.
        name: what the score is.
        order: which end of the scores ranks first.
        n_resamples: bootstrap resamples.
        level: the interval level, also the share of resamples in which the top head must
            rank first for a resolved verdict.
        seed: seed of the resampling.
    """
    check_positive_int(n_paragraphs, "n_paragraphs")
    check_positive_int(n_resamples, "n_resamples")
    check_real(level, "level", above=0.0, at_most=1.0)
    if order not in ("largest", "smallest"):
        raise ValueError(f"order must be 'largest' or 'smallest', got {order!r}")
    point = statistic(torch.arange(n_paragraphs)).double().cpu()
    generator = torch.Generator().manual_seed(seed)
    samples = torch.stack(
        [
            statistic(torch.randint(0, n_paragraphs, (n_paragraphs,), generator=generator))
            .double()
            .cpu()
            for _ in range(n_resamples)
        ]
    )
    ranks = _ranks(samples, order).double()
    tail = (1 - level) / 2
    quantiles = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    low, high = samples.nanquantile(quantiles[0], dim=0), samples.nanquantile(quantiles[1], dim=0)
    rank_low, rank_high = ranks.quantile(quantiles[0], dim=0), ranks.quantile(quantiles[1], dim=0)
    return HeadRanking(
        name=name,
        order=order,
        scores=point.float(),
        low=low.float(),
        high=high.float(),
        rank_low=rank_low.floor(),
        rank_high=rank_high.ceil(),
        p_first=(ranks == 1).double().mean(0).float(),
        n_paragraphs=n_paragraphs,
        n_resamples=n_resamples,
        level=level,
        seed=seed,
    )


@dataclass(frozen=True)
class Difference:
    """The difference of two groups' means with its bootstrap interval.

    Attributes:
        name: what is compared.
        point: mean of ``a`` minus mean of ``b``.
        low, high: the percentile interval of the difference (``level``).
        n_a, n_b: the group sizes.
        level: interval level.
    """

    name: str
    point: float
    low: float
    high: float
    n_a: int
    n_b: int
    level: float

    @property
    def resolved(self) -> bool:
        """The interval excludes 0: the sign of the difference is settled at this level."""
        return self.low > 0 or self.high < 0

    def describe(self) -> str:
        """E.g. ``-8.1 (95% interval -12.0 to -4.2; n = 16 vs 16)``."""
        return (
            f"{self.point:+.2f} ({self.level:.0%} interval {self.low:+.2f} to {self.high:+.2f}; "
            f"n = {self.n_a} vs {self.n_b})"
        )


def bootstrap_difference(
    a: Float[Tensor, " n_a"],
    b: Float[Tensor, " n_b"],
    *,
    name: str,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Difference:
    """Bootstrap ``mean(a) - mean(b)``, resampling each group (e.g. paragraphs) on its own."""
    check_positive_int(n_resamples, "n_resamples")
    check_real(level, "level", above=0.0, at_most=1.0)
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    a, b = a[~a.isnan()], b[~b.isnan()]
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"both groups need values; got {len(a)} and {len(b)} (NaN dropped)")
    generator = torch.Generator().manual_seed(seed)
    pick_a = torch.randint(0, len(a), (n_resamples, len(a)), generator=generator)
    pick_b = torch.randint(0, len(b), (n_resamples, len(b)), generator=generator)
    samples = a[pick_a].mean(1) - b[pick_b].mean(1)
    tail = (1 - level) / 2
    return Difference(
        name=name,
        point=float(a.mean() - b.mean()),
        low=float(samples.quantile(tail)),
        high=float(samples.quantile(1 - tail)),
        n_a=len(a),
        n_b=len(b),
        level=level,
    )
