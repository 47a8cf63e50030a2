"""The only code that changes weights: masks, the masked optimizer, sparse edits."""

from memloc_tl.editing.masks import ParamMask
from memloc_tl.editing.optimizer import MaskedOptimizer
from memloc_tl.editing.sparse_edit import (
    EditConfig,
    EditResult,
    EvalSets,
    compare_edits,
    sparse_edit,
)
from memloc_tl.editing.weight_edit import WeightEdit

__all__ = [
    "EditConfig",
    "EditResult",
    "EvalSets",
    "MaskedOptimizer",
    "ParamMask",
    "WeightEdit",
    "compare_edits",
    "sparse_edit",
]
