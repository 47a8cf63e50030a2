"""The lean gelu_new: TransformerLens's values, autograd's gradients, less saved, nothing left."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from memloc_tl.core.activations import LeanGeluNew, lean_activations
from memloc_tl.core.backend import gradients, parameters_of
from memloc_tl.core.objectives import attributed_weights, grad_only_for
from memloc_tl.organism import Organism

pytestmark = pytest.mark.backend  # run 2 (TransformerLens 4): the bridge's Hugging Face MLPs


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """gelu_new written out here, independently of TransformerLens."""
    inner = (2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x.pow(3))
    return 0.5 * x * (1.0 + torch.tanh(inner))


def test_the_backward_is_the_derivative() -> None:
    x = torch.randn(3, 5, 17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: LeanGeluNew.apply(v, _gelu_new), (x,))
    # float32 at a 125M MLP's scale: autograd's gradient to float rounding
    x = 3 * torch.randn(4, 50, 512, generator=torch.Generator().manual_seed(0))
    plain, lean = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    _gelu_new(plain).backward(upstream)
    out = LeanGeluNew.apply(lean, _gelu_new)
    assert torch.equal(out, _gelu_new(x))  # the function's own values
    out.backward(upstream)
    torch.testing.assert_close(lean.grad, plain.grad, rtol=1e-5, atol=1e-5)


def test_in_a_model_the_same_values_and_gradients_less_saved_and_put_back(
    organism: Organism, unchanged: Any
) -> None:
    """On both backends: TransformerLens's act_fn (a HookedTransformer) or Hugging Face's
    NewGELUActivation (a bridge) is swapped for the block, and put back."""
    model = organism.model
    tokens = organism.planted.tokens[:4]
    d_mlp, n_layers = model.cfg.d_mlp, model.cfg.n_layers
    chosen = {name: w for name, w in attributed_weights(model).items() if "mlp" in name}
    runs = {}
    for lean in (False, True):
        saved: list[int] = []
        posts: list[torch.Tensor] = []

        def pack(tensor: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        hook = ("blocks.1.mlp.hook_post", lambda a, hook, out=posts: out.append(a.detach()))
        with (
            unchanged(model),
            grad_only_for(model, parameters_of(chosen)),
            model.hooks(fwd_hooks=[hook]),
        ):
            scope = lean_activations(model) if lean else contextlib.nullcontext()
            with scope as swapped, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits = model(tokens)
            grads = gradients(logits.square().mean(), chosen)
        assert swapped == (n_layers if lean else None)
        runs[lean] = (logits.detach(), grads, sum(saved), posts[0])
    (plain, plain_grads, plain_bytes, plain_post), (ours, our_grads, our_bytes, our_post) = (
        runs[False],
        runs[True],
    )
    kind = type(model).__name__
    assert torch.equal(ours, plain), kind  # bit for bit: the forward is the function itself
    assert torch.equal(our_post, plain_post), kind  # hooks see the same activations
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    # three [batch, pos, d_mlp] float32 tensors fewer per layer: tanh, 0.5 x, 1 + tanh
    assert plain_bytes - our_bytes == 3 * tokens.numel() * d_mlp * 4 * n_layers, kind
    # put back on an error too
    with unchanged(model), pytest.raises(RuntimeError, match="inside"), lean_activations(model):
        raise RuntimeError("inside")
