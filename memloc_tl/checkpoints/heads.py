"""Where a paragraph is localized at each step: one head-level analysis at every checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.analysis.patching import patching_sweep
from memloc_tl.analysis.rare_tokens import rare_token_attention
from memloc_tl.checkpoints.series import (
    CheckpointSeries,
    check_inputs,
    load_for,
)
from memloc_tl.checkpoints.timeline import (
    MemorizationTimeline,
)
from memloc_tl.core.backend import HookedModel
from memloc_tl.core.heads import HeadRef
from memloc_tl.core.paragraphs import Paragraphs
from memloc_tl.core.rendering import render
from memloc_tl.core.results import Drawable, HeadScores
from memloc_tl.localization.localizers import METHODS, localize, needs_keep
from memloc_tl.uncertainty import Order


def head_localizers() -> tuple[str, ...]:
    """The head-level localizers of :func:`~memloc_tl.localization.localizers.localize` that
    :func:`localize_over_checkpoints` runs by name (their scores rank largest first), those
    added with :func:`~memloc_tl.register_localizer` included."""
    return tuple(m for m in METHODS["heads"] if m != "random")


def analyses() -> dict[str, Order]:
    """The named head analyses and which end of their score ranks first: rare-token attention
    (the pooled mean Kendall tau of attention against frequency rank: most negative = attends
    most to rare tokens), the exact activation-patching sweep (the mean continuation-NLL
    increase when the head's output is patched in from ``source``, e.g. the final model's
    perturbed prefixes), and the head localizers of ``localize(level="heads")``
    (``"zero_ablation"``: the NLL increase when the head alone is zeroed; ``"activation"`` and
    ``"learned"`` need ``keep``; a registered localizer as it was registered)."""
    return {
        "rare_tokens": "smallest",
        "patching": "largest",
        **dict.fromkeys(head_localizers(), "largest"),
    }


@dataclass(frozen=True)
class HeadTimeline(Drawable):
    """One head-level score at every checkpoint of a series.

    Attributes:
        name: the series' name.
        analysis: what the score is.
        order: which end of the score ranks first (``"largest"`` or ``"smallest"``).
        steps: the training steps.
        scores: ``[n_steps, n_layers, n_heads]``.
        n_paragraphs: paragraphs each step's score was computed from.
        score: what one score is, as the analysis names it (e.g. ``"patch: mean dNLL"``).
    """

    name: str
    analysis: str
    order: Order
    steps: tuple[int, ...]
    scores: Float[Tensor, "n_steps n_layers n_heads"]
    n_paragraphs: int
    score: str = ""

    def at(self, step: int) -> HeadScores:
        """The scores at ``step`` (one of :attr:`steps`)."""
        if step not in self.steps:
            raise ValueError(f"no checkpoint at step {step}; the steps are {list(self.steps)}")
        return HeadScores(self.analysis, self.scores[self.steps.index(step)])

    def final_top(self) -> HeadRef:
        """The top head at the last step."""
        return self.at(self.steps[-1]).top(1, order=self.order)[0][0]

    def rank_over_steps(self, head: HeadRef | str | None = None) -> dict[int, int]:
        """``head``'s rank (1 = first) at every step; default the last step's top head."""
        head = self.final_top() if head is None else head
        return {step: self.at(step).rank(head, order=self.order) for step in self.steps}

    def first_step_ranked_first(self, head: HeadRef | str | None = None) -> int | None:
        """The first step from which ``head`` ranks first at every later step (``None``: it is
        not first at the last step)."""
        ranks = list(self.rank_over_steps(head).items())
        first = None
        for step, rank in reversed(ranks):
            if rank != 1:
                break
            first = step
        return first

    def answer(self, timeline: MemorizationTimeline) -> str:
        """Did the last step's top head rank first before the paragraphs became memorized?"""
        head = self.final_top()
        since = self.first_step_ranked_first(head)
        memorized = [s for s in timeline.first_memorized_step().values() if s is not None]
        n_heads = self.scores[0].numel()
        ranks = ", ".join(f"{step}: {rank}" for step, rank in self.rank_over_steps(head).items())
        line = (
            f"{head} is the top head by {self.analysis} at the last step (step {self.steps[-1]}, "
            f"n = {self.n_paragraphs} paragraphs); its rank of {n_heads} at each step: {ranks}. "
        )
        if not memorized:
            return line + "No paragraph of the timeline is memorized at any step."
        assert since is not None  # the last step's top head ranks first at the last step
        before = sum(step > since for step in memorized)
        return line + (
            f"It ranks first from step {since} on; {before} of the {len(memorized)} paragraphs "
            f"memorized at some step became memorized after that step (first memorized: steps "
            f"{min(memorized)} to {max(memorized)}): "
            + (
                "the head was in place before they were memorized."
                if before == len(memorized)
                else "the head was not in place before all of them were memorized."
            )
            + " (Point estimates at checkpoint resolution: a paragraph first memorized at the "
            "step the head first ranks first counts as not after it.)"
        )

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per step and head (step, head, score, rank)."""
        rows = []
        for step in self.steps:
            scores = self.at(step)
            for rank, (head, score) in enumerate(
                scores.top(scores.scores.numel(), order=self.order), 1
            ):
                rows.append({"step": step, "head": str(head), "score": score, "rank": rank})
        return pd.DataFrame(rows)

    def figure(self, k: int = 5) -> Any:
        """The score vs step of the last step's top ``k`` heads."""
        return render(self, k=k)

    def __repr__(self) -> str:
        return (
            f"HeadTimeline({self.analysis} over {len(self.steps)} steps of {self.name}: top at "
            f"the end {self.final_top()}, first from step {self.first_step_ranked_first()})"
        )


