"""Patching and ablation of heads: invariants, and the batched sweep equals a per-head loop."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import memloc_tl.analysis.patching as patching
import memloc_tl.core.forward as forward
from memloc_tl.analysis import ablate_heads, patch_heads, patching_sweep
from memloc_tl.core.forward import exact_match_length, score_continuations
from memloc_tl.core.heads import HeadRef, all_heads
from memloc_tl.core.hooks import hook_name
from memloc_tl.organism import Organism

pytestmark = pytest.mark.backend  # run 2 (TransformerLens 4) runs it: tests/docs/test_ci.py


@pytest.fixture(scope="module")
def pair(organism: Organism) -> tuple[Any, Any]:
    """Memorized targets and non-memorized sources, row-aligned."""
    return organism.planted[list(range(6))], organism.control[list(range(6))]


def test_identity_patch_changes_nothing(organism: Organism, pair: Any, unchanged: Any) -> None:
    target, _ = pair
    with unchanged(organism.model):
        result = patch_heads(organism.model, target, target, ["L1H2", "L0H1"], progress=False)
    assert torch.equal(result.em, result.baseline_em)
    assert torch.equal(result.nll, result.baseline_nll)
    assert result.heads == (HeadRef(1, 2), HeadRef(0, 1))


def test_patching_every_head_equals_patching_hook_z(organism: Organism, pair: Any) -> None:
    model = organism.model
    target, source = pair
    layer = 1
    heads = [HeadRef(layer, h) for h in range(model.cfg.n_heads)]
    result = patch_heads(model, target, source, heads, progress=False)
    name = hook_name("z", layer)
    _, source_cache = model.run_with_cache(source.tokens, names_filter=name)

    def replace_all(z: torch.Tensor, hook: Any) -> torch.Tensor:
        return source_cache[name]

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, replace_all)]):
        match, token_nll = score_continuations(model, target.tokens, 50)
    assert torch.equal(result.em, exact_match_length(match))
    torch.testing.assert_close(result.nll, token_nll.mean(-1), atol=1e-6, rtol=0)
    assert (result.delta_nll != 0).any()


def test_ablation_leaves_earlier_layers_bit_identical(organism: Organism, pair: Any) -> None:
    model = organism.model
    target, _ = pair
    clean_logits, clean = model.run_with_cache(target.tokens)
    hook = patching.make_head_replace_hook(
        [2], torch.zeros(100, model.cfg.n_heads, model.cfg.d_head)
    )
    with model.hooks(fwd_hooks=[(hook_name("z", 1), hook)]):
        ablated_logits, ablated = model.run_with_cache(target.tokens)
    for name, value in clean.items():
        if name.startswith("blocks.0.") or name in ("hook_embed", "hook_pos_embed"):
            assert torch.equal(value, ablated[name]), name
    assert torch.equal(clean["blocks.1.attn.hook_pattern"], ablated["blocks.1.attn.hook_pattern"])
    assert not torch.equal(clean["blocks.1.hook_resid_post"], ablated["blocks.1.hook_resid_post"])
    assert not torch.equal(clean_logits, ablated_logits)


@pytest.mark.parametrize("kind", ["patch", "zero", "mean"])
def test_batched_sweep_equals_a_per_head_loop(
    organism: Organism, pair: Any, kind: str, unchanged: Any
) -> None:
    model = organism.model
    target, source = pair
    reference = organism.heldout
    positions = [10, 20, 49] if kind == "zero" else None
    with unchanged(model):
        sweep = patching_sweep(
            model,
            target,
            source if kind == "patch" else None,
            kind=kind,  # type: ignore[arg-type]
            mean_over=reference,
            positions=positions,
            batch_size=4,
            progress=False,
        )
    for head in all_heads(model.cfg):
        if kind == "patch":
            one = patch_heads(model, target, source, [head], progress=False)
        else:
            one = ablate_heads(
                model,
                target,
                [head],
                kind=kind,
                mean_over=reference,  # type: ignore[arg-type]
                positions=positions,
                progress=False,
            )
        assert torch.equal(sweep.delta_em[head.layer, head.head], one.delta_em), head
        torch.testing.assert_close(
            sweep.delta_nll[head.layer, head.head], one.delta_nll, atol=1e-5, rtol=0
        )
    assert sweep.top(1)[0][1] == pytest.approx(float(sweep.delta_nll.mean(-1).max()))
    assert len(sweep.to_frame()) == model.cfg.n_layers * model.cfg.n_heads


def test_on_a_cpu_the_stacked_rows_stay_within_the_activation_budget(
    organism: Organism, pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a budget of two paragraphs' stacked rows, a batch of 6 runs as batches of 2: the
    same numbers as the whole batch without a budget."""
    model = organism.model
    target, source = pair
    whole = patching_sweep(model, target, source, batch_size=6, progress=False)
    cfg, seq = model.cfg, target.seq_len
    width = max(cfg.d_mlp, cfg.n_heads * seq)
    monkeypatch.setattr(forward, "CPU_ACTIVATION_BYTES", 2 * cfg.n_heads * seq * width * 4)
    assert forward.cpu_rows(model, seq) == 2 * cfg.n_heads
    rows: list[int] = []

    def count(activation: torch.Tensor, hook: Any) -> None:
        rows.append(activation.shape[0])

    last = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    with model.hooks(fwd_hooks=[(last, count)]):
        capped = patching_sweep(model, target, source, batch_size=6, progress=False)
    assert max(rows) == 2 * cfg.n_heads  # stacked copies of 2 paragraphs, never of 6
    assert torch.equal(capped.delta_em, whole.delta_em)
    torch.testing.assert_close(capped.delta_nll, whole.delta_nll, atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions", [None, [12, 44, 47, 60]])
def test_a_sweep_from_perturbed_copies_recomputes_only_from_the_first_change(
    organism: Organism, positions: Any, unchanged: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Causal reuse: sources equal to their targets up to position p change nothing before p,
    so only positions from p on run (with the target's keys and values before p), and the
    numbers equal a per-head loop of ``patch_heads``, which recomputes every position."""
    from memloc_tl.core.backend import shares_prefix_cache, skips_early_blocks

    model = organism.model
    reuse = shares_prefix_cache(model) and skips_early_blocks(model)  # on both backends
    assert reuse  # a HookedTransformer's cache, or (a bridge) Hugging Face's
    target = organism.planted[list(range(5))]
    tokens = target.tokens.clone()
    changed = torch.tensor([44, 47, 45, 49, 46])  # one token per paragraph, PMP-like
    tokens[torch.arange(5), changed] = (tokens[torch.arange(5), changed] + 7) % model.cfg.d_vocab
    source = type(target).from_tokens(tokens, prefix_len=target.prefix_len)
    seen: list[int] = []
    original = patching.make_each_head_replace_hook

    def counting(replacement: Any, chosen: Any) -> Any:
        replace = original(replacement, chosen)

        def counted(z: Any, hook: Any) -> Any:  # TransformerLens passes hook= by name
            seen.append(z.shape[1])
            return replace(z, hook)

        return counted

    monkeypatch.setattr(patching, "make_each_head_replace_hook", counting)
    with unchanged(model):
        sweep = patching_sweep(
            model, target, source, positions=positions, batch_size=3, progress=False
        )
    # the rows that change latest batched together: (49, 47, 46) and (45, 44), so from
    # positions 46 and 44 on, every layer
    n_layers, seq = model.cfg.n_layers, target.seq_len
    firsts = (46, 44)
    assert seen == [seq - firsts[0]] * n_layers + [seq - firsts[1]] * n_layers
    assert patching.first_difference(target.tokens[:3], tokens[:3], 50) == 44
    assert patching.first_difference(target.tokens, target.tokens, 50) == 49  # capped
    assert patching.first_differences(target.tokens, tokens).tolist() == changed.tolist()
    chosen = None if positions is None else torch.tensor(positions)
    for head in all_heads(model.cfg):
        one = patch_heads(model, target, source, [head], positions=chosen, progress=False)
        assert torch.equal(sweep.delta_em[head.layer, head.head], one.delta_em), head
        torch.testing.assert_close(
            sweep.delta_nll[head.layer, head.head], one.delta_nll, atol=1e-5, rtol=0
        )


def test_mean_head_outputs_are_the_reference_mean(organism: Organism) -> None:
    """Mean ablation replaces a head by its mean over the reference, per position."""
    model = organism.model
    reference = organism.heldout
    means = patching.mean_head_outputs(model, reference, [1])
    _, cache = model.run_with_cache(reference.tokens, names_filter=hook_name("z", 1))
    torch.testing.assert_close(means[1], cache[hook_name("z", 1)].mean(0), atol=1e-6, rtol=0)


def test_bad_input_and_errors_leave_model_unchanged(
    organism: Organism, pair: Any, unchanged: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = organism.model
    target, source = pair
    with pytest.raises(ValueError, match="does not exist"):
        patch_heads(model, target, source, ["L9H0"], progress=False)
    with pytest.raises(ValueError, match="pair them"):
        patch_heads(model, target, source[[0, 1]], progress=False)
    with pytest.raises(ValueError, match="needs mean_over"):
        ablate_heads(model, target, kind="mean", progress=False)
    with pytest.raises(ValueError, match="'zero' or 'mean'"):
        ablate_heads(model, target, kind="avg", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source paragraphs"):
        patching_sweep(model, target, progress=False)
    with pytest.raises(ValueError, match="positions"):
        ablate_heads(model, target, positions=[100], progress=False)

    def broken(*args: object, **kwargs: object) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(patching, "exact_match_length", broken)
    with unchanged(model), pytest.raises(RuntimeError, match="boom"):
        patching_sweep(model, target, source, progress=False)
    with unchanged(model), pytest.raises(RuntimeError, match="boom"):
        patch_heads(model, target, source, progress=False)
