"""Prefix-token perturbation: the fast EM of every variant equals real greedy decoding."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

import memloc_tl.core.forward as forward
from memloc_tl.analysis import PerturbConfig, PrefixPerturbation, perturb_prefixes
from memloc_tl.core.backend import tl_major
from memloc_tl.core.forward import (
    PrefixKV,
    cached_length,
    greedy_continuations,
    score_continuations,
)
from memloc_tl.core.paragraphs import Paragraphs
from memloc_tl.memorization import scan_memorization
from memloc_tl.organism import Organism

pytestmark = pytest.mark.backend  # run 2 (TransformerLens 4) runs it: tests/docs/test_ci.py


def leading_matches(generated: torch.Tensor, reference: torch.Tensor) -> list[int]:
    counts = []
    for row_generated, row_reference in zip(generated.tolist(), reference.tolist(), strict=True):
        count = 0
        for a, b in zip(row_generated, row_reference, strict=True):
            if a != b:
                break
            count += 1
        counts.append(count)
    return counts


def test_variant_em_equals_greedy_decoding(organism: Organism, unchanged: Any) -> None:
    paragraphs = organism.planted[[0, 9]]  # a memorized and a partly memorized paragraph
    with unchanged(organism.model):
        result = perturb_prefixes(
            organism.model, paragraphs, config=PerturbConfig(n_samples=2, seed=3), progress=False
        )
    n, p, s = result.em.shape
    assert (n, p, s) == (2, 50, 2)
    for row in range(n):
        variants = paragraphs.tokens[row].repeat(p - 1, s, 1).view(-1, 100).clone()
        positions = torch.arange(1, p).repeat_interleave(s)
        samples = torch.arange(s).repeat(p - 1)
        variants[torch.arange(len(variants)), positions] = result.replacements[
            row, positions, samples
        ]
        generated = greedy_continuations(organism.model, variants[:, :50], 50, batch_size=64)
        expected = leading_matches(generated, variants[:, 50:])
        assert result.em[row, positions, samples].tolist() == expected
    # replacements never equal the original token; position 0 untouched by default
    assert (result.replacements[:, 1:] != paragraphs.prefix[:, 1:, None]).all()
    assert (result.replacements[:, 0] == -1).all()
    assert (result.em[:, 0] == -1).all()
    assert result.perturbed_positions.tolist() == [False] + [True] * 49


def test_nll_and_aggregates_match_the_scan(organism: Organism) -> None:
    paragraphs = organism.planted[[0, 1, 2]]
    result = perturb_prefixes(
        organism.model, paragraphs, config=PerturbConfig(seed=1), progress=False
    )
    base = scan_memorization(organism.model, paragraphs, progress=False)
    assert torch.equal(result.baseline_em, base.exact_match)
    # one variant, re-scored independently
    variant = paragraphs.tokens[1].clone()
    variant[17] = result.replacements[1, 17, 0]
    one = scan_memorization(organism.model, Paragraphs.from_tokens(variant[None]), progress=False)
    assert result.em[1, 17, 0] == one.exact_match[0]
    assert result.nll[1, 17, 0].item() == pytest.approx(one.nll[0].item(), abs=1e-5)
    drop = (base.exact_match[:, None] - result.em[:, 1:, 0]).float()
    assert result.mean_drop_per_token() == pytest.approx(drop.mean().item(), abs=1e-5)
    torch.testing.assert_close(result.mean_drop_per_position()[1:], drop.mean(0))
    assert torch.isnan(result.mean_drop_per_position()[0])
    assert result.mean_drop_per_token() > 0  # perturbing a memorized prefix hurts recall
    frame = result.to_frame()
    assert len(frame) == 3 * 49
    assert result.top(1)[0][2] == drop.max().item()


def test_perturbed_paragraphs_are_the_pmps(organism: Organism) -> None:
    paragraphs = organism.planted[[0, 1, 2, 3]]
    result = perturb_prefixes(
        organism.model, paragraphs, config=PerturbConfig(seed=0, include_first=True), progress=False
    )
    pmp = result.perturbed
    assert pmp is not None
    differs = pmp.prefix != paragraphs.prefix
    assert (differs.sum(-1) == 1).all()  # exactly one prefix token changed
    positions = torch.tensor(pmp.meta["position"])
    assert torch.equal(differs.float().argmax(-1), positions)
    # the chosen position has the lowest EM of all variants
    assert torch.equal(result.em[torch.arange(4), positions, 0], result.em[:, :, 0].min(-1).values)
    # the continuation is the model's own greedy one
    assert torch.equal(pmp.continuation, greedy_continuations(organism.model, pmp.prefix, 50))
    assert result.em[:, 0].min() >= 0  # position 0 was perturbed too


def test_seeded_and_validated(organism: Organism) -> None:
    paragraphs = organism.control[[0, 1]]

    def scores(config: PerturbConfig) -> PrefixPerturbation:
        return perturb_prefixes(
            organism.model, paragraphs, config=config, build_perturbed=False, progress=False
        )

    a, b, c = (scores(PerturbConfig(seed=seed)) for seed in (5, 5, 6))
    assert torch.equal(a.replacements, b.replacements)
    assert torch.equal(a.em, b.em)
    assert not torch.equal(a.replacements, c.replacements)
    assert a.perturbed is None
    greedy = scores(PerturbConfig(seed=5, em_against="greedy"))
    assert greedy.baseline_em.tolist() == [50, 50]  # the model's own continuation
    assert torch.equal(
        greedy.paragraphs.continuation,
        greedy_continuations(organism.model, paragraphs.prefix, 50),
    )
    with pytest.raises(ValueError, match="em_against"):
        PerturbConfig(em_against="preds")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_samples"):
        PerturbConfig(n_samples=0)
    with pytest.raises(TypeError, match="PerturbConfig"):
        perturb_prefixes(organism.model, paragraphs, config={"seed": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Paragraphs"):
        perturb_prefixes(organism.model, paragraphs.tokens)  # type: ignore[arg-type]


def test_shared_prefix_cache_gives_the_same_scores(organism: Organism, unchanged: Any) -> None:
    # Positions mixed within a batch (batch_size 7 does not divide 49) and paragraphs in two
    # chunks: the cached path must agree with recomputing every position.
    paragraphs = organism.planted[[0, 3, 9]]
    base = PerturbConfig(n_samples=2, seed=5, batch_size=7, include_first=True)
    kwargs: dict[str, Any] = {"build_perturbed": False, "progress": False}
    # on both backends: TransformerLens 3's cache, or (a bridge) Hugging Face's
    with unchanged(organism.model):
        cached = perturb_prefixes(
            organism.model, paragraphs, config=replace(base, shared_prefix=True), **kwargs
        )
    plain = perturb_prefixes(
        organism.model, paragraphs, config=replace(base, shared_prefix=False), **kwargs
    )
    assert torch.equal(cached.em, plain.em)
    torch.testing.assert_close(cached.nll, plain.nll, atol=1e-4, rtol=1e-4, equal_nan=True)


def test_on_a_cpu_variants_run_within_a_scan_forward_budget(
    organism: Organism, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget of 5 windows per forward splits batches of 16 variants: the same numbers."""
    paragraphs = organism.planted[[0, 3]]
    config = PerturbConfig(seed=2, batch_size=16)
    kwargs: dict[str, Any] = {"build_perturbed": False, "progress": False}
    whole = perturb_prefixes(organism.model, paragraphs, config=config, **kwargs)
    monkeypatch.setattr(forward, "CPU_FORWARD_TOKENS", 5 * paragraphs.seq_len)
    rows: list[int] = []

    def count(activation: torch.Tensor, hook: Any) -> None:
        rows.append(activation.shape[0])

    last = f"blocks.{organism.model.cfg.n_layers - 1}.hook_resid_post"
    with organism.model.hooks(fwd_hooks=[(last, count)]):
        capped = perturb_prefixes(organism.model, paragraphs, config=config, **kwargs)
    assert max(rows) == 5
    assert sum(rows) >= int((whole.em >= 0).sum())  # every variant ran, 5 at most at a time
    assert torch.equal(capped.em, whole.em)
    torch.testing.assert_close(capped.nll, whole.nll, atol=1e-5, rtol=0, equal_nan=True)


