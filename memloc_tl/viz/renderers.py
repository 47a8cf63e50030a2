"""Which figure draws which result: the table :func:`memloc_tl.core.rendering.render` reads.

One entry per result type and view, under the type's qualified name (see
:mod:`memloc_tl.core.rendering`); a test checks that every name resolves to a class and that every
public result type with a ``figure`` has an entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memloc_tl.core.rendering import renders
from memloc_tl.viz import figures

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from memloc_tl.analysis.perturbation import PrefixPerturbation
    from memloc_tl.localization.benchmark import DeletionBenchmark, InjectionBenchmark

TABLE: dict[tuple[str, str], Any] = {
    ("memloc_tl.core.results.HeadScores", "figure"): figures.head_scores_figure,
    ("memloc_tl.core.results.TokenScores", "figure"): figures.token_scores_figure,
    ("memloc_tl.core.results.LayerComponentScores", "figure"): figures.layer_component_figure,
    ("memloc_tl.memorization.MemorizationScan", "figure"): figures.exact_match_figure,
    ("memloc_tl.uncertainty.HeadRanking", "figure"): figures.ranking_figure,
    ("memloc_tl.analysis.patching.HeadIntervention", "figure"): figures.intervention_figure,
    (
        "memloc_tl.analysis.gradients.GradientComparison",
        "figure",
    ): figures.gradient_comparison_figure,
    ("memloc_tl.editing.sparse_edit.EditResult", "figure"): figures.edit_result_figure,
    ("memloc_tl.localization.units.Localization", "figure"): figures.localization_figure,
    ("memloc_tl.localization.injection.Injection", "figure"): figures.injection_result_figure,
    ("memloc_tl.checkpoints.timeline.MemorizationTimeline", "figure"): figures.timeline_figure,
    ("memloc_tl.checkpoints.timeline.MemorizationTimeline", "heatmap"): figures.timeline_heatmap,
    ("memloc_tl.checkpoints.heads.HeadTimeline", "figure"): figures.head_timeline_figure,
    ("memloc_tl.checkpoints.drift.MaskDrift", "figure"): figures.mask_drift_figure,
}
"""The renderers that take the result as it is."""

for (kind, view), function in TABLE.items():
    renders(kind, view)(function)


@renders("memloc_tl.analysis.perturbation.PrefixPerturbation")
def perturbation_figure(result: PrefixPerturbation, name: str = "paragraphs") -> go.Figure:
    """The EM drop per perturbed position of one perturbation result."""
    return figures.em_drop_figure((name, result))


@renders("memloc_tl.localization.benchmark.InjectionBenchmark")
def injection_figure(result: InjectionBenchmark) -> go.Figure:
    """INJ: each localizer's recall of the injected units."""
    return figures.benchmark_figure(result.summary(), "recall", "INJ: recall of the injected units")


@renders("memloc_tl.localization.benchmark.DeletionBenchmark")
def deletion_figure(result: DeletionBenchmark) -> go.Figure:
    """DEL: each localizer's specificity."""
    return figures.benchmark_figure(
        result.summary(), "specificity", "DEL: target EM drop minus others' EM drop"
    )
