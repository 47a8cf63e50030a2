"""Does recall need this head? Activation patching and ablation of heads (paper section 6, A.3).

A head's output (``blocks.{l}.attn.hook_z``, per head) in a *target* run is replaced by

- the same head's output in a *source* run of other paragraphs, row by row (patching: e.g.
  memorized <- perturbed-prefix or non-memorized, and the reverse);
- zeros (zero ablation), or its mean over a paragraph set (``mean_over``), per position (mean
  ablation);

at all positions or chosen ones. The effect is measured on the target's own continuation: the
change in mean NLL and in exact-match length (the teacher-forced EM, exact).

:func:`patching_sweep` does this for every head of every layer. Per layer it runs the target
once up to that layer, then continues from the cached residual stream with all heads' variants
stacked along the batch — instead of one full forward per head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.core.backend import HookedModel, shares_prefix_cache, skips_early_blocks
from memloc_tl.core.forward import (
    cpu_rows,
    exact_match_length,
    layer_starts,
    on_cpu,
    score_continuations,
)
from memloc_tl.core.heads import HeadRef
from memloc_tl.core.hooks import hook_name, make_each_head_replace_hook, make_head_replace_hook
from memloc_tl.core.paragraphs import Paragraphs, check_set
from memloc_tl.core.rendering import render
from memloc_tl.core.results import Drawable, HeadScores
from memloc_tl.core.unembedding import shared_unembedding
from memloc_tl.core.validation import check_positions, check_positive_int
from memloc_tl.uncertainty import HeadRanking, bootstrap_heads

Kind = Literal["patch", "zero", "mean"]
DEFAULT_HEADS: tuple[str, ...] = ("L1H2",)
"""The paper's head: layer 1, head 2 of GPT-Neo 125M."""


@dataclass(frozen=True)
class HeadIntervention(Drawable):
    """Recall of each target paragraph with chosen heads patched or ablated.

    Attributes:
        heads: the heads intervened on.
        kind: ``"patch"``, ``"zero"`` or ``"mean"``.
        paragraphs: the target paragraphs (their continuation is scored).
        baseline_em, baseline_nll: EM and mean continuation NLL without intervention.
        em, nll: the same with the intervention.
    """

    heads: tuple[HeadRef, ...]
    kind: str
    paragraphs: Paragraphs
    baseline_em: Int[Tensor, " n_paragraphs"]
    baseline_nll: Float[Tensor, " n_paragraphs"]
    em: Int[Tensor, " n_paragraphs"]
    nll: Float[Tensor, " n_paragraphs"]

    @property
    def delta_em(self) -> Int[Tensor, " n_paragraphs"]:
        return self.em - self.baseline_em

    @property
    def delta_nll(self) -> Float[Tensor, " n_paragraphs"]:
        return self.nll - self.baseline_nll

    def to_frame(self) -> pd.DataFrame:
        """One row per target paragraph."""
        frame = self.paragraphs.to_frame()
        frame["baseline_em"] = self.baseline_em.tolist()
        frame["em"] = self.em.tolist()
        frame["delta_em"] = self.delta_em.tolist()
        frame["baseline_nll"] = self.baseline_nll.tolist()
        frame["nll"] = self.nll.tolist()
        frame["delta_nll"] = self.delta_nll.tolist()
        return frame

    def figure(self) -> Any:
        """EM per paragraph without vs with (:func:`memloc_tl.viz.intervention_figure`)."""
        return render(self)

    def __repr__(self) -> str:
        heads = ",".join(map(str, self.heads))
        return (
            f"HeadIntervention({self.kind} {heads}, n={len(self.paragraphs)}, "
            f"mean dEM={self.delta_em.float().mean():+.2f}, "
            f"mean dNLL={self.delta_nll.mean():+.4f})"
        )


