"""The shared unembedding: one copy of ``W_U.T`` per block, TransformerLens's logits bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from memloc_tl import scan_memorization
from memloc_tl.core import unembedding
from memloc_tl.core.forward import continuation_logits
from memloc_tl.core.unembedding import shared_unembedding, shares_copy
from memloc_tl.models import load_model
from memloc_tl.organism import Organism


def _hooked(organism: Organism) -> Any:
    """The organism's HookedTransformer (TransformerLens 3; run 2, on 4, deselects this module)."""
    model = organism.model
    assert type(model).__name__ == "HookedTransformer", type(model)
    assert shares_copy(model)
    return model


def _copies() -> list[Any]:
    copies = unembedding._COPIES.get()
    assert copies is not None, "outside shared_unembedding"
    return copies


def test_logits_and_hooks_are_transformer_lens_own(organism: Organism, unchanged: Any) -> None:
    """Two forwards in one block share one copy, and give TransformerLens's own logits; the
    unembedding's hooks see the same tensors, and a hook on ``hook_out`` still applies."""
    model = _hooked(organism)
    tokens, p = organism.planted.tokens[:4], organism.planted.prefix_len
    seen: dict[str, list[torch.Tensor]] = {"hook_in": [], "hook_out": []}

    def record(activation: torch.Tensor, hook: Any) -> None:
        seen[hook.name.rpartition(".")[2]].append(activation.clone())

    def shift(logits: torch.Tensor, hook: Any) -> torch.Tensor:
        return logits + 1.0

    recorders = [("unembed.hook_in", record), ("unembed.hook_out", record)]
    with torch.no_grad():
        expected = model(tokens)[:, p - 1 : -1]
        with model.hooks(fwd_hooks=recorders):
            plain = continuation_logits(model, tokens, p)
        with model.hooks(fwd_hooks=[("unembed.hook_out", shift)]):
            shifted = continuation_logits(model, tokens, p)
    with unchanged(model), torch.no_grad(), shared_unembedding():
        with model.hooks(fwd_hooks=recorders):
            first = continuation_logits(model, tokens, p)
        [copy] = _copies()
        second = continuation_logits(model, tokens[:2], p)
        assert _copies() == [copy]  # made once, read again
        assert copy.weight.is_contiguous()
        assert torch.equal(copy.weight, model.unembed.W_U.T)
        with model.hooks(fwd_hooks=[("unembed.hook_out", shift)]):
            ours_shifted = continuation_logits(model, tokens, p)
    assert unembedding._COPIES.get() is None  # dropped on exit
    assert torch.equal(plain, expected)
    assert torch.equal(first, expected)
    assert torch.equal(second, expected[:2])
    assert torch.equal(ours_shifted, shifted)
    assert not torch.equal(shifted, expected)
    assert len(seen["hook_in"]) == len(seen["hook_out"]) == 2
    for name, (theirs, ours) in seen.items():
        assert torch.equal(ours, theirs), name


def test_a_changed_or_replaced_weight_gets_its_own_copy(organism: Organism) -> None:
    """A weight changed in place inside the block (its version counter moves), and one
    replaced for a call, are unembedded as they are, never with a stale copy."""
    model = _hooked(organism)
    tokens, p = organism.planted.tokens[:3], organism.planted.prefix_len
    w_u = model.unembed.W_U
    other = torch.randn_like(w_u)
    with torch.no_grad():
        replaced = continuation_logits(model, tokens, p, weights={"unembed.W_U": other})
        original = w_u.detach().clone()
        try:
            with shared_unembedding():
                before = continuation_logits(model, tokens, p)
                ours_replaced = continuation_logits(
                    model, tokens, p, weights={"unembed.W_U": other}
                )
                assert {id(c.source) for c in _copies()} == {id(w_u), id(other)}
                w_u.mul_(2.0)
                after = continuation_logits(model, tokens, p)
                assert len(_copies()) == 2  # the older version's copy replaced
            expected_after = model(tokens)[:, p - 1 : -1]
        finally:
            w_u.copy_(original)
        expected_before = model(tokens)[:, p - 1 : -1]
    assert torch.equal(before, expected_before)
    assert torch.equal(ours_replaced, replaced)
    assert not torch.equal(replaced, before)
    assert torch.equal(after, expected_after)
    assert not torch.equal(after, before)


