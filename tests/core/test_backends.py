"""One backend for TransformerLens 3 and 4: the bridge gives the HookedTransformer's numbers.

A TransformerBridge in compatibility mode runs the Hugging Face model; its TransformerLens-named
weights are views of the Hugging Face parameters (memloc_tl.core.backend.Weight). Every analysis,
the scan, sparse editing, WeightEdit and injection must give the same numbers on both (1e-5).

- With TransformerLens 3 installed (which also ships the bridge), both backends run here.
- ``MEMLOC_BACKEND_REFERENCE=<file>``: the TransformerLens 3 run writes its HookedTransformer
  numbers there, and a TransformerLens 4 run (CI's second environment) compares against them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from memloc_tl import load_model
from memloc_tl.core.backend import (
    check_backend,
    check_model,
    final_residual,
    gradients,
    is_bridge,
    parameter_masks,
    skips_early_blocks,
    substituted_parameters,
    tl_major,
    weights,
)
from memloc_tl.core.files import atomic_write
from memloc_tl.core.forward import PrefixKV, continuation_logits
from memloc_tl.core.hooks import hook_name
from memloc_tl.core.objectives import attributed_names, attributed_parameters
from memloc_tl.models import save_hooked_model
from memloc_tl.organism import Organism
from tests.backend_fingerprint import fingerprint

pytestmark = pytest.mark.backend  # run 2 (TransformerLens 4) runs it: tests/docs/test_ci.py

REFERENCE = os.environ.get("MEMLOC_BACKEND_REFERENCE")
HAS_HOOKED = tl_major() < 4
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def bridge(organism: Organism) -> Any:
    return load_model(organism.path, backend="bridge", device="cpu")


@pytest.fixture(scope="module")
def bridge_numbers(bridge: Any, organism: Organism) -> dict[str, torch.Tensor]:
    return fingerprint(bridge, organism)


def assert_same_numbers(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        torch.testing.assert_close(
            ours[name], theirs[name], atol=1e-5, rtol=1e-5, equal_nan=True, msg=name
        )


def test_the_bridge_is_what_auto_gives_on_transformer_lens_4(organism: Organism) -> None:
    assert is_bridge(organism.model) == (tl_major() >= 4)
    check_model(organism.model)
    assert organism.model.cfg.default_prepend_bos is False


def test_backends_give_one_set_of_numbers(
    organism: Organism, bridge: Any, bridge_numbers: dict[str, torch.Tensor]
) -> None:
    """TransformerLens 3: the bridge equals the HookedTransformer (whose numbers are written to
    MEMLOC_BACKEND_REFERENCE); TransformerLens 4: the bridge equals that file."""
    if HAS_HOOKED:
        hooked = load_model(organism.path, backend="hooked", device="cpu")
        hooked_numbers = fingerprint(hooked, organism)
        assert_same_numbers(bridge_numbers, hooked_numbers)
        # the fingerprint is not trivially equal: it moves when the model does
        assert float(hooked_numbers["scan.exact_match"].sum()) > 0
        if REFERENCE:  # for the TransformerLens 4 run
            atomic_write(REFERENCE, lambda path: save_file(hooked_numbers, str(path)))
        elif IN_CI:
            pytest.fail(
                "CI must hand this run's HookedTransformer numbers to the TransformerLens 4 run: "
                "set MEMLOC_BACKEND_REFERENCE=<file> (bash scripts/test.sh does)"
            )
        return
    if not REFERENCE or not Path(REFERENCE).is_file():
        message = (
            f"no TransformerLens 3 reference at MEMLOC_BACKEND_REFERENCE={REFERENCE!r}: run the "
            "suite on TransformerLens 3 with MEMLOC_BACKEND_REFERENCE=<file> first "
            "(bash scripts/test.sh does both runs)"
        )
        if IN_CI:  # in CI the comparison is the point of the second run: never skipped
            pytest.fail(message)
        pytest.skip(message)
    assert_same_numbers(bridge_numbers, load_file(REFERENCE))


def test_weights_are_views_whose_gradients_and_edits_reach_the_model(bridge: Any) -> None:
    names = attributed_names(bridge)
    chosen = weights(bridge, names)
    views = attributed_parameters(bridge)
    tokens = torch.randint(
        0, bridge.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    # the gradient of a view, mapped from its parameter, equals autograd's on a leaf copy
    name = "blocks.1.attn.W_V"
    leaf = views[name].detach().clone().requires_grad_(True)
    loss = continuation_logits(bridge, tokens, 6, weights={name: leaf}).square().mean()
    (expected,) = torch.autograd.grad(loss, [leaf])
    loss = continuation_logits(bridge, tokens, 6).square().mean()
    mapped = gradients(loss, {name: chosen[name]})[name]
    torch.testing.assert_close(mapped, expected, atol=1e-6, rtol=1e-5)
    # a mask by weight name becomes a mask of the parameter with exactly those entries
    mask = torch.zeros(chosen[name].shape, dtype=torch.bool)
    mask[2, 5, 1] = True
    (param_mask,) = parameter_masks(chosen, {name: mask}).values()
    assert int(param_mask.sum()) == 1
    assert bool(chosen[name].of(param_mask)[2, 5, 1])
    # given as flat indices, the same entries come back as indices into the parameter
    many = torch.rand(chosen[name].shape, generator=torch.Generator().manual_seed(0)) < 0.05
    (as_mask,) = parameter_masks(chosen, {name: many}).values()
    (as_indices,) = parameter_masks(chosen, {name: many.flatten().nonzero().flatten()}).values()
    assert as_indices.dtype == torch.int64
    assert len(as_indices) == int(many.sum())
    assert torch.equal(as_indices, as_mask.flatten().nonzero().flatten())
    # writes into the view change the model's output
    before = continuation_logits(bridge, tokens, 6)
    with torch.no_grad():
        saved = views[name].clone()
        views[name].mul_(2)
        after = continuation_logits(bridge, tokens, 6)
        views[name].copy_(saved)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(continuation_logits(bridge, tokens, 6), before, atol=0, rtol=0)
    # substituted parameters leave everything else as the model has it
    replaced = substituted_parameters(bridge, {name: views[name] * 0})
    (param,) = replaced.values()
    assert torch.equal(chosen[name].of(param.contiguous()), torch.zeros_like(views[name]))


def test_a_bridge_forward_starts_at_a_layer_and_skips_the_blocks_below(
    bridge: Any, organism: Organism, unchanged: Any
) -> None:
    """``start_at_layer=k`` on the bridge runs only blocks ``k..`` (the Hugging Face block list
    is cut for the call) from the residual given: the logits of the whole forward, no block
    below ``k`` runs, a hook at the entry sees the residual, and the list is whole afterwards,
    also after an error."""
    n_layers, prefix_len = bridge.cfg.n_layers, organism.planted.prefix_len
    assert skips_early_blocks(bridge)
    tokens = organism.planted.tokens[:3]
    names = [hook_name("resid_pre", layer) for layer in range(n_layers)]
    _, cache = bridge.run_with_cache(tokens, names_filter=names.__contains__)
    full = continuation_logits(bridge, tokens, prefix_len)
    ran: list[int] = []

    def record(layer: int) -> Any:
        return lambda activation, hook: ran.append(layer)

    counting = [(hook_name("resid_post", layer), record(layer)) for layer in range(n_layers)]
    for layer in range(n_layers):
        ran.clear()
        with unchanged(bridge), bridge.hooks(fwd_hooks=counting):
            logits = continuation_logits(
                bridge, cache[names[layer]], prefix_len, start_at_layer=layer
            )
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
        assert ran == list(range(layer, n_layers))
    seen: list[torch.Tensor] = []
    with bridge.hooks(fwd_hooks=[(names[1], lambda activation, hook: seen.append(activation))]):
        continuation_logits(bridge, cache[names[1]], prefix_len, start_at_layer=1)
    assert torch.equal(seen[0], cache[names[1]])
    with pytest.raises(ValueError, match=r"residual stream \[batch, pos, d_model\]"):
        final_residual(bridge, tokens, start_at_layer=1)
    with pytest.raises(ValueError, match=rf"start_at_layer={n_layers} must be in"):
        final_residual(bridge, cache[names[0]], start_at_layer=n_layers)

    def fail(activation: torch.Tensor, hook: Any) -> None:
        raise RuntimeError("a hook failed")

    failing = bridge.hooks(fwd_hooks=[(names[n_layers - 1], fail)])
    with unchanged(bridge), pytest.raises(RuntimeError, match="a hook failed"), failing:
        final_residual(bridge, cache[names[1]], start_at_layer=1)
    assert list(bridge.original_model.transformer.h) == list(bridge.blocks)
    torch.testing.assert_close(continuation_logits(bridge, tokens, prefix_len), full)
    # a model that picks each block's mask by its place in the list is not cut: refused, and
    # the sweep then runs every variant from the tokens
    config = bridge.original_model.config
    config.layer_types = ["sliding_attention", "full_attention"] * n_layers
    try:
        assert not skips_early_blocks(bridge)
        with pytest.raises(ValueError, match="several layer_types"):
            final_residual(bridge, cache[names[1]], start_at_layer=1)
    finally:
        del config.layer_types
    assert skips_early_blocks(bridge)


def test_bridge_specific_errors_are_clear(bridge: Any, organism: Organism, tmp_path: Path) -> None:
    # GPT-Neo's Hugging Face attention fills Hugging Face's cache: keys and values are shared
    assert PrefixKV.build(bridge, torch.zeros(1, 8, dtype=torch.long)).hugging_face
    with pytest.raises(TypeError, match="save the edit"):
        save_hooked_model(bridge, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    with pytest.raises(TypeError, match="HookedTransformer or TransformerBridge"):
        check_model(torch.nn.Linear(2, 2))
    # every analyzer checks it first: a transformers model is refused by name, not mid-forward
    from transformers import AutoModelForCausalLM

    from memloc_tl import gradient_norms, scan_memorization

    hf_model = AutoModelForCausalLM.from_pretrained(organism.path, local_files_only=True)
    for analyzer in (scan_memorization, gradient_norms):
        with pytest.raises(TypeError, match="got GPTNeoForCausalLM; load one with"):
            analyzer(hf_model, organism.planted[:2], progress=False)
    with pytest.raises(ValueError, match=r"the model has no blocks\.9"):
        weights(bridge, ["blocks.9.attn.W_Q"])
    if not HAS_HOOKED:
        with pytest.raises(ValueError, match="TransformerLens 3"):
            check_backend("hooked")


def test_analyzers_leave_the_bridge_unchanged(
    bridge: Any, organism: Organism, unchanged: Any
) -> None:
    from memloc_tl import attribution_patching, gradient_norms

    with unchanged(bridge):
        gradient_norms(bridge, organism.planted[:2], progress=False)
        attribution_patching(bridge, organism.planted[:2], organism.heldout[:2], progress=False)