def test_prefix_kv_cache_reproduces_the_full_forward(organism: Organism) -> None:
    """On both backends: a HookedTransformer's frozen TransformerLens cache, or a bridge's
    Hugging Face cache, made fresh for each forward from tensors that no forward writes."""
    model = organism.model
    tokens = organism.planted.tokens[:3]
    shared = PrefixKV.build(model, tokens)
    assert shared.hugging_face == (tl_major() >= 4)
    assert len(shared.keys) == model.cfg.n_layers
    assert shared.keys[0].shape == (3, 100, model.cfg.n_heads, model.cfg.d_head)
    rows = torch.tensor([2, 0])
    cache = shared.cache(rows, 30)
    match, nll = score_continuations(model, tokens[rows], 50, past_kv_cache=cache)
    full_match, full_nll = score_continuations(model, tokens[rows], 50)
    assert torch.equal(match, full_match)
    torch.testing.assert_close(nll, full_nll, atol=1e-4, rtol=1e-4)
    assert cached_length(cache) == 30  # the call did not grow it
    before = [k.clone() for k in shared.keys]
    again, again_nll = score_continuations(model, tokens[rows], 50, past_kv_cache=cache)
    assert torch.equal(again, match)
    assert torch.equal(again_nll, nll)
    assert all(torch.equal(k, b) for k, b in zip(shared.keys, before, strict=True))
    with pytest.raises(ValueError, match="must hold < 50"):
        score_continuations(model, tokens[rows], 50, past_kv_cache=shared.cache(rows, 50))
    # the other backend's kind of cache is refused, before any forward
    other = replace(shared, hugging_face=not shared.hugging_face).cache(rows, 30)
    with pytest.raises(ValueError, match="the model's own kind of cache"):
        score_continuations(model, tokens[rows], 50, past_kv_cache=other)
    with pytest.raises(TypeError, match=r"must be a key/value cache.*got dict"):
        score_continuations(model, tokens[rows], 50, past_kv_cache={"keys": shared.keys})