@dataclass(frozen=True)
class PatchingSweep(Drawable):
    """The effect of intervening on each head alone, for every head of every layer.

    Attributes:
        kind: ``"patch"``, ``"zero"`` or ``"mean"``.
        paragraphs: the target paragraphs.
        delta_nll: change of mean continuation NLL, ``[n_layers, n_heads, n_paragraphs]``.
        delta_em: change of EM, ``[n_layers, n_heads, n_paragraphs]``.
    """

    kind: str
    paragraphs: Paragraphs
    delta_nll: Float[Tensor, "n_layers n_heads n_paragraphs"]
    delta_em: Int[Tensor, "n_layers n_heads n_paragraphs"]

    @property
    def mean_delta_nll(self) -> HeadScores:
        return HeadScores(f"{self.kind}: mean dNLL", self.delta_nll.mean(-1))

    @property
    def mean_delta_em(self) -> HeadScores:
        return HeadScores(f"{self.kind}: mean dEM", self.delta_em.float().mean(-1))

    def top(self, k: int = 5) -> list[tuple[HeadRef, float]]:
        """The ``k`` heads whose intervention raises the continuation NLL most."""
        return self.mean_delta_nll.top(k)

    def bootstrap(
        self, n_resamples: int = 1000, *, seed: int = 0, level: float = 0.95
    ) -> HeadRanking:
        """How sure the ranking by mean dNLL is: recomputed on paragraph sets drawn with
        replacement (seeded)."""
        per_paragraph = self.delta_nll.double()
        return bootstrap_heads(
            lambda index: per_paragraph[..., index].mean(-1),
            per_paragraph.shape[-1],
            name=self.mean_delta_nll.name,
            order="largest",
            n_resamples=n_resamples,
            level=level,
            seed=seed,
        )

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per head, mean dNLL and mean dEM."""
        frame = self.mean_delta_nll.to_frame().rename(columns={"score": "delta_nll"})
        frame["delta_em"] = self.mean_delta_em.scores.flatten().tolist()
        return frame.drop(columns=["name"]).assign(kind=self.kind)

    def figure(self) -> Any:
        """Heatmap of the mean NLL change per head."""
        return self.mean_delta_nll.figure()

    def __repr__(self) -> str:
        best = ", ".join(f"{h}={s:+.3f}" for h, s in self.top(3))
        return f"PatchingSweep({self.kind}, n={len(self.paragraphs)}, largest mean dNLL: {best})"


def _heads(model: HookedModel, heads: Sequence[HeadRef | str]) -> tuple[HeadRef, ...]:
    if isinstance(heads, (str, HeadRef)):
        heads = [heads]
    parsed = tuple(dict.fromkeys(HeadRef.parse(h).check(model.cfg) for h in heads))
    if not parsed:
        raise ValueError("no heads given")
    return parsed


def _check_kind(kind: str, source: Paragraphs | None, mean_over: Paragraphs | None) -> None:
    if kind not in ("patch", "zero", "mean"):
        raise ValueError(f"kind must be 'patch', 'zero' or 'mean', got {kind!r}")
    if kind == "patch" and source is None:
        raise ValueError("patching needs source paragraphs (their activations are patched in)")
    if kind == "mean" and mean_over is None:
        raise ValueError("mean ablation needs mean_over paragraphs to average over")


def check_pair(
    model: HookedModel,
    target: Paragraphs,
    other: Paragraphs,
    what: str,
    *,
    aligned: bool = False,
) -> None:
    """``other`` (a source, or the set a mean is taken over) fits ``model`` and ``target``: the
    same window length, and with ``aligned`` one paragraph per target row."""
    check_set(model, other, what)
    if other.seq_len != target.seq_len:
        raise ValueError(f"{what} windows have {other.seq_len} tokens, targets {target.seq_len}")
    if aligned and len(other) != len(target):
        raise ValueError(
            f"{what} has {len(other)} paragraphs, target {len(target)}: pair them row by row, "
            f"one {what} paragraph per target (e.g. the target's own perturbed PMPs from "
            "perturb_prefixes(model, target).perturbed)"
        )


def chosen_positions(positions: Sequence[int] | Tensor | None, seq_len: int) -> Tensor | None:
    """The positions to intervene at, checked against ``seq_len`` (``None``: all of them)."""
    return None if positions is None else check_positions(positions, seq_len)


def first_difference(
    target: Int[Tensor, "batch pos"], source: Int[Tensor, "batch pos"], prefix_len: int
) -> int:
    """The first position at which any row of ``source`` differs from its ``target`` row,
    at most ``prefix_len - 1`` (the first position a continuation score reads).

    Attention is causal, so before that position the source run and the target run are the
    same, and patching a head there changes nothing: a sweep recomputes only from it on.
    """
    return min(int(first_differences(target, source).min()), prefix_len - 1)


def first_differences(
    target: Int[Tensor, "batch pos"], source: Int[Tensor, "batch pos"]
) -> Int[Tensor, " batch"]:
    """Per row, the first position at which ``source`` differs from ``target`` (the length
    where it does not differ)."""
    differs = target != source.to(target.device)
    first = differs.int().argmax(-1)
    return torch.where(differs.any(-1), first, target.shape[1])


def _shifted(positions: Tensor | None, first: int) -> Tensor | None:
    """``positions`` counted from ``first`` (those before it dropped: patching them is a no-op)."""
    if positions is None or first == 0:
        return positions
    return positions[positions >= first] - first


def mean_head_outputs(
    model: HookedModel, mean_over: Paragraphs, layers: Sequence[int], batch_size: int = 32
) -> dict[int, Float[Tensor, "pos head_index d_head"]]:
    """Mean ``hook_z`` per layer and position over the paragraphs ``mean_over`` (mean ablation)."""
    check_set(model, mean_over, "mean_over")
    names = {hook_name("z", layer): layer for layer in layers}
    sums: dict[int, Tensor] = {}
    with torch.no_grad():
        for start in range(0, len(mean_over), batch_size):
            tokens = mean_over.tokens[start : start + batch_size].to(model.cfg.device)
            _, cache = model.run_with_cache(
                tokens, names_filter=lambda name: name in names, stop_at_layer=max(layers) + 1
            )
            for name, layer in names.items():
                batch_sum = cache[name].double().sum(0)
                sums[layer] = sums[layer] + batch_sum if layer in sums else batch_sum
    return {layer: (total / len(mean_over)).float() for layer, total in sums.items()}


def _replacements(
    model: HookedModel,
    kind: str,
    layers: Sequence[int],
    source_tokens: Tensor | None,
    means: dict[int, Tensor] | None,
    shape: tuple[int, ...],
) -> dict[int, Tensor]:
    """Per layer, what the chosen heads' ``hook_z`` is replaced with, for one batch."""
    if kind == "patch":
        assert source_tokens is not None
        names = {hook_name("z", layer): layer for layer in layers}
        _, cache = model.run_with_cache(
            source_tokens, names_filter=lambda name: name in names, stop_at_layer=max(layers) + 1
        )
        return {layer: cache[name] for name, layer in names.items()}
    if kind == "mean":
        assert means is not None
        return means
    zeros = torch.zeros(shape[1:], device=model.cfg.device)
    return dict.fromkeys(layers, zeros)


