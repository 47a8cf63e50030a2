"""Where do gradients flow? Parameter-gradient norms per layer and component (paper 5.1-5.2).

The gradient of the continuation NLL with respect to the attention matrices W_Q, W_K, W_V, W_O
(per head) and the MLP matrices W_in, W_out — embeddings, unembedding and biases excluded, as in
the paper — is reduced per layer x component (4 x n_heads head matrices + W_in + W_out; 50 per
layer in GPT-Neo 125M) by the max absolute value (the paper's Eq. 2), the L2 norm, or the mean
absolute value. The paper finds memorized paragraphs have relatively larger gradients in lower
layers, and W_V of L1H2 the most salient component.

Gradients are taken with ``torch.autograd.grad`` on the attributed matrices only: nothing is
written to ``.grad`` and every ``requires_grad`` flag is restored.

The contrastive objective (paper Eq. 3) is

    CO = -w * NLL(memorized) + KL( p(.|keep; theta_0) || p(.|keep; theta) ),

with the reference code's weight ``w = 0.1`` and the KL summed over the 50 continuation
positions and averaged over keep paragraphs. At ``theta = theta_0`` the KL and its gradient are
zero (exactly in exact arithmetic; float32 rounding leaves noise of about a percent of the
weighted NLL gradient, measured on the organism), so the first-step CO gradient is ``-w`` times
the memorized-NLL gradient: the CO attribution map is a rescaled NLL map (tested). The KL only
acts once the weights move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.core import objectives
from memloc_tl.core.backend import HookedModel
from memloc_tl.core.objectives import (
    HEAD_MATRICES,
    MLP_MATRICES,
    KLReduction,
    accumulated_gradients,
    attributed_parameters,
    component_labels,
    continuation_nll,
    contrastive_kl,
    grad_only_for,
    original_logprobs,
)
from memloc_tl.core.paragraphs import Paragraphs, check_set
from memloc_tl.core.rendering import render
from memloc_tl.core.results import Drawable, LayerComponentScores
from memloc_tl.core.validation import check_choice, check_positive_int

__all__ = [  # the objectives' names stay importable from here
    "HEAD_MATRICES",
    "MLP_MATRICES",
    "STATISTICS",
    "GradientComparison",
    "GradientNorms",
    "accumulated_gradients",
    "attributed_parameters",
    "compare_gradient_norms",
    "component_labels",
    "continuation_nll",
    "contrastive_gradient_norms",
    "contrastive_gradients",
    "contrastive_kl",
    "grad_only_for",
    "gradient_norms",
    "original_logprobs",
    "reduce_gradients",
]

STATISTICS = ("max_abs", "l2", "mean_abs")
Aggregate = Literal["batch_mean", "per_paragraph"]


def reduce_gradients(
    model: HookedModel, grads: dict[str, Tensor]
) -> Float[Tensor, "statistic n_layers component"]:
    """Max |g|, L2 norm and mean |g| per layer and component, stacked in ``STATISTICS`` order."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    out = torch.zeros(len(STATISTICS), n_layers, 4 * n_heads + 2, dtype=torch.float64)
    for layer in range(n_layers):
        # one row per head for the head matrices, one row for each MLP matrix
        blocks = [grads[f"blocks.{layer}.attn.{m}"].flatten(1) for m in HEAD_MATRICES]
        blocks += [grads[f"blocks.{layer}.mlp.{m}"].flatten()[None] for m in MLP_MATRICES]
        for column, block in zip(_columns(n_heads), blocks, strict=True):
            block = block.double()
            absolute = block.abs()
            out[0, layer, column] = absolute.amax(-1).cpu()
            out[1, layer, column] = block.square().sum(-1).sqrt().cpu()
            out[2, layer, column] = absolute.mean(-1).cpu()
    return out


def _columns(n_heads: int) -> list[slice]:
    head_columns = [slice(i * n_heads, (i + 1) * n_heads) for i in range(len(HEAD_MATRICES))]
    return [*head_columns, slice(4 * n_heads, 4 * n_heads + 1), slice(4 * n_heads + 1, None)]


