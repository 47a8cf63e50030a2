"""The lean gelu_new: TransformerLens's values, autograd's gradients, less saved, nothing left."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from memloc_tl.core import activations
from memloc_tl.core.activations import LeanGeluNew, gelu_new_in_chunks, lean_activations
from memloc_tl.core.backend import gradients, parameters_of
from memloc_tl.core.forward import continuation_logits
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


def _references() -> list[Any]:
    """gelu_new as TransformerLens and Hugging Face compute it."""
    from transformer_lens.utilities.activation_functions import gelu_new
    from transformers.activations import NewGELUActivation

    return [gelu_new, NewGELUActivation()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_in_chunks_the_functions_own_values(dtype: torch.dtype) -> None:
    """Bit for bit against both libraries' gelu_new: less than a chunk, whole chunks, chunks
    with an odd tail, and infinities, NaN and values whose cube overflows."""
    generator = torch.Generator().manual_seed(0)
    chunk = activations.CHUNK
    for numel in (1000, 2 * chunk, 3 * chunk + 37):
        x = (4 * torch.randn(numel, generator=generator)).to(dtype)
        x[:6] = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e4, -1e4, 0.0])
        x = x.view(1, -1, 1) if numel % 2 else x.view(2, -1, 4)
        ours = gelu_new_in_chunks(x)
        assert ours.dtype == dtype
        assert ours.shape == x.shape
        for reference in _references():
            expected = reference(x)
            assert torch.equal(ours.isnan(), expected.isnan())
            assert torch.equal(ours.nan_to_num(), expected.nan_to_num()), (numel, reference)


def test_in_chunks_falls_back_where_it_must() -> None:
    """Under autocast, for a strided tensor and with autograd recording, the model's own
    function runs (and its gradient flows); without one to fall back to, a clear error."""
    x = torch.randn(4, 6, 8)
    calls: list[torch.Size] = []

    def own(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape)
        return _references()[0](t)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        gelu_new_in_chunks(x, own)
    strided = x.transpose(0, 2)
    assert torch.equal(gelu_new_in_chunks(strided, own), _references()[0](strided))
    recorded = x.clone().requires_grad_()
    gelu_new_in_chunks(recorded, own).sum().backward()
    assert recorded.grad is not None
    assert len(calls) == 3
    gelu_new_in_chunks(x, own)  # the fast path: no call
    assert len(calls) == 3
    with pytest.raises(ValueError, match="fall back"):
        gelu_new_in_chunks(strided)


def test_forwards_outside_autograd_and_nested_scopes(
    organism: Organism, unchanged: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On both backends a scoring forward (several chunks of MLP activations) gives the
    model's own logits bit for bit; an inner scope's choice holds inside it and the outer
    one's is back after it; a recording forward keeps the model's own function."""
    model = organism.model
    p = organism.planted.prefix_len
    tokens = torch.cat([organism.planted.tokens, organism.control.tokens])[:7]
    monkeypatch.setattr(activations, "CHUNK", 4096)  # the tiny organism's MLP in 44 chunks
    assert (tokens.numel() * model.cfg.d_mlp) % 4096 != 0  # and a tail
    with torch.no_grad():
        expected = model(tokens)[:, p - 1 : -1]
    with unchanged(model), torch.no_grad():
        scored = continuation_logits(model, tokens, p)
    assert torch.equal(scored, expected)

    def state() -> list[Any]:
        """Each module's act_fn or instance forward (None where it has neither)."""
        return [m.__dict__.get("act_fn", m.__dict__.get("forward")) for m in model.modules()]

    def ours() -> list[Any]:
        return [f for f in state() if hasattr(f, "memloc_original")]

    def saved_numels(function: Any, x: torch.Tensor) -> list[int]:
        saved: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t
        ):
            function(x)
        return saved

    x = torch.randn(2, 3, model.cfg.d_mlp, requires_grad=True)
    with unchanged(model):
        before = state()
        assert ours() == []
        with lean_activations(model, backward=False) as outer:
            assert outer == model.cfg.n_layers
            outer_functions = ours()
            assert len(outer_functions) == outer
            with lean_activations(model) as inner:
                assert inner == outer
                assert saved_numels(ours()[0], x) == [x.numel()]  # LeanGeluNew: its input only
            assert ours() == outer_functions  # the outer scope's again
            assert len(saved_numels(outer_functions[0], x)) > 1  # the model's own, recorded
        assert state() == before