def localize_over_checkpoints(
    series: CheckpointSeries,
    paragraphs: Paragraphs,
    *,
    analysis: str | Callable[[HookedModel], HeadScores] = "rare_tokens",
    corpus_counts: Int[Tensor, " d_vocab"] | None = None,
    source: Paragraphs | None = None,
    keep: Paragraphs | None = None,
    order: Order | None = None,
    progress: bool = True,
) -> HeadTimeline:
    """Run one head analysis of ``paragraphs`` at every checkpoint (one model at a time).

    Args:
        series: the checkpoints.
        paragraphs: the paragraphs analyzed at every step (e.g. those memorized at the end).
        analysis: a name of :func:`analyses` (``"rare_tokens"``, ``"patching"``,
            ``"zero_ablation"``, ``"attribution"``, ...) or a function ``model -> HeadScores``
            (then give ``order``).
        corpus_counts: unigram counts, for ``"rare_tokens"``.
        source: for ``"patching"``: paragraphs row-aligned with ``paragraphs`` whose head
            outputs are patched in (e.g. the perturbed prefixes found on the final model, so
            that every step is patched with the same inputs).
        keep: for ``"activation"`` and ``"learned"``: paragraphs whose recall must not depend
            on the head (e.g. non-memorized ones).
        order: which end of a custom analysis' score ranks first.
        progress: show a progress bar over the checkpoints.
    """
    check_inputs(series, paragraphs)
    if callable(analysis):
        if order not in ("largest", "smallest"):
            raise ValueError("a custom analysis needs order='largest' or order='smallest'")
        run, name, chosen = analysis, getattr(analysis, "__name__", "custom analysis"), order
    elif isinstance(analysis, str) and analysis in (named := analyses()):
        check_named_inputs(analysis, paragraphs, corpus_counts, source, keep)
        run, name, chosen = (
            _named_analysis(analysis, paragraphs, corpus_counts, source, keep),
            analysis,
            named[analysis],
        )
    else:
        raise ValueError(
            f"analysis must be one of {sorted(analyses())} or a function model -> HeadScores, "
            f"got {analysis!r}"
        )
    scores, named = [], ""
    for checkpoint in tqdm(series, desc=f"{name} per checkpoint", disable=not progress):
        model = load_for(checkpoint, paragraphs)
        result = run(model)
        if not isinstance(result, HeadScores):
            raise TypeError(f"the analysis must return HeadScores, got {type(result).__name__}")
        scores.append(result.scores.detach().float().cpu())
        named = result.name
        del model, result  # released before the next checkpoint is loaded
    shapes = {tuple(s.shape) for s in scores}
    if len(shapes) > 1:
        raise ValueError(f"the checkpoints have different head layouts: {sorted(shapes)}")
    return HeadTimeline(
        name=series.name,
        analysis=name,
        order=chosen,
        steps=series.steps,
        scores=torch.stack(scores),
        n_paragraphs=len(paragraphs),
        score=named,
    )


def check_named_inputs(
    analysis: str,
    paragraphs: Paragraphs,
    corpus_counts: Tensor | None,
    source: Paragraphs | None,
    keep: Paragraphs | None,
) -> None:
    """What a named analysis needs, checked before any checkpoint loads."""
    if analysis == "rare_tokens" and corpus_counts is None:
        raise ValueError("analysis='rare_tokens' needs corpus_counts (corpus unigram counts)")
    if analysis == "patching":
        if not isinstance(source, Paragraphs):
            raise ValueError(
                "analysis='patching' needs source: paragraphs row-aligned with paragraphs whose "
                "head outputs are patched in (e.g. perturb_prefixes(final_model, ...).perturbed)"
            )
        if source.tokens.shape != paragraphs.tokens.shape or (
            source.prefix_len != paragraphs.prefix_len
        ):
            raise ValueError(
                f"source must be row-aligned with paragraphs: tokens {tuple(source.tokens.shape)}"
                f" (prefix {source.prefix_len}) vs {tuple(paragraphs.tokens.shape)} (prefix "
                f"{paragraphs.prefix_len})"
            )
    elif source is not None:
        raise ValueError(f"source goes with analysis='patching', not {analysis!r}")
    if needs_keep(analysis):
        if not isinstance(keep, Paragraphs) or not len(keep):
            raise ValueError(
                f"analysis={analysis!r} needs keep: paragraphs whose recall must not depend on "
                "the head (e.g. non-memorized ones)"
            )
    elif keep is not None:
        reading = [m for m in head_localizers() if needs_keep(m)]
        raise ValueError(f"keep goes with analysis in {reading}, not {analysis!r}")


def _named_analysis(
    analysis: str,
    paragraphs: Paragraphs,
    corpus_counts: Tensor | None,
    source: Paragraphs | None,
    keep: Paragraphs | None,
) -> Callable[[HookedModel], HeadScores]:
    if analysis == "rare_tokens":
        assert corpus_counts is not None
        return lambda model: (
            rare_token_attention(model, paragraphs, corpus_counts, progress=False).pooled_tau_mean
        )
    if analysis == "patching":
        return lambda model: (
            patching_sweep(model, paragraphs, source, progress=False).mean_delta_nll
        )
    return lambda model: localize(
        model,
        paragraphs,
        method=analysis,  # type: ignore[arg-type]  # one of head_localizers(), checked
        level="heads",
        keep=keep,
    ).head_scores()
