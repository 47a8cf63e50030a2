"""Renderers: plotly figures of the result types and circuitsvis views of attention and tokens.

The only package that imports plotly and circuitsvis. Result types draw themselves through it
(``result.figure()``), importing it lazily.
"""

from memloc_tl.viz.figures import (
    edit_comparison_figure,
    em_drop_figure,
    gradient_comparison_figure,
    head_scores_figure,
    layer_component_figure,
)
from memloc_tl.viz.tokens import attention_view, token_view

__all__ = [
    "attention_view",
    "edit_comparison_figure",
    "em_drop_figure",
    "gradient_comparison_figure",
    "head_scores_figure",
    "layer_component_figure",
    "token_view",
]
