"""The teacher-forced kernel: a loss over chunks of positions equals one pass over all."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

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

pytestmark = pytest.mark.backend  # run 2 (TransformerLens 4) runs it: tests/docs/test_ci.py


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
    counter = ("unembed.hook_out", lambda logits, hook: calls.append(1))
    with grad_only_for(model, parameters_of(chosen)):
        with model.hooks(fwd_hooks=[counter]):
            with torch.no_grad():
                value = ours()
            assert len(calls) == 2 * n_chunks  # no gradients: one unembedding per chunk, loss
            calls.clear()
            loss = ours()
            grads = gradients(loss, chosen)
            assert len(calls) == 2 * 2 * n_chunks  # and each chunk again in the backward pass
        expected_loss = by_hand()
        expected = gradients(expected_loss, chosen)
    torch.testing.assert_close(value, expected_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_layer_starts_scores_and_keeps_every_layers_input_from_one_forward(
    organism: Organism, unchanged: Any
) -> None:
    from memloc_tl.core.backend import shares_prefix_cache, skips_early_blocks

    model, paragraphs = organism.model, organism.planted[list(range(4))]
    tokens, p = paragraphs.tokens, paragraphs.prefix_len
    keys_values = shares_prefix_cache(model)
    embeds: list[int] = []
    with (
        unchanged(model),
        model.hooks(fwd_hooks=[("hook_embed", lambda a, hook: embeds.append(1))]),
    ):
        starts = forward.layer_starts(model, tokens, p, keys_values=keys_values)
    assert len(embeds) == 1  # one forward for the scores, the residuals and the keys/values
    match, nll = forward.score_continuations(model, tokens, p)
    assert torch.equal(starts.greedy_match, match)
    torch.testing.assert_close(starts.token_nll, nll, atol=1e-6, rtol=0)
    n = model.cfg.n_layers
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    if skips_early_blocks(model):
        assert len(starts.residuals) == n
        for layer in range(n):
            torch.testing.assert_close(starts.residuals[layer], cache[names[layer]])
            kwargs = starts(layer, 3)
            assert kwargs["start_at_layer"] == layer
            assert kwargs["residual"].shape == (3 * len(tokens), *cache[names[layer]].shape[1:])
    else:
        assert starts.residuals == ()
        assert starts(1, 3) == {}
    if keys_values:
        ours, theirs = starts.prefix, forward.PrefixKV.build(model, tokens)
        assert ours is not None
        for mine, built in zip(ours.keys + ours.values, theirs.keys + theirs.values, strict=True):
            torch.testing.assert_close(mine, built)
    else:
        assert starts.prefix is None
        with pytest.raises(ValueError, match="key/value cache"):
            forward.layer_starts(model, tokens, p, keys_values=True)


def test_checkpointed_blocks_give_the_same_loss_and_gradients_and_keep_less(
    organism: Organism, unchanged: Any
) -> None:
    """With checkpoint_blocks the backward pass recomputes each block (its attention runs
    twice) and the graph keeps fewer bytes; the loss and the gradients are those without. On
    both backends: the organism's model and a bridge of it (on TransformerLens 4 they are the
    same kind), whose Hugging Face blocks are wrapped for the call and restored after."""
    from memloc_tl.core.backend import _hf_block_list, is_bridge
    from memloc_tl.models import load_model

    models = [organism.model]
    if not is_bridge(organism.model):
        models.append(load_model(organism.path, backend="bridge", device="cpu"))
    tokens = organism.planted.tokens[:4]
    for model in models:
        chosen = attributed_weights(model)
        runs: dict[bool, tuple[torch.Tensor, dict[str, torch.Tensor], int, int]] = {}
        for blocks in (False, True):
            saved: list[int] = []
            patterns: list[int] = []

            def pack(tensor: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
                saved.append(tensor.numel() * tensor.element_size())
                return tensor

            counter = ("blocks.0.attn.hook_pattern", lambda a, hook, n=patterns: n.append(1))
            with (
                unchanged(model),
                grad_only_for(model, parameters_of(chosen)),
                model.hooks(fwd_hooks=[counter]),
            ):
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                    loss = continuation_nll(model, tokens, 50, checkpoint_blocks=blocks).sum()
                grads = gradients(loss, chosen)
            runs[blocks] = (loss.detach(), grads, sum(saved), len(patterns))
        (plain, plain_grads, plain_bytes, plain_runs), (ours, our_grads, our_bytes, our_runs) = (
            runs[False],
            runs[True],
        )
        kind = type(model).__name__
        torch.testing.assert_close(ours, plain, rtol=0, atol=0, msg=kind)
        for name, grad in our_grads.items():
            torch.testing.assert_close(
                grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=f"{kind} {name}"
            )
        assert (plain_runs, our_runs) == (1, 2), kind
        assert our_bytes < plain_bytes / 2, (kind, our_bytes, plain_bytes)
        if is_bridge(model):
            # an error inside a wrapped block leaves the list as it was
            block_list = _hf_block_list(model)
            assert block_list is not None
            before = list(block_list)

            def fail(activation: torch.Tensor, hook: Any) -> None:
                raise RuntimeError("inside block 1")

            with (
                unchanged(model),
                grad_only_for(model, parameters_of(chosen)),
                model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", fail)]),
                pytest.raises(RuntimeError, match="inside block 1"),
            ):
                continuation_nll(model, tokens, 50, checkpoint_blocks=True)
            assert all(a is b for a, b in zip(block_list, before, strict=True))


@pytest.mark.parametrize("batch_size", [2, 16])
def test_original_logprobs_equal_a_log_softmax_of_the_logits(
    organism: Organism, batch_size: int
) -> None:
    """Built in place, batch by batch: bit for bit the log-softmax of the continuation logits."""
    from memloc_tl.core.objectives import original_logprobs

    paragraphs = organism.planted[list(range(5))]
    with torch.no_grad():
        logits = forward.continuation_logits(organism.model, paragraphs.tokens, 50)
    expected = logits.log_softmax(-1)
    got = original_logprobs(organism.model, paragraphs, batch_size)
    assert got.shape == (5, 50, organism.model.cfg.d_vocab)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_a_recomputed_reference_makes_the_stored_log_probabilities_a_chunk_at_a_time(
    organism: Organism,
) -> None:
    """recomputed_reference keeps the residual and unembeds a chunk when asked: the stored
    log-probabilities to float rounding, also through contrastive_kl, computed inside the
    scope it is given (here: a model whose first block's W_V is zeroed outside the scope)."""
    from memloc_tl.core.objectives import original_logprobs, recomputed_reference

    model, paragraphs = organism.model, organism.control[[0, 1, 2]]
    stored = original_logprobs(model, paragraphs)
    w_v = model.blocks[0].attn.W_V
    saved = w_v.detach().clone()
    entered = []

    @contextlib.contextmanager
    def original() -> Iterator[None]:
        entered.append(True)
        with torch.no_grad():
            w_v.copy_(saved)
        try:
            yield
        finally:
            with torch.no_grad():
                w_v.zero_()

    try:
        with torch.no_grad():
            w_v.zero_()  # the "trained" model differs from theta_0
        chunk = recomputed_reference(model, 50, original)(paragraphs.tokens, 0)
        assert entered == [True]
        for positions in (slice(0, 7), slice(7, 50)):
            torch.testing.assert_close(chunk(positions), stored[:, positions], atol=1e-5, rtol=0)
    finally:
        with torch.no_grad():
            w_v.copy_(saved)
    with torch.no_grad():
        by_tensor = contrastive_kl(model, paragraphs.tokens, stored, 50)
        by_chunk = contrastive_kl(
            model, paragraphs.tokens, recomputed_reference(model, 50)(paragraphs.tokens, 0), 50
        )
    assert float(by_tensor) == pytest.approx(0.0, abs=1e-4)  # theta = theta_0
    torch.testing.assert_close(by_chunk, by_tensor, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("batch_size", "keep_prefix"), [(16, 50), (16, 40), (2, 50)])
def test_final_gradients_hand_over_each_matrix_once_as_accumulated(
    organism: Organism, batch_size: int, keep_prefix: int
) -> None:
    """Sets that fit a batch (16) go through one forward together (or, with different prefix
    lengths, one each) and one backward pass; larger ones are accumulated (2). Each attributed
    matrix is handed over once, equal to accumulated_gradients of the sets one at a time, and
    the model's .grad is as it was."""
    from memloc_tl.core.objectives import (
        SetTerm,
        accumulated_gradients,
        final_gradients,
        kl_loss,
        nll_loss,
        reduce_kl,
    )

    model = organism.model
    memorized = organism.planted[[0, 1, 2]]
    keep = dataclasses.replace(organism.control[[0, 1, 2, 3]], prefix_len=keep_prefix)
    n = keep.continuation_len
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        noisy = model(keep.tokens)[:, keep_prefix - 1 : keep_prefix - 1 + n]
        reference = (noisy + torch.randn(noisy.shape, generator=generator)).log_softmax(-1)

    def nll(tokens: torch.Tensor, start: int) -> torch.Tensor:
        return -continuation_nll(model, tokens, 50).mean()

    def kl(tokens: torch.Tensor, start: int) -> torch.Tensor:
        return contrastive_kl(model, tokens, reference[start : start + len(tokens)], keep_prefix)

    expected = accumulated_gradients(model, [(memorized, nll), (keep, kl)], batch_size, False, "")
    terms = [
        SetTerm(memorized, lambda t, s: (t, nll_loss(t, 50)), lambda x: -x.mean(-1).mean()),
        SetTerm(
            keep,
            lambda t, s: (t, kl_loss(reference[s : s + len(t)])),
            lambda x: reduce_kl(x, "sum_positions"),
        ),
    ]
    got: dict[str, torch.Tensor] = {}

    def receive(name: str, grad: torch.Tensor) -> None:
        assert name not in got, f"{name} handed over twice"
        got[name] = grad.clone()

    forwards: list[int] = []  # the rows of each forward pass

    def count(activation: torch.Tensor, hook: Any) -> None:
        forwards.append(activation.shape[0])

    with model.hooks(fwd_hooks=[("hook_embed", count)]):
        final_gradients(model, terms, batch_size, receive)
    assert set(got) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    if batch_size == 16:  # the sets together when they can share a forward, else one each
        assert forwards == ([7] if keep_prefix == 50 else [3, 4])


def test_scores_over_position_chunks_on_a_cpu_are_the_same_bit_for_bit(
    organism: Organism, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a batch's logits outgrow the CPU budget, the scoring forward unembeds and scores
    a few positions at a time: the same matches and NLL bit for bit, also from a key/value
    cache; all at once where a hook reads the unembedding, and on a GPU."""
    model, paragraphs = organism.model, organism.planted
    tokens, p = paragraphs.tokens[:5], paragraphs.prefix_len
    c = paragraphs.continuation_len
    whole = forward.score_continuations(model, tokens, p)
    prefix = forward.PrefixKV.build(model, tokens[:, :20])
    rows = torch.arange(len(tokens))
    cached = forward.score_continuations(model, tokens, p, past_kv_cache=prefix.cache(rows, 20))
    per_position = len(tokens) * model.cfg.d_vocab * 4
    assert forward.scoring_chunk(model, len(tokens), c) is None  # the organism fits at once
    monkeypatch.setattr(forward, "CPU_ACTIVATION_BYTES", 7 * per_position + 1)
    assert forward.scoring_chunk(model, len(tokens), c) == 7
    chunks: list[int] = []

    def count(logits: torch.Tensor, hook: Any) -> None:
        chunks.append(logits.shape[1])

    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", count)]):
        assert forward.scoring_chunk(model, len(tokens), c) is None  # a hook sees it whole
        hooked = forward.score_continuations(model, tokens, p)
    assert chunks == [c]
    assert torch.equal(hooked[0], whole[0])
    assert torch.equal(hooked[1], whole[1])
    calls: list[int] = []
    scores = forward.scores_from_logits

    def counting(logits: torch.Tensor, target: torch.Tensor, **kwargs: Any) -> Any:
        calls.append(logits.shape[1])
        return scores(logits, target, **kwargs)

    monkeypatch.setattr(forward, "scores_from_logits", counting)
    chunked = forward.score_continuations(model, tokens, p)
    assert calls == [7] * (c // 7) + [c % 7]
    assert torch.equal(chunked[0], whole[0])
    assert torch.equal(chunked[1], whole[1])
    chunked_cached = forward.score_continuations(
        model, tokens, p, past_kv_cache=prefix.cache(rows, 20)
    )
    assert torch.equal(chunked_cached[0], cached[0])
    assert torch.equal(chunked_cached[1], cached[1])
    gpu: Any = type("Gpu", (), {"cfg": type("Cfg", (), {"device": "cuda", "d_vocab": 50257})})
    assert forward.scoring_chunk(gpu, 512, c) is None  # a GPU takes the logits whole
