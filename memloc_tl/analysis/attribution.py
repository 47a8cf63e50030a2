"""Attribution patching: every head's patching effect, estimated from one forward and backward.

Patching head h's output ``z`` from a source run into a target run changes the continuation NLL
by about ``sum_{pos, d_head} (z_source - z_target) * dNLL/dz_target`` (a first-order Taylor
expansion around the target run; Nanda 2023, "Attribution patching"; Syed et al. 2023). One
target forward and backward, plus one source forward, give the estimate for every head of every
layer at once, where exact patching (:func:`~memloc_tl.analysis.patching.patching_sweep`) runs
the model once per head. The estimate is linear: it is good for small changes and can miss
saturating ones, so check it against the exact sweep on a subset
(:meth:`AttributionPatching.correlation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.analysis.patching import PatchingSweep, check_pair, chosen_positions
from memloc_tl.core.backend import HookedModel
from memloc_tl.core.forward import continuation_logits
from memloc_tl.core.heads import HeadRef
from memloc_tl.core.hooks import hook_name, make_graph_start_hook, make_store_hook, position_mask
from memloc_tl.core.objectives import grad_only_for
from memloc_tl.core.paragraphs import Paragraphs, check_set
from memloc_tl.core.results import Drawable, HeadScores
from memloc_tl.core.validation import check_positive_int


@dataclass(frozen=True)
class AttributionPatching(Drawable):
    """Estimated change of the continuation NLL when each head alone is patched.

    Attributes:
        paragraphs: the target paragraphs.
        estimate: ``[n_layers, n_heads, n_paragraphs]``, the first-order estimate of the change
            of each paragraph's mean continuation NLL.
    """

    paragraphs: Paragraphs
    estimate: Float[Tensor, "n_layers n_heads n_paragraphs"]

    @property
    def mean_delta_nll(self) -> HeadScores:
        return HeadScores("attribution: estimated mean dNLL", self.estimate.mean(-1))

    def top(self, k: int = 5) -> list[tuple[HeadRef, float]]:
        """The ``k`` heads whose patching is estimated to raise the NLL most."""
        return self.mean_delta_nll.top(k)

    def correlation(self, sweep: PatchingSweep) -> float:
        """Pearson correlation with an exact sweep's NLL changes, over heads and paragraphs."""
        if sweep.kind != "patch" or sweep.delta_nll.shape != self.estimate.shape:
            raise ValueError(
                "compare with patching_sweep(model, target, source) on the same paragraphs "
                f"(kind 'patch', shape {tuple(self.estimate.shape)}); got kind {sweep.kind!r}, "
                f"shape {tuple(sweep.delta_nll.shape)}"
            )
        both = torch.stack([self.estimate.flatten(), sweep.delta_nll.flatten()]).double()
        return float(torch.corrcoef(both)[0, 1])

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per head, the mean estimated dNLL."""
        return self.mean_delta_nll.to_frame().rename(columns={"score": "estimated_delta_nll"})

    def figure(self) -> Any:
        """Heatmap of the estimated mean NLL change per head."""
        return self.mean_delta_nll.figure()

    def __repr__(self) -> str:
        best = ", ".join(f"{h}={s:+.3f}" for h, s in self.top(3))
        return f"AttributionPatching(n={len(self.paragraphs)}, top estimated dNLL: {best})"


def attribution_patching(
    model: HookedModel,
    target: Paragraphs,
    source: Paragraphs,
    *,
    positions: Sequence[int] | Tensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> AttributionPatching:
    """Estimate the effect of patching each head's ``hook_z`` from ``source`` into ``target``.

    Args:
        model: the model (not changed; no ``.grad`` is written).
        target: the paragraphs whose continuation NLL is scored.
        source: paragraphs patched in, row-aligned with ``target`` (e.g. the perturbed PMPs).
        positions: positions patched; default all.
        batch_size: paragraphs per forward and backward pass.
        progress: show a progress bar.
    """
    check_set(model, target, "target")
    check_pair(model, target, source, "source", aligned=True)
    check_positive_int(batch_size, "batch_size")
    cfg = model.cfg
    chosen = position_mask(target.seq_len, chosen_positions(positions, target.seq_len), "cpu")
    names = [hook_name("z", layer) for layer in range(cfg.n_layers)]
    p = target.prefix_len
    estimate = torch.zeros(cfg.n_layers, cfg.n_heads, len(target))
    with grad_only_for(model, []):
        for start in tqdm(
            range(0, len(target), batch_size), desc="attribution", disable=not progress
        ):
            rows = slice(start, start + batch_size)
            tokens = target.tokens[rows].to(cfg.device)
            with torch.no_grad():
                _, cache = model.run_with_cache(
                    source.tokens[rows].to(cfg.device), names_filter=lambda name: name in names
                )
            stored: dict[str, Tensor] = {}
            hooks: list[Any] = [
                ("hook_embed", make_graph_start_hook()),
            ]
            hooks += [(name, make_store_hook(stored)) for name in names]
            with model.hooks(fwd_hooks=hooks):
                logprobs = continuation_logits(model, tokens, p).log_softmax(-1)
            nll = -logprobs.gather(-1, tokens[:, p:, None]).squeeze(-1).mean(-1)
            grads = torch.autograd.grad(nll.sum(), [stored[name] for name in names])
            for layer, (name, grad) in enumerate(zip(names, grads, strict=True)):
                difference = (cache[name] - stored[name].detach()) * grad
                # [batch, pos, head, d_head] -> [head, batch], summed over chosen positions
                per_head = difference[:, chosen.to(difference.device)].sum(dim=(1, 3)).T
                estimate[layer, :, rows] = per_head.float().cpu()
    return AttributionPatching(paragraphs=target, estimate=estimate)
