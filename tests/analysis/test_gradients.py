"""Gradient norms: equal to autograd of a hand-written loss; the CO degeneracy at theta_0."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import memloc_tl.core.forward as forward
from memloc_tl.analysis import (
    compare_gradient_norms,
    contrastive_gradient_norms,
    contrastive_gradients,
    gradient_norms,
)
from memloc_tl.analysis.gradients import (
    attributed_parameters,
    component_labels,
    contrastive_kl,
    reduce_gradients,
)
from memloc_tl.core.backend import replaced_weights
from memloc_tl.core.objectives import attributed_weights
from memloc_tl.organism import Organism


def hand_nll(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Mean NLL of tokens 50..99 from a full forward, written out."""
    logprobs = model(tokens).log_softmax(-1)
    return -logprobs[:, 49:99].gather(-1, tokens[:, 50:, None]).mean()


def hand_grads(model: Any, loss_fn: Any) -> dict[str, torch.Tensor]:
    """Autograd of ``loss_fn`` with leaf copies of the weights standing in for the model's."""
    leaves = {
        n: p.detach().clone().requires_grad_(True) for n, p in attributed_parameters(model).items()
    }
    with replaced_weights(model, leaves):
        loss = loss_fn()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def test_batch_mean_equals_autograd_of_a_hand_written_loss(
    organism: Organism, unchanged: Any
) -> None:
    model, paragraphs = organism.model, organism.planted[list(range(7))]
    with unchanged(model):
        result = gradient_norms(model, paragraphs, batch_size=3, progress=False)
    expected = hand_grads(model, lambda: hand_nll(model, paragraphs.tokens))
    model.zero_grad(set_to_none=True)
    stats = reduce_gradients(model, expected)
    torch.testing.assert_close(result.max_abs.scores, stats[0].float(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.l2.scores, stats[1].float(), rtol=1e-4, atol=1e-7)
    # the reduction itself, entry by entry
    w_v = expected["blocks.1.attn.W_V"][2]
    assert result.max_abs[1, "W_V.H2"] == pytest.approx(w_v.abs().max().item(), rel=1e-4)
    w_in = expected["blocks.0.mlp.W_in"]
    assert result.mean_abs[0, "W_in"] == pytest.approx(w_in.abs().mean().item(), rel=1e-4)
    assert result.l2[0, "W_in"] == pytest.approx(w_in.norm().item(), rel=1e-4)
    assert result.max_abs.components == component_labels(model.cfg.n_heads)
    assert result.max_abs.scores.shape == (model.cfg.n_layers, 4 * model.cfg.n_heads + 2)


def test_per_paragraph_is_the_mean_of_single_paragraph_scores(organism: Organism) -> None:
    model, paragraphs = organism.model, organism.control[[0, 1, 2]]
    result = gradient_norms(model, paragraphs, aggregate="per_paragraph", progress=False)
    singles = [
        reduce_gradients(
            model, hand_grads(model, lambda i=i: hand_nll(model, paragraphs.tokens[[i]]))
        )
        for i in range(3)
    ]
    expected = torch.stack(singles).mean(0).float()
    torch.testing.assert_close(result.max_abs.scores, expected[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.mean_abs.scores, expected[2], rtol=1e-4, atol=1e-8)


def test_contrastive_gradient_at_theta0_is_the_scaled_nll_gradient(
    organism: Organism, unchanged: Any
) -> None:
    model = organism.model
    memorized, keep = organism.planted[[0, 1, 2]], organism.control[[0, 1, 2, 3]]
    with unchanged(model):
        co = contrastive_gradients(model, memorized, keep, nll_weight=0.1, batch_size=2)
    nll = hand_grads(model, lambda: hand_nll(model, memorized.tokens))
    kl_only = contrastive_gradients(model, memorized, keep, nll_weight=0.0, batch_size=2)
    for name, grad in nll.items():
        scale = grad.abs().max().item()
        # The KL gradient is zero in exact arithmetic; in float32 it is rounding noise. Its
        # size is set by float32, not by the NLL gradient, which is small on memorized
        # paragraphs: measured up to 1.1% of the weighted NLL gradient on the tiny organism.
        assert kl_only[name].abs().max().item() < 3e-2 * 0.1 * scale, name
        torch.testing.assert_close(co[name], -0.1 * grad, rtol=0, atol=3e-2 * 0.1 * scale)
    norms = contrastive_gradient_norms(model, memorized, keep, progress=False)
    plain = gradient_norms(model, memorized, progress=False)
    torch.testing.assert_close(norms.max_abs.scores, 0.1 * plain.max_abs.scores, rtol=2e-2, atol=0)


def test_contrastive_gradient_with_another_reference_includes_the_kl(organism: Organism) -> None:
    """Away from theta_0 the KL term acts: equal to autograd of the hand-written Eq. 3."""
    model = organism.model
    memorized, keep = organism.planted[[0, 1]], organism.control[[0, 1, 2]]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 50, model.cfg.d_vocab, generator=generator)
    with torch.no_grad():
        reference = (model(keep.tokens)[:, 49:99] + noise).log_softmax(-1)
    co = contrastive_gradients(
        model, memorized, keep, original_logprobs=reference, nll_weight=0.1, batch_size=2
    )

    def eq3() -> torch.Tensor:
        logprobs = model(keep.tokens)[:, 49:99].log_softmax(-1)
        kl = (reference.exp() * (reference - logprobs)).sum(-1).sum(-1).mean()
        return -0.1 * hand_nll(model, memorized.tokens) + kl

    expected = hand_grads(model, eq3)
    for name, grad in expected.items():
        torch.testing.assert_close(co[name], grad, rtol=1e-3, atol=1e-6)
    with torch.no_grad():
        mean_kl = contrastive_kl(model, keep.tokens, reference, 50, reduction="mean")
        summed = contrastive_kl(model, keep.tokens, reference, 50)
    assert summed.item() == pytest.approx(50 * mean_kl.item(), rel=1e-5)


def test_comparison_and_flags(organism: Organism, unchanged: Any) -> None:
    model = organism.model
    frozen = attributed_weights(model)["blocks.0.attn.W_Q"].param
    frozen.requires_grad_(False)  # a user's frozen matrix
    try:
        with unchanged(model):
            comparison = compare_gradient_norms(
                model, organism.planted[[0, 1]], organism.control[[0, 1]], progress=False
            )
        assert frozen.requires_grad is False
    finally:
        frozen.requires_grad_(True)
    share = comparison.layer_share_difference()
    assert share.shape == (model.cfg.n_layers,)
    assert share.sum().item() == pytest.approx(0.0, abs=1e-5)
    assert comparison.memorized.layer_share().sum().item() == pytest.approx(1.0, abs=1e-5)
    assert len(comparison.to_frame()) == 2 * model.cfg.n_layers * (4 * model.cfg.n_heads + 2)


def test_errors_leave_the_model_unchanged(
    organism: Organism, unchanged: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = organism.model
    with pytest.raises(ValueError, match="aggregate"):
        gradient_norms(model, organism.planted, aggregate="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kl_reduction"):
        contrastive_gradients(model, organism.planted, organism.control, kl_reduction="x")  # type: ignore[arg-type]

    def broken(*args: object, **kwargs: object) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(forward, "final_residual", broken)
    with unchanged(model), pytest.raises(RuntimeError, match="boom"):
        gradient_norms(model, organism.planted[[0]], progress=False)
