"""Activation gradients equal TransformerLens backward hooks on a hand-written loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import memloc_tl.analysis.activation_grads as module
from memloc_tl.analysis import activation_gradients
from memloc_tl.core.heads import HeadRef
from memloc_tl.core.hooks import hook_name
from memloc_tl.organism import Organism


@pytest.mark.parametrize("token_range", ["continuation", "first"])
def test_equals_backward_hooks(organism: Organism, token_range: str, unchanged: Any) -> None:
    model, paragraphs = organism.model, organism.planted[[0, 1, 2]]
    with unchanged(model):
        result = activation_gradients(
            model,
            paragraphs,
            token_range=token_range,
            batch_size=2,
            progress=False,  # type: ignore[arg-type]
        )
    grads: dict[str, torch.Tensor] = {}

    def save(grad: torch.Tensor, hook: Any) -> None:
        grads[hook.name] = grad.detach().clone()

    names = [hook_name(c, layer) for c in "qkvz" for layer in range(model.cfg.n_layers)]
    with model.hooks(bwd_hooks=[(name, save) for name in names]):
        logprobs = model(paragraphs.tokens).log_softmax(-1)
        nll = -logprobs[:, 49:99].gather(-1, paragraphs.tokens[:, 50:, None]).squeeze(-1)
        per_paragraph = nll.mean(-1) if token_range == "continuation" else nll[:, 0]
        per_paragraph.sum().backward()
    model.zero_grad(set_to_none=True)
    for c_index, component in enumerate("qkvz"):
        for layer in range(model.cfg.n_layers):
            expected = grads[hook_name(component, layer)].abs().amax(-1).permute(2, 0, 1)
            torch.testing.assert_close(
                result.scores[c_index, layer], expected, rtol=1e-4, atol=1e-9
            )
    # nothing after the first continuation token matters for "first"
    if token_range == "first":
        assert (result.scores[..., 50:] == 0).all()
    assert (result.scores[..., 99] == 0).all()  # the last token predicts nothing scored


def test_views_and_errors(
    organism: Organism, unchanged: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, paragraphs = organism.model, organism.planted[[0, 1]]
    result = activation_gradients(model, paragraphs, components=["v"], progress=False)
    tokens = result.token_scores("L1H2")
    assert torch.equal(tokens.scores, result.scores[0, 1, 2])
    heads = result.head_scores("v")
    assert heads["L1H2"] == pytest.approx(result.scores[0, 1, 2, :, :50].mean().item())
    assert result.top(1)[0][0] == heads.top(1)[0][0]
    assert isinstance(result.top(1)[0][0], HeadRef)
    assert len(result.to_frame()) == model.cfg.n_layers * model.cfg.n_heads
    with pytest.raises(ValueError, match="component must be one of"):
        result.head_scores("q")
    with pytest.raises(ValueError, match="components must be among"):
        activation_gradients(model, paragraphs, components=["attn"])
    with pytest.raises(ValueError, match="token_range"):
        activation_gradients(model, paragraphs, token_range="last")  # type: ignore[arg-type]

    def broken(*args: object, **kwargs: object) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(module, "continuation_logits", broken)
    with unchanged(model), pytest.raises(RuntimeError, match="boom"):
        activation_gradients(model, paragraphs, progress=False)
