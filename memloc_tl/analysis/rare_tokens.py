"""Do attention heads attend to rare tokens? (paper sections 6.2-6.3, Fig. 7)

For each head, the attention paid from one query position to the 50 prefix tokens is related to
how rare those tokens are in the corpus. Each prefix token gets a dense frequency rank within
its paragraph (0 = rarest; equal counts share a rank, so ranks run below 50). Three statistics:

- per-paragraph Kendall tau-b between attention and rank, averaged over paragraphs;
- the paper's pooled version: attention summed per rank across paragraphs, then tau between the
  rank index and the per-rank attention, both with the *sum* (the reference code; biased, since
  high ranks occur in fewer paragraphs) and the *mean* over the paragraphs where a rank occurs;
- the attention mass on the ``k`` rarest prefix tokens.

A negative tau means more attention to rarer tokens. On GPT-Neo 125M the paper reports L1H2 at
a pooled tau of about -0.97.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from memloc_tl.analysis.runner import run_analyzers
from memloc_tl.core.backend import HookedModel
from memloc_tl.core.heads import HeadRef
from memloc_tl.core.hooks import hook_name
from memloc_tl.core.paragraphs import Paragraphs
from memloc_tl.core.results import Drawable, HeadScores
from memloc_tl.uncertainty import HeadRanking, bootstrap_heads


def kendall_tau_b(
    x: Float[Tensor, "... n"], y: Float[Tensor, "... n"], valid: Tensor | None = None
) -> Float[Tensor, "..."]:
    """Kendall's tau-b along the last dimension, batched; NaN where a side is constant.

    Args:
        x: first variable.
        y: second variable, same shape.
        valid: optional boolean mask of the entries to use (broadcast to ``x``).
    """
    dx = torch.sign(x[..., :, None] - x[..., None, :])
    dy = torch.sign(y[..., :, None] - y[..., None, :])
    n = x.shape[-1]
    pairs = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
    if valid is not None:
        valid = valid.expand(x.shape)
        pairs = pairs & valid[..., :, None] & valid[..., None, :]
    pairs = pairs.to(x.dtype)
    score = (dx * dy * pairs).sum(dim=(-1, -2))
    untied_x = ((dx != 0) * pairs).sum(dim=(-1, -2))
    untied_y = ((dy != 0) * pairs).sum(dim=(-1, -2))
    return score / (untied_x * untied_y).sqrt()


def dense_frequency_ranks(
    tokens: Int[Tensor, "batch pos"], corpus_counts: Int[Tensor, " d_vocab"]
) -> Int[Tensor, "batch pos"]:
    """Per row, each token's dense rank by corpus count: 0 = rarest, equal counts share a rank."""
    counts = corpus_counts.to(tokens.device)[tokens]
    ranks = torch.empty_like(tokens)
    for row in range(tokens.shape[0]):
        ranks[row] = torch.unique(counts[row], return_inverse=True)[1]
    return ranks


def rarest_positions(
    prefix: Int[Tensor, " pos"], corpus_counts: Int[Tensor, " d_vocab"], k: int = 5
) -> list[int]:
    """Positions of the ``k`` rarest tokens of one prefix (ties: earlier position first)."""
    if prefix.ndim != 1:
        raise ValueError(f"prefix must be one paragraph's tokens [pos], got {tuple(prefix.shape)}")
    counts = corpus_counts.to(prefix.device)[prefix]
    return counts.argsort(stable=True)[:k].tolist()


def mean_per_rank(
    by_rank: Float[Tensor, "... rank"], occupancy: Int[Tensor, " rank"]
) -> Float[Tensor, "... rank"]:
    """Summed attention per rank divided by the paragraphs in which the rank occurs; NaN if none."""
    occupancy = occupancy.to(by_rank.dtype)
    return by_rank / occupancy.where(occupancy > 0, torch.nan)


