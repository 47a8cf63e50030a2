"""Renderers: plotly figures of the result types and circuitsvis views of attention and tokens.

The only package that imports plotly and circuitsvis, and the top of the package: nothing
else imports it (the import linter checks), except the report and the command, which lay out
pages. Result types draw themselves with ``result.figure()``, which asks
:func:`memloc_tl.core.rendering.render`; importing this package registers the renderers
(:mod:`memloc_tl.viz.renderers`).
"""

from memloc_tl.viz import renderers as renderers  # registers every result type's figure
from memloc_tl.viz.figures import (
    benchmark_figure,
    edit_comparison_figure,
    edit_result_figure,
    em_drop_figure,
    exact_match_figure,
    gradient_comparison_figure,
    head_scores_figure,
    head_timeline_figure,
    intervention_figure,
    layer_component_figure,
    localization_figure,
    mask_drift_figure,
    ranking_figure,
    timeline_figure,
    timeline_heatmap,
    token_scores_figure,
)
from memloc_tl.viz.html import CircuitsView, HtmlPage, circuitsvis_js, notebook_mode, plotly_js
from memloc_tl.viz.tokens import attention_figure, attention_view, rarity_view, token_view

__all__ = [
    "CircuitsView",
    "HtmlPage",
    "attention_figure",
    "attention_view",
    "benchmark_figure",
    "circuitsvis_js",
    "edit_comparison_figure",
    "edit_result_figure",
    "em_drop_figure",
    "exact_match_figure",
    "gradient_comparison_figure",
    "head_scores_figure",
    "head_timeline_figure",
    "intervention_figure",
    "layer_component_figure",
    "localization_figure",
    "mask_drift_figure",
    "notebook_mode",
    "plotly_js",
    "ranking_figure",
    "rarity_view",
    "timeline_figure",
    "timeline_heatmap",
    "token_scores_figure",
    "token_view",
]
