"""The unembedding of memloc-tl's forwards: one copy of ``W_U`` per loop, not one per forward.

TransformerLens 3.9's ``Unembed.forward`` multiplies by ``W_U.T.contiguous()``: at every call
it copies a ``[d_vocab, d_model]`` matrix, a quarter of GPT-Neo 125M (154 MB in float32), before
the product. A scan, a patching sweep or a perturbation makes one forward per batch, so it
makes that copy again and again from the same weights. Inside :func:`shared_unembedding`, every
no-grad unembedding that :func:`unembed` runs on such a model multiplies by one contiguous copy
per weight (and per autocast dtype), made at its first use in the block and dropped on exit:
the same values in the same memory layout, so the logits are bit-identical to TransformerLens's
forward (tested in ``tests/core/test_unembedding.py``), with the hooks ``unembed.hook_in`` and
``unembed.hook_out`` firing as there. On GPT-Neo 125M's layout, sharing it made a CPU scan
1.05x faster (27 windows per forward; docs/benchmarks.md).

A copy is tied to the tensor it was made from and to that tensor's version counter: a weight
replaced for a call (:func:`~memloc_tl.core.backend.replaced_weights`) or changed in place
gets its own copy. With autograd recording, on a TransformerBridge (Hugging Face's
unembedding makes no copy), on other TransformerLens versions (:data:`CHECKED_VERSIONS`) or
for an unembedding with its own forward, the model's forward runs as it is.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from memloc_tl.core.backend import HookedModel
from memloc_tl.core.versions import checked_class

#: TransformerLens versions (major.minor) whose ``Unembed.forward`` was checked to multiply by
#: ``W_U.T.contiguous()`` with ``F.linear``; on others the model's own forward runs.
CHECKED_VERSIONS = ("3.9",)

#: Set to False to run TransformerLens's own unembedding (a copy per call) everywhere (the
#: benchmarks time both in one run: ``benchmarks/scan.py --compare``).
ENABLED = True


@dataclass(frozen=True, eq=False)  # compared by identity
class _Copy:
    source: Tensor  # the W_U it was made from (held, so that its id is not reused)
    version: int  # the source's version counter when the copy was made
    dtype: torch.dtype | None  # the autocast dtype it is cast to, or None
    weight: Tensor  # [d_vocab, d_model], contiguous


_COPIES: contextvars.ContextVar[list[_Copy] | None] = contextvars.ContextVar(
    "memloc_tl_unembedding_copies", default=None
)


@contextlib.contextmanager
def shared_unembedding() -> Iterator[None]:
    """Inside the block, no-grad unembeddings through :func:`unembed` share one contiguous
    copy of each ``W_U.T`` (see the module's docstring); a nested block shares the outer one's.
    The copies are dropped on exit, also after an error."""
    if _COPIES.get() is not None:
        yield
        return
    token = _COPIES.set([])
    try:
        yield
    finally:
        _COPIES.reset(token)


@functools.cache
def _unembed_class() -> type[torch.nn.Module] | None:
    """TransformerLens's ``Unembed``, where its version is one of the checked ones."""
    return checked_class(CHECKED_VERSIONS, "transformer_lens.components.unembed", "Unembed")


def shares_copy(model: HookedModel) -> bool:
    """Whether ``model``'s unembedding is the one :func:`shared_unembedding` makes one copy
    for: TransformerLens's own ``Unembed`` (a checked version, its class's forward; a
    TransformerBridge's unembedding is Hugging Face's, which makes no copy)."""
    base = _unembed_class()
    if not ENABLED or base is None:
        return False
    module = getattr(model, "unembed", None)
    return (
        type(module) is base
        and "forward" not in module.__dict__
        and isinstance(getattr(module, "W_U", None), Tensor)
    )


def unembed(model: HookedModel, normalized: Tensor) -> Tensor:
    """``model.unembed(normalized)``: inside :func:`shared_unembedding` and without autograd
    recording, with the block's one contiguous copy of ``W_U.T``; the same logits."""
    copies = _COPIES.get()
    if copies is None or torch.is_grad_enabled() or not shares_copy(model):
        return model.unembed(normalized)
    module = model.unembed
    return module.hook_out(
        F.linear(module.hook_in(normalized), _copy(copies, module.W_U), module.b_U)
    )


def _copy(copies: list[_Copy], weight: Tensor) -> Tensor:
    """The block's contiguous ``weight.T`` (cast as autocast would cast it), made once."""
    device = weight.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    for copy in copies:
        if copy.source is weight and copy.version == weight._version and copy.dtype == dtype:
            return copy.weight
    # an older version's copies are dropped
    copies[:] = [c for c in copies if c.source is not weight or c.version == weight._version]
    contiguous = weight.detach().T.contiguous()
    if dtype is not None and contiguous.is_floating_point() and contiguous.dtype != torch.float64:
        contiguous = contiguous.to(dtype)  # what autocast's cast gives (it leaves float64 be)
    copies.append(_Copy(weight, weight._version, dtype, contiguous))
    return contiguous