@dataclass(frozen=True)
class GradientNorms(Drawable):
    """Parameter-gradient scores per layer and component.

    Attributes:
        max_abs: max |grad| per layer x component (the paper's Eq. 2).
        l2: L2 norm of the gradient per layer x component.
        mean_abs: mean |grad| per layer x component.
        objective: ``"nll"`` or ``"contrastive"``.
        aggregate: ``"batch_mean"`` (gradient of the set's mean loss, the reference code) or
            ``"per_paragraph"`` (each paragraph's scores, then averaged; the paper's wording).
        n_paragraphs: paragraphs the gradient was taken over.
    """

    max_abs: LayerComponentScores
    l2: LayerComponentScores
    mean_abs: LayerComponentScores
    objective: str
    aggregate: str
    n_paragraphs: int

    def statistic(self, name: str) -> LayerComponentScores:
        if name not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {name!r}")
        return getattr(self, name)

    def layer_share(self, statistic: str = "max_abs") -> Float[Tensor, " n_layers"]:
        """Each layer's share of the summed scores (the paper: larger in low layers for MPs)."""
        return self.statistic(statistic).layer_share()

    def top(self, k: int = 5, statistic: str = "max_abs") -> list[tuple[int, str, float]]:
        return self.statistic(statistic).top(k)

    def figure(self, statistic: str = "max_abs") -> Any:
        """Heatmap of one statistic per layer x component."""
        return self.statistic(statistic).figure()

    def to_frame(self) -> pd.DataFrame:
        """Long format: layer, component, and one column per statistic."""
        frame = self.max_abs.to_frame().drop(columns=["name", "score"])
        for name in STATISTICS:
            frame[name] = self.statistic(name).scores.flatten().tolist()
        return frame.assign(objective=self.objective, aggregate=self.aggregate)

    def __repr__(self) -> str:
        best = ", ".join(f"L{layer}.{c}" for layer, c, _ in self.top(3))
        return (
            f"GradientNorms({self.objective}, {self.aggregate}, n={self.n_paragraphs}, "
            f"top max|grad|: {best})"
        )


@dataclass(frozen=True)
class GradientComparison(Drawable):
    """Gradient norms of memorized and non-memorized paragraphs side by side (paper Fig. 4)."""

    memorized: GradientNorms
    non_memorized: GradientNorms

    def layer_share_difference(self, statistic: str = "max_abs") -> Float[Tensor, " n_layers"]:
        """Memorized minus non-memorized layer share (positive: relatively more in that layer)."""
        return self.memorized.layer_share(statistic) - self.non_memorized.layer_share(statistic)

    def share_difference(self, statistic: str = "max_abs") -> LayerComponentScores:
        """Per layer x component: memorized minus non-memorized share of each map's total.

        Shares, not raw values: the two sets' gradients differ in overall scale.
        """
        memorized = self.memorized.statistic(statistic).scores
        non_memorized = self.non_memorized.statistic(statistic).scores
        difference = memorized / memorized.sum() - non_memorized / non_memorized.sum()
        return LayerComponentScores(
            f"{statistic} share: memorized - non-memorized",
            difference,
            self.memorized.statistic(statistic).components,
        )

    def to_frame(self) -> pd.DataFrame:
        return pd.concat(
            [
                self.memorized.to_frame().assign(set="memorized"),
                self.non_memorized.to_frame().assign(set="non-memorized"),
            ],
            ignore_index=True,
        )

    def figure(self, statistic: str = "max_abs") -> Any:
        """Both maps and the layer-share difference (see ``viz.gradient_comparison_figure``)."""
        return render(self, statistic=statistic)

    def __repr__(self) -> str:
        diff = ", ".join(f"{d:+.3f}" for d in self.layer_share_difference().tolist())
        return f"GradientComparison(layer share MP - NMP: [{diff}])"


def _scores(
    model: HookedModel, stats: Tensor, objective: str, aggregate: str, n: int
) -> GradientNorms:
    labels = component_labels(model.cfg.n_heads)
    named = {
        name: LayerComponentScores(f"{objective} gradient {name}", stats[i].float(), labels)
        for i, name in enumerate(STATISTICS)
    }
    return GradientNorms(
        max_abs=named["max_abs"],
        l2=named["l2"],
        mean_abs=named["mean_abs"],
        objective=objective,
        aggregate=aggregate,
        n_paragraphs=n,
    )


