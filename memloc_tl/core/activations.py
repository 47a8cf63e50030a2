"""The MLP's ``gelu_new``, leaner: cache-sized chunks in place outside autograd, and only its
input saved for the backward pass.

TransformerLens computes GPT-2's and GPT-Neo's ``gelu_new``,
``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``, as six separate operations (so does
Hugging Face's ``NewGELUActivation``), each making and passing over a ``[batch, pos, d_mlp]``
tensor far larger than a CPU core's cache.

Outside autograd, :func:`gelu_new_in_chunks` runs the same operations, in the same order and
dtype, in place on chunks of :data:`CHUNK` elements, so that each chunk stays in the cache for
all six: the same values bit for bit (every operation is elementwise and rounds as before).
For 27 rows of 100 tokens of GPT-Neo 125M's MLP (d_mlp 3072, float32), timed alone on 2 cores
of an Intel Xeon with AVX-512 (best of 20), it took 5.3 ms against TransformerLens's 29.3 ms.
Every forward memloc-tl runs outside autograd computes its ``gelu_new`` so
(:func:`~memloc_tl.core.backend.final_residual`); the scan's gain is in docs/benchmarks.md.

With autograd recording, autograd keeps three ``[batch, pos, d_mlp]`` intermediates of it
besides its input (the ``tanh``, ``0.5 x`` and ``1 + tanh``). :class:`LeanGeluNew` computes
the same values (by :func:`gelu_new_in_chunks`) and saves only the input; its backward
evaluates the derivative from it,

    d/dx gelu_new(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2 / pi) (1 + 3 * 0.044715 x^2),

with ``t = tanh(sqrt(2 / pi) (x + 0.044715 x^3))``, equal to autograd's to float rounding.
:func:`lean_activations` puts both in a model's MLPs for a block of code, a
HookedTransformer's or a bridge's (hooks on ``hook_pre`` / ``hook_post`` fire as before, with
the same values); block checkpointing uses :class:`LeanGeluNew`, which takes 56 MiB (0.09
models) off each block a backward pass recomputes or keeps on GPT-Neo 125M's layout, for a
batch of 16 paragraphs. A forward recorded outside checkpointing keeps the model's own
function, so its gradients stay bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715

CHUNK = 1 << 18
"""Elements :func:`gelu_new_in_chunks` computes at a time on a CPU: 1 MiB of float32, within a
CPU core's L2 cache. (A multiple of every SIMD width, so no chunk splits a vector.) On other
devices the whole tensor is one chunk."""

#: Set to False to run the model's own ``gelu_new`` outside autograd too (the benchmarks time
#: both in one run: ``benchmarks/scan.py --compare``).
CHUNKED = True


def gelu_new_in_chunks(x: Tensor, function: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``gelu_new(x)``, ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))``, as
    TransformerLens and Hugging Face compute it (the same six operations, in the same order,
    in ``x``'s dtype), in place on chunks of :data:`CHUNK` elements of a new tensor: the same
    values, with each chunk in the cache for all six. Autograd does not see it; under
    autocast, for a tensor that is not contiguous or not floating point, and with autograd
    recording ``x``, ``function`` (the model's own ``gelu_new``) runs instead."""
    if (
        not CHUNKED
        or (torch.is_grad_enabled() and x.requires_grad)
        or torch.is_autocast_enabled(x.device.type)
        or not x.is_floating_point()
        or not x.is_contiguous()
    ):
        if function is None:
            raise ValueError("gelu_new_in_chunks needs the function to fall back to")
        return function(x)
    out = torch.empty_like(x)
    flat, result = x.view(-1), out.view(-1)
    # a GPU has no cache to keep a chunk in, only launches to pay: the whole tensor at once
    size = CHUNK if x.device.type == "cpu" else max(flat.numel(), 1)
    for first in range(0, flat.numel(), size):
        chunk, t = flat[first : first + size], result[first : first + size]
        torch.pow(chunk, 3.0, out=t)  # x^3
        t.mul_(_CUBIC).add_(chunk)  # x + 0.044715 x^3 (an addition is commutative)
        t.mul_(_SQRT_2_OVER_PI).tanh_().add_(1.0)  # 1 + tanh(...)
        t.mul_(chunk * 0.5)  # 0.5 x (1 + tanh(...))
    return out