@dataclass(frozen=True)
class RareTokenAttention(Drawable):
    """Attention to rare prefix tokens, per head.

    Attributes:
        tau: mean over paragraphs of Kendall tau-b(attention, frequency rank).
        pooled_tau_sum: tau between rank and attention summed per rank (the paper's Fig. 7).
        pooled_tau_mean: tau between rank and mean attention per occurring rank.
        rare_mass: mean attention mass on the ``k_rarest`` rarest prefix tokens.
        attention_by_rank: attention summed per rank, ``[n_layers, n_heads, rank]``.
        rank_occupancy: in how many paragraphs each rank occurs, ``[rank]``.
        query_pos: the query position read.
        k_rarest: how many rarest tokens ``rare_mass`` covers.
        n_paragraphs: paragraphs accumulated.
        paragraph_by_rank: attention per rank of each paragraph,
            ``[n_paragraphs, n_layers, n_heads, rank]`` (what :meth:`bootstrap` resamples).
        paragraph_ranks: which ranks occur in each paragraph, ``[n_paragraphs, rank]``.
    """

    tau: HeadScores
    pooled_tau_sum: HeadScores
    pooled_tau_mean: HeadScores
    rare_mass: HeadScores
    attention_by_rank: Float[Tensor, "n_layers n_heads rank"]
    rank_occupancy: Int[Tensor, " rank"]
    query_pos: int
    k_rarest: int
    n_paragraphs: int
    paragraph_by_rank: Float[Tensor, "n_paragraphs n_layers n_heads rank"] | None = None
    paragraph_ranks: Bool[Tensor, "n_paragraphs rank"] | None = None

    def bootstrap(
        self, n_resamples: int = 1000, *, seed: int = 0, level: float = 0.95
    ) -> HeadRanking:
        """How sure the rare-token ranking (pooled mean tau, most negative first) is: the
        statistic recomputed on paragraph sets drawn with replacement (seeded)."""
        if self.paragraph_by_rank is None or self.paragraph_ranks is None:
            raise ValueError("this result holds no per-paragraph attention to resample")
        by_rank, present = self.paragraph_by_rank.double(), self.paragraph_ranks
        analyzed = ~self.pooled_tau_mean.scores.isnan()
        ranks = torch.arange(by_rank.shape[-1], dtype=torch.float64).expand_as(by_rank[0])

        def pooled_tau_mean(index: Tensor) -> Tensor:
            occupancy = present[index].sum(0)
            mean = mean_per_rank(by_rank[index].sum(0), occupancy).nan_to_num(0.0)
            tau = kendall_tau_b(mean, ranks, occupancy > 0)
            return tau.where(analyzed, torch.nan)

        return bootstrap_heads(
            pooled_tau_mean,
            self.n_paragraphs,
            name=self.pooled_tau_mean.name,
            order="smallest",
            n_resamples=n_resamples,
            level=level,
            seed=seed,
        )

    @property
    def mean_attention_by_rank(self) -> Float[Tensor, "n_layers n_heads rank"]:
        """Attention per rank averaged over the paragraphs where the rank occurs (NaN if none)."""
        return mean_per_rank(self.attention_by_rank, self.rank_occupancy)

    def top(self, k: int = 5) -> list[tuple[HeadRef, float]]:
        """The ``k`` heads that most prefer rare tokens (most negative pooled mean tau)."""
        return self.pooled_tau_mean.top(k, order="smallest")

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per head and statistic."""
        frames = [
            s.to_frame()
            for s in (self.tau, self.pooled_tau_sum, self.pooled_tau_mean, self.rare_mass)
        ]
        return pd.concat(frames, ignore_index=True)

    def figure(self) -> Any:
        """Heatmap of the pooled tau (mean per rank) per head; negative = prefers rare tokens."""
        return self.pooled_tau_mean.figure()

    def __repr__(self) -> str:
        best = ", ".join(f"{h}={s:.2f}" for h, s in self.top(3))
        return (
            f"RareTokenAttention(n_paragraphs={self.n_paragraphs}, query_pos={self.query_pos}, "
            f"most rare-seeking (pooled mean tau): {best})"
        )


class RareTokenAttentionAnalyzer:
    """Accumulates attention-to-rarity statistics from ``blocks.{l}.attn.hook_pattern``.

    Use :func:`rare_token_attention` for one call, or pass several analyzers to
    :func:`~memloc_tl.analysis.run_analyzers` to share one forward pass.
    """

    def __init__(
        self,
        model: HookedModel,
        corpus_counts: Int[Tensor, " d_vocab"],
        *,
        prefix_len: int = 50,
        query_pos: int | None = None,
        k_rarest: int = 5,
        layers: list[int] | None = None,
    ) -> None:
        cfg = model.cfg
        if corpus_counts.ndim != 1 or corpus_counts.shape[0] != cfg.d_vocab:
            raise ValueError(
                f"corpus_counts must have shape [{cfg.d_vocab}] (one count per token id), got "
                f"{tuple(corpus_counts.shape)}; see corpus_token_counts"
            )
        query_pos = prefix_len - 1 if query_pos is None else query_pos
        if query_pos < prefix_len - 1:
            raise ValueError(
                f"query_pos={query_pos} cannot see the whole prefix 0..{prefix_len - 1}: "
                f"use {prefix_len - 1} (predicts the first continuation token) "
                f"or {prefix_len} (the reference code)"
            )
        if not 1 <= k_rarest <= prefix_len:
            raise ValueError(f"k_rarest must be in 1..{prefix_len}, got {k_rarest}")
        self.layers = list(range(cfg.n_layers)) if layers is None else sorted(set(layers))
        if any(not 0 <= layer < cfg.n_layers for layer in self.layers):
            raise ValueError(f"layers must be in 0..{cfg.n_layers - 1}, got {layers}")
        self.last_layer = max(self.layers)
        self.corpus_counts = corpus_counts.to(cfg.device)
        self.prefix_len = prefix_len
        self.query_pos = query_pos
        self.k_rarest = k_rarest
        shape = (cfg.n_layers, cfg.n_heads)
        self._tau_sum = torch.zeros(shape, dtype=torch.float64)
        self._tau_count = torch.zeros(shape, dtype=torch.float64)
        self._rare_mass = torch.zeros(shape, dtype=torch.float64)
        self._by_rank = torch.zeros((*shape, prefix_len), dtype=torch.float64)
        self._occupancy = torch.zeros(prefix_len, dtype=torch.int64)
        self._paragraph_by_rank: list[Tensor] = []  # per batch: [batch, n_layers, n_heads, rank]
        self._paragraph_ranks: list[Tensor] = []
        self._n = 0
        self._ranks: Tensor | None = None
        self._rarest: Tensor | None = None

    def prepare(self, tokens: Tensor) -> None:
        if tokens.shape[1] <= self.query_pos:
            raise ValueError(f"query_pos={self.query_pos} is outside windows of {tokens.shape[1]}")
        prefix = tokens[:, : self.prefix_len]
        ranks = dense_frequency_ranks(prefix, self.corpus_counts)
        counts = self.corpus_counts[prefix]
        rarest_positions = counts.argsort(dim=-1, stable=True)[:, : self.k_rarest]
        rarest = torch.zeros_like(prefix, dtype=torch.bool).scatter_(1, rarest_positions, True)
        present = torch.zeros(len(tokens), self.prefix_len, dtype=torch.bool, device=tokens.device)
        present.scatter_(1, ranks, True)
        self._occupancy += present.sum(0).cpu()
        self._paragraph_ranks.append(present.cpu())
        self._paragraph_by_rank.append(
            torch.zeros(len(tokens), *self._by_rank.shape, dtype=torch.float32)
        )
        self._n += len(tokens)
        self._ranks, self._rarest = ranks, rarest

    def hooks(self) -> list[tuple[str, Callable[..., None]]]:
        return [(hook_name("pattern", layer), self._make_hook(layer)) for layer in self.layers]

    def _make_hook(self, layer: int) -> Callable[..., None]:
        def read_pattern(pattern: Tensor, hook: object) -> None:
            if self._ranks is None or self._rarest is None:
                raise RuntimeError("prepare(tokens) must run before the forward pass")
            attention = pattern[:, :, self.query_pos, : self.prefix_len].double()
            ranks = self._ranks[:, None, :].expand_as(attention)
            tau = kendall_tau_b(attention, ranks.double())
            self._tau_sum[layer] += tau.nan_to_num(0.0).sum(0).cpu()
            self._tau_count[layer] += (~tau.isnan()).sum(0).cpu()
            by_rank = torch.zeros_like(attention).scatter_add_(-1, ranks, attention)
            self._by_rank[layer] += by_rank.sum(0).cpu()
            self._paragraph_by_rank[-1][:, layer] = by_rank.float().cpu()
            self._rare_mass[layer] += (attention * self._rarest[:, None, :]).sum((0, -1)).cpu()

        return read_pattern

    def result(self) -> RareTokenAttention:
        """The statistics accumulated so far."""
        if self._n == 0:
            raise ValueError("no paragraphs were analyzed yet")
        ranks = torch.arange(self.prefix_len, dtype=torch.float64).expand_as(self._by_rank)
        occupied = self._occupancy > 0
        # unoccupied ranks are masked out of the tau; zero their NaN so it cannot leak into sums
        mean_by_rank = mean_per_rank(self._by_rank, self._occupancy).nan_to_num(0.0)
        unused = torch.full_like(self._tau_sum, torch.nan)
        analyzed = torch.zeros_like(self._tau_sum, dtype=torch.bool)
        analyzed[self.layers] = True

        def scores(name: str, values: Tensor) -> HeadScores:
            return HeadScores(name, values.where(analyzed, unused).float())

        return RareTokenAttention(
            tau=scores("mean per-paragraph tau", self._tau_sum / self._tau_count),
            pooled_tau_sum=scores("pooled tau (sum per rank)", kendall_tau_b(self._by_rank, ranks)),
            pooled_tau_mean=scores(
                "pooled tau (mean per rank)", kendall_tau_b(mean_by_rank, ranks, occupied)
            ),
            rare_mass=scores(f"attention on the {self.k_rarest} rarest", self._rare_mass / self._n),
            attention_by_rank=self._by_rank.float(),
            rank_occupancy=self._occupancy.clone(),
            query_pos=self.query_pos,
            k_rarest=self.k_rarest,
            n_paragraphs=self._n,
            paragraph_by_rank=torch.cat(self._paragraph_by_rank),
            paragraph_ranks=torch.cat(self._paragraph_ranks),
        )


def rare_token_attention(
    model: HookedModel,
    paragraphs: Paragraphs,
    corpus_counts: Int[Tensor, " d_vocab"],
    *,
    query_pos: int | None = None,
    k_rarest: int = 5,
    layers: list[int] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> RareTokenAttention:
    """Which heads attend to rare prefix tokens? (paper sections 6.2-6.3)

    Args:
        model: the model (not changed).
        paragraphs: the paragraphs.
        corpus_counts: unigram counts per token id (:func:`corpus_token_counts`).
        query_pos: query position; default the last prefix position (49, which predicts the
            first continuation token); 50 is what the reference code read.
        k_rarest: tokens covered by ``rare_mass``.
        layers: layers to analyze; default all.
        batch_size: paragraphs per forward pass.
        progress: show a progress bar.
    """
    analyzer = RareTokenAttentionAnalyzer(
        model,
        corpus_counts,
        prefix_len=paragraphs.prefix_len,
        query_pos=query_pos,
        k_rarest=k_rarest,
        layers=layers,
    )
    run_analyzers(model, paragraphs, [analyzer], batch_size=batch_size, progress=progress)
    return analyzer.result()