def test_autocast_and_gradients(organism: Organism) -> None:
    """Under bf16 autocast the copy is cast once, as autocast would cast it (same logits);
    with autograd recording the model's own forward runs, so ``W_U`` gets its gradient."""
    model = _hooked(organism)
    tokens, p = organism.planted.tokens[:3], organism.planted.prefix_len
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(tokens)[:, p - 1 : -1].float()
        with shared_unembedding():
            ours = continuation_logits(model, tokens, p)
            assert [c.dtype for c in _copies()] == [torch.bfloat16]
            assert _copies()[0].weight.dtype == torch.bfloat16
    assert torch.equal(ours, expected)
    model.zero_grad(set_to_none=True)
    try:
        with shared_unembedding():
            continuation_logits(model, tokens, p).sum().backward()
            assert _copies() == []  # nothing copied for a recording forward
        grad = model.unembed.W_U.grad
        assert grad is not None
        assert bool(grad.abs().sum() > 0)
    finally:
        model.zero_grad(set_to_none=True)


def test_scans_are_unchanged_and_nesting_shares(organism: Organism) -> None:
    """The scan (which runs in a block of its own) equals a hand-written loop of
    TransformerLens's forwards; a block inside a block shares the outer copies."""
    model = _hooked(organism)
    paragraphs = organism.planted
    p = paragraphs.prefix_len
    scan = scan_memorization(model, paragraphs, batch_size=3, progress=False)
    with torch.no_grad():
        logits = torch.cat(
            [
                model(paragraphs.tokens[i : i + 3])[:, p - 1 : -1]
                for i in range(0, len(paragraphs), 3)
            ]
        )
    assert torch.equal(scan.greedy_match, logits.argmax(-1) == paragraphs.tokens[:, p:])
    nll = -logits.log_softmax(-1).gather(-1, paragraphs.tokens[:, p:, None])[..., 0]
    torch.testing.assert_close(scan.token_nll, nll, atol=1e-5, rtol=0)
    with torch.no_grad(), shared_unembedding():
        continuation_logits(model, paragraphs.tokens[:2], p)
        outer = _copies()
        with shared_unembedding():
            continuation_logits(model, paragraphs.tokens[:2], p)
            assert _copies() is outer
            assert len(outer) == 1


@pytest.mark.backend
def test_a_bridge_keeps_its_own_unembedding(organism: Organism) -> None:
    """A TransformerBridge's unembedding is Hugging Face's (no copy to share), on
    TransformerLens 3.9 and 4: inside the block nothing is copied and the scan is unchanged."""
    bridge = load_model(organism.path, backend="bridge", device="cpu")
    assert not shares_copy(bridge)
    paragraphs = organism.planted
    outside = scan_memorization(bridge, paragraphs, batch_size=4, progress=False)
    with torch.no_grad(), shared_unembedding():
        continuation_logits(bridge, paragraphs.tokens[:2], paragraphs.prefix_len)
        assert _copies() == []
        inside = scan_memorization(bridge, paragraphs, batch_size=4, progress=False)
    assert torch.equal(inside.greedy_match, outside.greedy_match)
    assert torch.equal(inside.token_nll, outside.token_nll)


def test_an_unembedding_with_its_own_forward_keeps_it(organism: Organism) -> None:
    """An ``Unembed`` whose forward was replaced on the instance (a user's patch) runs it."""
    model = _hooked(organism)
    calls = []
    own = model.unembed.forward

    def patched(residual: torch.Tensor) -> torch.Tensor:
        calls.append(residual.shape)
        return own(residual)

    model.unembed.__dict__["forward"] = patched
    try:
        assert not shares_copy(model)
        with torch.no_grad(), shared_unembedding():
            continuation_logits(model, organism.planted.tokens[:2], organism.planted.prefix_len)
            assert _copies() == []
    finally:
        del model.unembed.__dict__["forward"]
    assert len(calls) == 1


def test_an_unchecked_transformer_lens_version_keeps_its_own_unembedding(
    organism: Organism, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a TransformerLens version the copy was not checked against, nothing is copied."""
    model = _hooked(organism)
    tokens, p = organism.planted.tokens[:2], organism.planted.prefix_len
    monkeypatch.setattr(unembedding, "CHECKED_VERSIONS", ("0.0",))
    unembedding._unembed_class.cache_clear()
    try:
        assert not shares_copy(model)
        with torch.no_grad(), shared_unembedding():
            logits = continuation_logits(model, tokens, p)
            assert _copies() == []
            assert torch.equal(logits, model(tokens)[:, p - 1 : -1])
    finally:
        monkeypatch.undo()
        unembedding._unembed_class.cache_clear()
    assert shares_copy(model)
