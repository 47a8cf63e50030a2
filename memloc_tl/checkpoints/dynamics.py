"""Memorization over training in one call: the timeline, the heads over steps, and what they say."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
from jaxtyping import Int
from torch import Tensor

from memloc_tl.checkpoints.heads import (
    HeadTimeline,
    check_named_inputs,
    localize_over_checkpoints,
)
from memloc_tl.checkpoints.series import (
    CheckpointSeries,
    check_inputs,
)
from memloc_tl.checkpoints.timeline import (
    MemorizationTimeline,
    scan_checkpoints,
)
from memloc_tl.core.paragraphs import Paragraphs
from memloc_tl.core.results import Drawable


@dataclass(frozen=True)
class TrainingDynamics(Drawable):
    """When paragraphs became memorized, and how the top heads evolved: what the report's
    "over training" section and ``memloc demo`` show (:func:`training_dynamics`).

    Attributes:
        timeline: EM and NLL of every paragraph at every step.
        heads: head analyses of the memorized paragraphs at every step (rare-token
            attention; patching too when a source was given).
    """

    timeline: MemorizationTimeline
    heads: tuple[HeadTimeline, ...]

    def findings(self) -> list[str]:
        """One line on when the paragraphs became memorized, then one per head analysis."""
        first = self.timeline.first_memorized_step()
        reached = [step for step in first.values() if step is not None]
        n = len(first)
        if not reached:
            lines = [
                f"None of the {n} paragraphs is memorized at any of the "
                f"{len(self.timeline.steps)} checkpoints."
            ]
        else:
            counts = ", ".join(
                f"step {step}: {sum(s == step for s in reached)}" for step in sorted(set(reached))
            )
            forgotten = self.timeline.forgetting_events()
            lines = [
                f"{len(reached)} of {n} paragraphs are memorized at some checkpoint (steps "
                f"{', '.join(map(str, self.timeline.steps))}); first memorized at {counts}; "
                + (
                    f"{len(forgotten)} forgetting events (first: {forgotten[0][0]} at step "
                    f"{forgotten[0][1]})."
                    if forgotten
                    else "none is forgotten once memorized."
                )
            ]
        return lines + [heads.answer(self.timeline) for heads in self.heads]

    def to_frame(self) -> pd.DataFrame:
        """The timeline in long format (step, id, exact_match, nll, memorized)."""
        return self.timeline.to_frame()

    def figure(self) -> Any:
        """Paragraphs x steps, EM as color (the timeline's heatmap)."""
        return self.timeline.heatmap()

    def __repr__(self) -> str:
        analyses = ", ".join(h.analysis for h in self.heads)
        return f"TrainingDynamics({self.timeline!r}; heads by {analyses})"


def training_dynamics(
    series: CheckpointSeries,
    memorized: Paragraphs,
    corpus_counts: Int[Tensor, " d_vocab"],
    *,
    others: Paragraphs | None = None,
    source: Paragraphs | None = None,
    progress: bool = True,
) -> TrainingDynamics:
    """The timeline of ``memorized`` (and ``others``), and the rare-token heads (and, with
    ``source``, the patching sweep) of ``memorized``, at every step.

    Args:
        series: the checkpoints.
        memorized: the paragraphs whose heads are followed (e.g. those the final model
            memorized).
        corpus_counts: unigram counts for the rare-token analysis.
        others: more paragraphs for the timeline (e.g. non-memorized ones).
        source: paragraphs row-aligned with ``memorized`` to patch from (e.g.
            ``perturb_prefixes(final_model, memorized).perturbed``): then the patching sweep
            from them runs at every step too, with the same inputs at every step.
        progress: progress bars.
    """
    check_inputs(series, memorized)
    if source is not None:
        check_named_inputs("patching", memorized, corpus_counts, source, None)
    followed = memorized if others is None else Paragraphs.concat(memorized, others)
    timeline = scan_checkpoints(series, followed, progress=progress)
    heads = [
        localize_over_checkpoints(series, memorized, corpus_counts=corpus_counts, progress=progress)
    ]
    if source is not None:
        heads.append(
            localize_over_checkpoints(
                series, memorized, analysis="patching", source=source, progress=progress
            )
        )
    return TrainingDynamics(timeline, tuple(heads))
