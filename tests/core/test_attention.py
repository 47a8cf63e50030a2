"""The lean attention: TransformerLens's own values, hooks, caches and gradients, bit for bit."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from transformer_lens import TransformerLensKeyValueCache

from memloc_tl.core import attention
from memloc_tl.core.attention import lean_attention, takes_lean_forward
from memloc_tl.core.backend import copy_model
from memloc_tl.organism import Organism

# HookedTransformer only: on a bridge the attention is Hugging Face's and nothing changes
ATTENTION_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z")


def _scope(model: torch.nn.Module, lean: bool) -> contextlib.AbstractContextManager[Any]:
    return lean_attention(model) if lean else contextlib.nullcontext()


def _hooked(organism: Organism) -> Any:
    """The organism's HookedTransformer (this module runs in run 1, on TransformerLens 3; it
    imports on 4, which has no HookedTransformer, where run 2 deselects it)."""
    model = organism.model
    assert type(model).__name__ == "HookedTransformer", type(model)
    return model


def test_logits_hooks_and_gradients_are_transformer_lens_own(
    organism: Organism, unchanged: Any
) -> None:
    """Global and local layers; every attention hook sees the same tensor; a hook that ablates
    a head changes both the same way; the backward pass gives the same gradients."""
    model = _hooked(organism)
    tokens = organism.planted.tokens[:3]
    names = {f"blocks.{layer}.attn.{hook}" for layer in range(2) for hook in ATTENTION_HOOKS}
    assert {model.blocks[layer].attn.attn_type for layer in range(2)} == {"global", "local"}

    def ablate(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z[:, :, 1] = 0.0
        return z

    runs = {}
    for lean in (False, True):
        with unchanged(model), _scope(model, lean) as changed:
            with torch.no_grad():
                logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
                with model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", ablate)]):
                    ablated = model(tokens)
            model.zero_grad(set_to_none=True)
            model(tokens, return_type="loss").backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
        assert changed == (model.cfg.n_layers if lean else None)
        runs[lean] = (logits, {n: cache[n] for n in names}, ablated, grads)
    (logits, acts, ablated, grads), (ours, our_acts, our_ablated, our_grads) = runs[0], runs[1]
    assert torch.equal(ours, logits)
    assert not torch.equal(ablated, logits)  # the ablation did something
    assert torch.equal(our_ablated, ablated)
    for name in names:
        assert torch.equal(our_acts[name], acts[name]), name
    assert grads.keys() == our_grads.keys()
    assert len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        assert torch.equal(our_grads[name], grad), name


def test_padding_with_rows_that_see_no_key(organism: Organism) -> None:
    """Left padding masks every key of a padded query: TransformerLens's pattern row is then
    NaN made 0, and so is ours."""
    model = _hooked(organism)
    tokens = organism.planted.tokens[:3, :40]
    mask = torch.ones_like(tokens)
    mask[0, :7] = 0
    mask[2, :1] = 0
    runs = {}
    for lean in (False, True):
        patterns: list[torch.Tensor] = []
        hook = ("blocks.0.attn.hook_pattern", lambda p, hook, out=patterns: out.append(p.clone()))
        with torch.no_grad(), _scope(model, lean), model.hooks(fwd_hooks=[hook]):
            runs[lean] = (model(tokens, attention_mask=mask), patterns[0])
    (logits, pattern), (ours, our_pattern) = runs[False], runs[True]
    assert bool(pattern[0, :, :7].eq(0).all())  # the padded rows: all keys masked, zeros
    assert not bool(pattern.isnan().any())
    assert torch.equal(our_pattern, pattern)
    assert torch.equal(ours, logits)


def test_a_key_value_cache_fills_and_reads_the_same(organism: Organism) -> None:
    """The prefix's keys and values go into TransformerLens's cache, the rest reads them."""
    model = _hooked(organism)
    tokens = organism.planted.tokens[:2]
    runs = {}
    for lean in (False, True):
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(tokens))
        with torch.no_grad(), _scope(model, lean):
            first = model(tokens[:, :30], past_kv_cache=cache)
            rest = model(tokens[:, 30:], past_kv_cache=cache)
        runs[lean] = (first, rest, [entry.past_keys.clone() for entry in cache])
    for plain, ours in zip(runs[False][:2], runs[True][:2], strict=True):
        assert torch.equal(ours, plain)
    for plain, ours in zip(runs[False][2], runs[True][2], strict=True):
        assert plain.shape[1] == tokens.shape[1]
        assert torch.equal(ours, plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision(organism: Organism, dtype: torch.dtype) -> None:
    model = copy_model(_hooked(organism)).to(dtype)
    tokens = organism.planted.tokens[:2]
    with torch.no_grad():
        plain = model(tokens)
        with lean_attention(model) as changed:
            ours = model(tokens)
    assert changed == model.cfg.n_layers
    assert plain.dtype == dtype
    assert torch.equal(ours, plain)


def test_only_plain_attention_changes_and_everything_is_put_back(
    organism: Organism, unchanged: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _hooked(organism)
    attentions = [block.attn for block in model.blocks]
    assert all(takes_lean_forward(a) for a in attentions)
    with lean_attention(model):
        assert all("forward" in a.__dict__ for a in attentions)
    with unchanged(model), pytest.raises(RuntimeError, match="inside"), lean_attention(model):
        raise RuntimeError("inside")
    assert not any("forward" in a.__dict__ for a in attentions)
    # a path the lean forward does not take: TransformerLens's own forward
    other = copy_model(model)
    other.set_use_attn_result(True)
    with lean_attention(other) as changed:
        assert changed == 0
    assert not any(takes_lean_forward(m) for m in other.modules())
    # nested scopes: the outer one owns the change
    with lean_attention(model) as outer, lean_attention(model) as inner:
        assert (outer, inner) == (model.cfg.n_layers, 0)
    assert not any("forward" in a.__dict__ for a in attentions)
    # a TransformerLens version the forward was not checked against: nothing changes
    monkeypatch.setattr(attention, "CHECKED_VERSIONS", ("0.0",))
    attention._abstract_attention.cache_clear()
    try:
        with lean_attention(model) as changed:
            assert changed == 0
    finally:
        monkeypatch.undo()
        attention._abstract_attention.cache_clear()
    assert takes_lean_forward(attentions[0])


@pytest.mark.parametrize(
    "settings",
    [
        {"positional_embedding_type": "rotary", "rotary_dim": 8},  # Pythia's, Llama's
        {"positional_embedding_type": "rotary", "rotary_dim": 8, "n_key_value_heads": 2},  # GQA
        {"positional_embedding_type": "standard", "attn_scores_soft_cap": 30.0},  # Gemma 2's
    ],
)
def test_other_attention_layouts_stay_transformer_lens_own(settings: dict[str, Any]) -> None:
    """Rotary embeddings, grouped-query attention and a soft cap, with a key/value cache:
    every logit and every pattern bit for bit."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=97, act_fn="gelu",
        normalization_type="LN", **settings,
    )  # fmt: skip
    model = HookedTransformer(cfg)  # no tokenizer: attention masks given
    ones = torch.ones_like
    tokens = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    assert all(takes_lean_forward(block.attn) for block in model.blocks)
    runs = {}
    for lean in (False, True):
        cache = TransformerLensKeyValueCache.init_cache(cfg, cfg.device, len(tokens))
        with torch.no_grad(), _scope(model, lean):
            logits, activations = model.run_with_cache(tokens, attention_mask=ones(tokens))
            head, tail = tokens[:, :25], tokens[:, 25:]
            first = model(head, past_kv_cache=cache, attention_mask=ones(head))
            rest = model(tail, past_kv_cache=cache, attention_mask=ones(tail))
        patterns = [activations[f"blocks.{i}.attn.hook_pattern"] for i in range(2)]
        runs[lean] = [logits, first, rest, *patterns]
    for plain, ours in zip(runs[False], runs[True], strict=True):
        assert torch.equal(ours, plain)