def gradient_norms(
    model: HookedModel,
    paragraphs: Paragraphs,
    *,
    aggregate: Aggregate = "batch_mean",
    batch_size: int = 16,
    progress: bool = True,
) -> GradientNorms:
    """Per-layer, per-component gradient scores of the continuation NLL (paper 5.1, Eq. 1-2).

    Args:
        model: the model (not changed; no ``.grad`` is left).
        paragraphs: the paragraphs.
        aggregate: ``"batch_mean"``: one gradient of the mean NLL over all paragraphs (the
            reference code); ``"per_paragraph"``: scores of each paragraph's gradient, averaged.
        batch_size: paragraphs per forward/backward pass.
        progress: show a progress bar.
    """
    if aggregate not in ("batch_mean", "per_paragraph"):
        raise ValueError(f"aggregate must be 'batch_mean' or 'per_paragraph', got {aggregate!r}")
    check_set(model, paragraphs, "paragraphs")
    check_positive_int(batch_size, "batch_size")
    p = paragraphs.prefix_len

    def nll(tokens: Tensor, start: int) -> Tensor:
        return continuation_nll(model, tokens, p).mean()

    if aggregate == "batch_mean":
        grads = accumulated_gradients(model, [(paragraphs, nll)], batch_size, progress, "gradients")
        stats = reduce_gradients(model, grads)
    else:
        stats = torch.zeros(len(STATISTICS), model.cfg.n_layers, 4 * model.cfg.n_heads + 2)
        for i in tqdm(range(len(paragraphs)), desc="gradients", disable=not progress):
            grads = accumulated_gradients(model, [(paragraphs[i], nll)], 1, False, "")
            stats += reduce_gradients(model, grads).float()
        stats /= len(paragraphs)
    return _scores(model, stats, "nll", aggregate, len(paragraphs))


def compare_gradient_norms(
    model: HookedModel,
    memorized: Paragraphs,
    non_memorized: Paragraphs,
    *,
    aggregate: Aggregate = "batch_mean",
    batch_size: int = 16,
    progress: bool = True,
) -> GradientComparison:
    """Gradient norms of memorized and non-memorized paragraphs, side by side (paper Fig. 4)."""
    kwargs = {"aggregate": aggregate, "batch_size": batch_size, "progress": progress}
    return GradientComparison(
        memorized=gradient_norms(model, memorized, **kwargs),  # type: ignore[arg-type]
        non_memorized=gradient_norms(model, non_memorized, **kwargs),  # type: ignore[arg-type]
    )


def contrastive_gradients(
    model: HookedModel,
    memorized: Paragraphs,
    keep: Paragraphs,
    *,
    original_logprobs: Float[Tensor, "n_keep continuation_pos d_vocab"] | None = None,
    nll_weight: float = 0.1,
    kl_reduction: KLReduction = "sum_positions",
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Gradient of the contrastive objective (paper Eq. 3) w.r.t. the attributed matrices.

    Args:
        model: the model (not changed).
        memorized: paragraphs to unlearn (their NLL is pushed up).
        keep: paragraphs whose predictions must stay (the KL term).
        original_logprobs: theta_0's log-probabilities on ``keep``; default the current
            model's, which makes the KL gradient exactly zero (computed a batch at a time
            when needed, so they are never all held).
        nll_weight: weight ``w`` of the NLL term (reference code: 0.1).
        kl_reduction: see :func:`contrastive_kl`.
        batch_size: paragraphs per forward/backward pass.
        progress: show a progress bar.
    """
    check_choice(kl_reduction, "kl_reduction", ("sum_positions", "mean"))
    check_set(model, memorized, "memorized")
    check_set(model, keep, "keep")
    check_positive_int(batch_size, "batch_size")
    if original_logprobs is None:  # the model as it is: each batch's, when it is needed
        reference = objectives.recomputed_reference(model, keep.prefix_len)
    else:
        if original_logprobs.shape[0] != len(keep):
            raise ValueError(
                f"original_logprobs has {original_logprobs.shape[0]} rows for {len(keep)} "
                "keep paragraphs"
            )
        reference = objectives.stored_reference(original_logprobs)

    def unlearn(tokens: Tensor, start: int) -> Tensor:
        return -nll_weight * continuation_nll(model, tokens, memorized.prefix_len).mean()

    def kl(tokens: Tensor, start: int) -> Tensor:
        ref = reference(tokens, start)
        return contrastive_kl(model, tokens, ref, keep.prefix_len, reduction=kl_reduction)

    return accumulated_gradients(
        model, [(memorized, unlearn), (keep, kl)], batch_size, progress, "contrastive gradients"
    )


def contrastive_gradient_norms(
    model: HookedModel,
    memorized: Paragraphs,
    keep: Paragraphs,
    *,
    nll_weight: float = 0.1,
    kl_reduction: KLReduction = "sum_positions",
    batch_size: int = 16,
    progress: bool = True,
) -> GradientNorms:
    """Per-layer, per-component scores of the contrastive-objective gradient (paper 5.2).

    At the model's own weights this equals ``nll_weight`` times the memorized-NLL gradient
    scores (the KL term has zero gradient there): the reference code's Fig. 4 bottom.
    """
    grads = contrastive_gradients(
        model,
        memorized,
        keep,
        nll_weight=nll_weight,
        kl_reduction=kl_reduction,
        batch_size=batch_size,
        progress=progress,
    )
    return _scores(
        model, reduce_gradients(model, grads), "contrastive", "batch_mean", len(memorized)
    )