def _intervene(
    model: HookedModel,
    target: Paragraphs,
    heads: tuple[HeadRef, ...],
    kind: Kind,
    source: Paragraphs | None,
    mean_over: Paragraphs | None,
    positions: Tensor | None,
    batch_size: int,
    progress: bool,
) -> HeadIntervention:
    layers = sorted({h.layer for h in heads})
    by_layer = {layer: [h.head for h in heads if h.layer == layer] for layer in layers}
    means = (
        mean_head_outputs(model, mean_over, layers, batch_size)
        if kind == "mean" and mean_over is not None
        else None
    )
    cfg = model.cfg
    results: dict[str, list[Tensor]] = {"base_em": [], "base_nll": [], "em": [], "nll": []}
    with torch.no_grad(), shared_unembedding():
        for start in tqdm(range(0, len(target), batch_size), desc=kind, disable=not progress):
            tokens = target.tokens[start : start + batch_size].to(cfg.device)
            source_tokens = (
                source.tokens[start : start + batch_size].to(cfg.device) if source else None
            )
            shape = (len(tokens), tokens.shape[1], cfg.n_heads, cfg.d_head)
            replacement = _replacements(model, kind, layers, source_tokens, means, shape)
            match, token_nll = score_continuations(model, tokens, target.prefix_len)
            results["base_em"].append(exact_match_length(match).cpu())
            results["base_nll"].append(token_nll.mean(-1).cpu())
            hooks: list[Any] = [
                (
                    hook_name("z", layer),
                    make_head_replace_hook(by_layer[layer], replacement[layer], positions),
                )
                for layer in layers
            ]
            with model.hooks(fwd_hooks=hooks):
                match, token_nll = score_continuations(model, tokens, target.prefix_len)
            results["em"].append(exact_match_length(match).cpu())
            results["nll"].append(token_nll.mean(-1).cpu())
    return HeadIntervention(
        heads=heads,
        kind=kind,
        paragraphs=target,
        baseline_em=torch.cat(results["base_em"]),
        baseline_nll=torch.cat(results["base_nll"]),
        em=torch.cat(results["em"]),
        nll=torch.cat(results["nll"]),
    )


