"""The teacher-forced kernel: a loss over chunks of positions equals one pass over all."""

from __future__ import annotations

import pytest
import torch

import memloc_tl.core.forward as forward
from memloc_tl.core.backend import gradients, parameters_of
from memloc_tl.core.objectives import (
    attributed_weights,
    continuation_nll,
    contrastive_kl,
    grad_only_for,
)
from memloc_tl.organism import Organism


@pytest.mark.parametrize("chunk", [7, 50])
def test_losses_over_position_chunks_equal_one_pass_and_recompute_in_backward(
    organism: Organism, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NLL and KL, values and gradients, equal a hand-written pass over the full logits; with
    gradients on, each chunk's unembedding runs again in the backward pass (checkpointing),
    which is how a chunk's vocabulary-sized tensors are not kept."""
    monkeypatch.setattr(forward, "POSITION_CHUNK", chunk)
    model, tokens = organism.model, organism.planted.tokens[:3]
    chosen = {name: w for name, w in attributed_weights(model).items() if ".0." in name}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logits = model(tokens)[:, 49:99]
        reference = (logits + torch.randn(logits.shape, generator=generator)).log_softmax(-1)

    def ours() -> torch.Tensor:
        nll = continuation_nll(model, tokens, 50)
        return nll.sum() + contrastive_kl(model, tokens, reference, 50)

    def by_hand() -> torch.Tensor:
        logprobs = model(tokens)[:, 49:99].log_softmax(-1)
        nll = -logprobs.gather(-1, tokens[:, 50:, None]).squeeze(-1).mean(-1)
        kl = (reference.exp() * (reference - logprobs)).sum(-1).sum(-1).mean()
        return nll.sum() + kl

    n_chunks = -(-50 // chunk)
    calls: list[int] = []
    with grad_only_for(model, parameters_of(chosen)):
        counted = model.unembed.register_forward_hook(lambda *_: calls.append(1))
        try:
            with torch.no_grad():
                value = ours()
            assert len(calls) == 2 * n_chunks  # no gradients: one unembedding per chunk, loss
            calls.clear()
            loss = ours()
            grads = gradients(loss, chosen)
            assert len(calls) == 2 * 2 * n_chunks  # and each chunk again in the backward pass
        finally:
            counted.remove()
        expected_loss = by_hand()
        expected = gradients(expected_loss, chosen)
    torch.testing.assert_close(value, expected_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