class LeanGeluNew(torch.autograd.Function):
    """``gelu_new`` (computed by ``function``) that saves only its input for the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, function: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.save_for_backward(x)
        # autograd is off in here: the function's own values (chunk by chunk where it can)
        return gelu_new_in_chunks(x, function)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor, None]:
        (grad,) = grad_outputs
        (x,) = ctx.saved_tensors
        # in place where possible: three temporaries of x's size at a time
        square = x * x
        slope = square.mul(3.0 * _CUBIC).add_(1.0).mul_(_SQRT_2_OVER_PI)
        t = square.mul_(_CUBIC).add_(1.0).mul_(x).mul_(_SQRT_2_OVER_PI).tanh_()
        derivative = (t * t).neg_().add_(1.0).mul_(x).mul_(slope).mul_(0.5)
        derivative.add_(t.add_(1.0).mul_(0.5))
        return derivative.mul_(grad), None


def _is_gelu_new(function: object) -> bool:
    return getattr(function, "__name__", None) == "gelu_new" and getattr(
        function, "__module__", ""
    ).startswith("transformer_lens")


def _is_new_gelu_module(module: torch.nn.Module) -> bool:
    """Hugging Face's ``NewGELUActivation`` (GPT-2's and GPT-Neo's MLPs, under a bridge)."""
    kind = type(module)
    return (
        kind.__name__ == "NewGELUActivation"
        and kind.__module__.startswith("transformers")
        # its own forward, not a kernel put in its place
        and getattr(kind.forward, "__module__", "") == kind.__module__
    )


@contextlib.contextmanager
def lean_activations(model: torch.nn.Module, *, backward: bool = True) -> Iterator[int]:
    """Inside the block, each ``gelu_new`` MLP activation of ``model`` runs leaner, with the
    same values: a TransformerLens MLP's ``act_fn``, or the ``forward`` of a Hugging Face
    ``NewGELUActivation`` (a bridge's MLPs). Outside autograd it runs
    :func:`gelu_new_in_chunks`; with autograd recording its input, :class:`LeanGeluNew` (less
    saved for the backward, gradients equal to float rounding) if ``backward``, else the
    model's own function (gradients bit for bit). An inner block's choice holds inside it.
    Everything is put back on exit, also after an error. Yields how many activations were
    changed (0 for other activation functions)."""
    swapped: list[tuple[torch.nn.Module, str, Callable[[Tensor], Tensor] | None]] = []
    try:
        for module in model.modules():
            function = module.__dict__.get("act_fn")
            if _is_gelu_new(_original(function)):
                swapped.append((module, "act_fn", function))  # type: ignore[arg-type]
                module.__dict__["act_fn"] = _lean(_original(function), backward)
            elif _is_new_gelu_module(module):
                own = module.__dict__.get("forward")
                if own is not None and not hasattr(own, "memloc_original"):
                    continue  # somebody else's forward on this instance: theirs runs
                swapped.append((module, "forward", own))
                module.__dict__["forward"] = _lean(_original(module.forward), backward)
        yield len(swapped)
    finally:
        for module, attribute, previous in reversed(swapped):
            if previous is None:  # the class's forward again
                del module.__dict__[attribute]
            else:
                module.__dict__[attribute] = previous


def _original(function: Any) -> Any:
    """The model's own function behind one of :func:`_lean`'s (or ``function`` itself)."""
    return getattr(function, "memloc_original", function)


def _lean(function: Callable[[Tensor], Tensor], backward: bool) -> Callable[[Tensor], Tensor]:
    """``function`` (``gelu_new``), leaner (see :func:`lean_activations`)."""

    def lean_gelu_new(x: Tensor) -> Tensor:
        if backward and torch.is_grad_enabled() and x.requires_grad:
            return LeanGeluNew.apply(x, function)  # type: ignore[no-any-return]
        return gelu_new_in_chunks(x, function)

    lean_gelu_new.memloc_original = function  # type: ignore[attr-defined]
    return lean_gelu_new