def patch_heads(
    model: HookedModel,
    target: Paragraphs,
    source: Paragraphs,
    heads: Sequence[HeadRef | str] = DEFAULT_HEADS,
    *,
    positions: Sequence[int] | Tensor | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> HeadIntervention:
    """Patch heads' outputs from a source run into a target run (paper section 6, A.3).

    Args:
        model: the model (not changed).
        target: the paragraphs whose continuation is scored.
        source: paragraphs whose activations are patched in, row-aligned with ``target``.
        heads: the heads; default L1H2.
        positions: positions to patch; default all.
        batch_size: paragraphs per forward pass.
        progress: show a progress bar.
    """
    parsed = _heads(model, heads)
    check_set(model, target, "target")
    check_pair(model, target, source, "source", aligned=True)
    check_positive_int(batch_size, "batch_size")
    return _intervene(
        model,
        target,
        parsed,
        "patch",
        source,
        None,
        chosen_positions(positions, target.seq_len),
        batch_size,
        progress,
    )


def ablate_heads(
    model: HookedModel,
    paragraphs: Paragraphs,
    heads: Sequence[HeadRef | str] = DEFAULT_HEADS,
    *,
    kind: Literal["zero", "mean"] = "zero",
    mean_over: Paragraphs | None = None,
    positions: Sequence[int] | Tensor | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> HeadIntervention:
    """Zero- or mean-ablate heads and measure recall of the continuation.

    Args:
        model: the model (not changed).
        paragraphs: the paragraphs whose continuation is scored.
        heads: the heads; default L1H2.
        kind: ``"zero"`` or ``"mean"`` (mean of ``hook_z`` per position over ``mean_over``).
        mean_over: the paragraphs to average over, for mean ablation.
        positions: positions to ablate; default all.
        batch_size: paragraphs per forward pass.
        progress: show a progress bar.
    """
    if kind not in ("zero", "mean"):
        raise ValueError(f"kind must be 'zero' or 'mean', got {kind!r}")
    _check_kind(kind, None, mean_over)
    parsed = _heads(model, heads)
    check_set(model, paragraphs, "paragraphs")
    check_positive_int(batch_size, "batch_size")
    if mean_over is not None:
        check_pair(model, paragraphs, mean_over, "mean_over")
    return _intervene(
        model,
        paragraphs,
        parsed,
        kind,
        None,
        mean_over,
        chosen_positions(positions, paragraphs.seq_len),
        batch_size,
        progress,
    )


def patching_sweep(
    model: HookedModel,
    target: Paragraphs,
    source: Paragraphs | None = None,
    *,
    kind: Kind = "patch",
    mean_over: Paragraphs | None = None,
    positions: Sequence[int] | Tensor | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> PatchingSweep:
    """Intervene on every head of every layer, one head at a time, batched.

    Per batch and layer: one run of the target up to the layer (cached residual stream), then
    the rest of the model on all heads' variants stacked along the batch, so a batch of ``B``
    paragraphs runs ``n_heads * B`` rows from that layer on.

    Args:
        model: the model (not changed).
        target: the paragraphs whose continuation is scored.
        source: paragraphs patched in (``kind="patch"``), row-aligned with ``target``.
        kind: ``"patch"``, ``"zero"`` or ``"mean"``.
        mean_over: paragraphs to average over (``kind="mean"``).
        positions: positions to intervene at; default all.
        batch_size: target paragraphs per batch (rows per forward: ``n_heads *`` this); on a
            CPU at most as many as keep those rows' largest activation within
            :data:`~memloc_tl.core.forward.CPU_ACTIVATION_BYTES` (GPT-Neo 125M: 2 paragraphs
            of 100 tokens; the organism: 13), which only changes the speed.
        progress: show a progress bar.
    """
    _check_kind(kind, source, mean_over)
    check_set(model, target, "target")
    if source is not None:
        check_pair(model, target, source, "source", aligned=True)
    if mean_over is not None:
        check_pair(model, target, mean_over, "mean_over")
    check_positive_int(batch_size, "batch_size")
    cfg = model.cfg
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    if on_cpu(model):  # stacked rows within the CPU's budget
        batch_size = min(batch_size, max(1, cpu_rows(model, target.seq_len) // n_heads))
    chosen = chosen_positions(positions, target.seq_len)
    # a source equal to the target up to some position (a PMP) changes nothing before it
    reuse = (
        kind == "patch"
        and source is not None
        and shares_prefix_cache(model)
        and skips_early_blocks(model)
    )
    layers = list(range(n_layers))
    means = mean_head_outputs(model, mean_over, layers) if kind == "mean" and mean_over else None
    delta_nll = torch.zeros(n_layers, n_heads, len(target))
    delta_em = torch.zeros(n_layers, n_heads, len(target), dtype=torch.long)
    order = torch.arange(len(target))
    if reuse and source is not None:  # batch the rows that change late together
        changes = first_differences(target.tokens, source.tokens)
        order = changes.argsort(descending=True, stable=True)
    with torch.no_grad(), shared_unembedding():
        for start in tqdm(range(0, len(target), batch_size), desc="sweep", disable=not progress):
            rows = order[start : start + batch_size]
            tokens = target.tokens[rows].to(cfg.device)
            b, seq = tokens.shape
            source_tokens = source.tokens[rows].to(cfg.device) if source is not None else None
            first = (
                first_difference(tokens, source_tokens, target.prefix_len)
                if reuse and source_tokens is not None
                else 0
            )
            # one run of the batch: its scores, every layer's input and (reuse) keys and values
            starts = layer_starts(model, tokens, target.prefix_len, keys_values=first > 0)
            if starts.prefix is None:  # no keys and values kept (a bridge that cannot): all
                first = 0
            base_em, base_nll = exact_match_length(starts.greedy_match), starts.token_nll.mean(-1)
            replacement = _replacements(
                model, kind, layers, source_tokens, means, (b, seq, n_heads, cfg.d_head)
            )
            stacked_tokens = tokens.repeat(n_heads, 1)
            reused: dict[str, Any] = {}
            if starts.prefix is not None:  # the keys and values before ``first``, every copy
                copies = torch.arange(b).repeat(n_heads)
                reused["past_kv_cache"] = starts.prefix.cache(copies, first)
            for layer in layers:
                replace_own_head = make_each_head_replace_hook(
                    replacement[layer][:, first:], _shifted(chosen, first)
                )
                with model.hooks(fwd_hooks=[(hook_name("z", layer), replace_own_head)]):
                    match, token_nll = score_continuations(
                        model,
                        stacked_tokens,
                        target.prefix_len,
                        **starts(layer, n_heads),
                        **reused,
                    )
                em = exact_match_length(match).view(n_heads, b)
                nll = token_nll.mean(-1).view(n_heads, b)
                delta_em[layer, :, rows] = (em - base_em).cpu()
                delta_nll[layer, :, rows] = (nll - base_nll).cpu()
    return PatchingSweep(kind=kind, paragraphs=target, delta_nll=delta_nll, delta_em=delta_em)