def test_pmp_choices_follow_their_rule(organism: Organism) -> None:
    paragraphs = organism.planted[[0, 1, 2]]
    kwargs: dict[str, Any] = {"progress": False}
    excluded = perturb_prefixes(
        organism.model,
        paragraphs,
        config=PerturbConfig(n_samples=2, seed=4, pmp_exclude_last=10),
        **kwargs,
    )
    by_nll = perturb_prefixes(
        organism.model,
        paragraphs,
        config=PerturbConfig(n_samples=2, seed=4, pmp_choice="max_nll"),
        **kwargs,
    )
    # the same variants were scored; only the choice of PMP differs
    assert torch.equal(excluded.em, by_nll.em)
    assert excluded.perturbed is not None
    assert by_nll.perturbed is not None
    em, nll = excluded.em, excluded.nll
    for row in range(len(paragraphs)):
        # independent: the lowest EM among positions < 40, earliest position and sample
        candidates = [(int(em[row, pos, k]), pos, k) for pos in range(1, 40) for k in range(2)]
        _, position, _ = min(candidates)
        assert excluded.perturbed.meta["position"][row] == position
        flat = int(nll[row, 1:].flatten().argmax())
        assert by_nll.perturbed.meta["position"][row] == 1 + flat // 2
    assert set(by_nll.perturbed.meta["chosen_by"]) == {"max_nll"}
    with pytest.raises(ValueError, match="pmp_choice"):
        PerturbConfig(pmp_choice="max_em")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pmp_exclude_last"):  # needs the prefix length
        perturb_prefixes(organism.model, paragraphs, config=PerturbConfig(pmp_exclude_last=49))
