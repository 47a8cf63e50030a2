"""The only code that changes weights: masks, the masked optimizer, sparse edits."""

from memloc_tl.editing.masks import ParamMask
from memloc_tl.editing.optimizer import MaskedOptimizer

__all__ = ["MaskedOptimizer", "ParamMask"]
