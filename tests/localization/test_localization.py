"""Injection with ground truth, localizers scored against it, and the INJ/DEL benchmarks."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from memloc_tl.core.backend import copy_model
from memloc_tl.core.objectives import attributed_parameters, attributed_weights
from memloc_tl.localization import (
    METHODS,
    BenchmarkConfig,
    DeletionConfig,
    InjectionConfig,
    LearnedMaskConfig,
    Localization,
    LocalizeConfig,
    Units,
    deletion_benchmark,
    inject_paragraphs,
    injection_benchmark,
    localize,
)
from memloc_tl.localization.injection import Injection
from memloc_tl.memorization import scan_memorization
from memloc_tl.organism import Organism

HEAD_INJECTION = InjectionConfig(
    level="heads", heads=("L1H1",), preserve="none", lr=3e-3, kl_weight=0.1, max_steps=300
)


@pytest.fixture(scope="module")
def head_injection(organism: Organism) -> Injection:
    """One held-out paragraph injected into head L1H1 of the tiny organism."""
    before = {n: p.detach().clone() for n, p in organism.model.state_dict().items()}
    injection = inject_paragraphs(
        organism.model,
        organism.heldout[:1],
        keep=organism.control[:8],
        config=HEAD_INJECTION,
        memorized=organism.planted[:4],
        progress=False,
    )
    for name, value in organism.model.state_dict().items():  # trained in it, taken out again
        assert torch.equal(value, before[name]), name
    return injection


@pytest.fixture(scope="module")
def injected(organism: Organism, head_injection: Injection) -> Any:
    """A second copy of the tiny organism with the head injection applied to it."""
    model = copy_model(organism.model)
    head_injection.edit.apply(model)
    return model


def test_injection_reaches_em_50_and_changes_only_its_head(
    organism: Organism, head_injection: Injection, injected: Any, unchanged: Any
) -> None:
    injection = head_injection
    assert injection.succeeded, injection
    em = scan_memorization(injected, organism.heldout[:1], progress=False).exact_match
    assert int(em[0]) == organism.heldout.continuation_len  # checked independently
    assert int(injection.em_before[0]) < organism.heldout.continuation_len
    assert injection.truth[0].heads() == [injection.truth[0].heads()[0]]
    assert str(injection.truth[0].heads()[0]) == "L1H1"
    original = attributed_parameters(organism.model)
    changed = attributed_parameters(injected)
    allowed = injection.weights[0].masks
    moved = 0
    for name, param in changed.items():
        differs = param.detach() != original[name].detach()
        assert not bool((differs & ~allowed[name]).any()), f"{name} changed outside the head"
        moved += int(differs.sum())
    assert moved > 0
    # every other parameter (embeddings, biases, LayerNorm) is bit-identical
    holding = {id(w.param) for w in attributed_weights(injected).values()}
    others = dict(organism.model.named_parameters())
    for name, param in injected.named_parameters():
        if id(param) not in holding:
            assert torch.equal(param, others[name]), name
    # the scope puts the same values in the original model, and takes them out again
    with unchanged(organism.model), injection.applied(organism.model) as inside:
        for name, param in attributed_parameters(inside).items():
            assert torch.equal(param, changed[name]), name


def test_quantile_preservation_keeps_the_injected_values(organism: Organism) -> None:
    """The injected entries are a rearrangement of their original values: |w| reveals nothing."""
    config = InjectionConfig(level="heads", heads=("L0H2",), preserve="quantile", max_steps=5)
    injection = inject_paragraphs(
        organism.model,
        organism.heldout[:1],
        keep=organism.control[:4],
        config=config,
        progress=False,
    )
    edit = injection.edit
    assert edit.count > 0
    for name in edit.mask.names:
        torch.testing.assert_close(
            edit.after[name].sort().values, edit.before[name].sort().values, rtol=0, atol=0
        )
    assert any(not torch.equal(edit.after[n], edit.before[n]) for n in edit.mask.names)
    before, after = injection.magnitude
    assert math.isclose(before, after, rel_tol=1e-5)


def test_exact_head_ablation_finds_the_injected_head(
    organism: Organism, head_injection: Injection, injected: Any, unchanged: Any
) -> None:
    target = organism.heldout[:1]
    truth = head_injection.truth[0]
    with unchanged(injected):
        found = localize(injected, target, method="zero_ablation", level="heads")
    assert found.rank_of(truth) == 1
    assert found.head_scores().top(1)[0][0] == truth.heads()[0]


def test_zero_ablation_equals_a_hand_written_loop(
    organism: Organism, head_injection: Injection, injected: Any
) -> None:
    """The batched per-unit ablation equals ablating each head alone in a plain loop."""
    from memloc_tl.analysis.patching import ablate_heads

    model, target = injected, organism.heldout[:1]
    found = localize(model, target, method="zero_ablation", level="heads")
    for layer, head in [(0, 0), (1, 1), (1, 3)]:
        alone = ablate_heads(model, target, [f"L{layer}H{head}"], progress=False)
        expected = float((alone.nll - alone.baseline_nll).mean())
        assert found.scores[f"blocks.{layer}.attn.hook_z"][head] == pytest.approx(
            expected, abs=1e-4
        )


def test_neuron_zero_ablation_equals_a_hand_written_loop(organism: Organism) -> None:
    from memloc_tl.core.forward import score_continuations
    from memloc_tl.core.hooks import make_unit_scale_hook

    model, target = organism.model, organism.planted[:2]
    found = localize(
        model,
        target,
        method="zero_ablation",
        level="neurons",
        config=LocalizeConfig(ablation_batch=7),
    )
    with torch.no_grad():  # score_continuations is a batch step: its callers disable autograd
        _, base = score_continuations(model, target.tokens, target.prefix_len)
    for layer, index in [(0, 3), (1, 100)]:
        scale = torch.ones(model.cfg.d_mlp)
        scale[index] = 0
        name = f"blocks.{layer}.mlp.hook_post"
        with torch.no_grad(), model.hooks(fwd_hooks=[(name, make_unit_scale_hook(scale))]):
            _, nll = score_continuations(model, target.tokens, target.prefix_len)
        expected = float((nll.mean(-1) - base.mean(-1)).mean())
        assert found.scores[name][index] == pytest.approx(expected, abs=1e-4)


def test_attribution_is_the_derivative_of_scaling_a_unit(organism: Organism) -> None:
    """-(dNLL/d gate) at gate 1, checked by a finite difference of the gate."""
    from memloc_tl.core.forward import score_continuations
    from memloc_tl.core.hooks import make_unit_scale_hook

    model, target = organism.model, organism.control[:2]
    found = localize(model, target, method="attribution", level="heads")
    name, head, eps = "blocks.0.attn.hook_z", 2, 1e-2

    def nll_at(gate: float) -> float:
        scale = torch.ones(model.cfg.n_heads)
        scale[head] = gate
        with torch.no_grad(), model.hooks(fwd_hooks=[(name, make_unit_scale_hook(scale))]):
            _, nll = score_continuations(model, target.tokens, target.prefix_len)
        return float(nll.mean(-1).mean())

    slope = (nll_at(1 + eps) - nll_at(1 - eps)) / (2 * eps)
    assert float(found.scores[name][head]) == pytest.approx(-slope, rel=2e-2, abs=1e-5)


def test_truth_scores_recall_one_and_random_scores_about_the_fraction(
    organism: Organism,
) -> None:
    model = organism.model
    generator = torch.Generator().manual_seed(3)
    params = attributed_parameters(model)
    truth = Units(
        "weights",
        {n: torch.rand(p.shape, generator=generator) < 0.02 for n, p in params.items()},
    )
    handed = Localization("truth", "weights", {n: m.float() for n, m in truth.masks.items()})
    assert handed.recall(truth) == 1.0
    recalls = [
        localize(
            model, organism.planted[:1], method="random", config=LocalizeConfig(seed=seed)
        ).recall(truth)
        for seed in range(3)
    ]
    # hypergeometric: mean 0.02 x |truth| hits; with |truth| ~ 2,000, 6 sigma is about 0.02
    share = truth.count / truth.total
    for recall in recalls:
        assert abs(recall - share) < 6 * math.sqrt(share / truth.count)


def test_learned_mask_is_reproducible_and_finds_the_head(
    organism: Organism, head_injection: Injection, injected: Any, unchanged: Any
) -> None:
    config = LearnedMaskConfig(steps=40)
    target, keep = organism.heldout[:1], organism.control[8:16]
    with unchanged(injected):
        first = localize(
            injected,
            target,
            method="learned",
            level="heads",
            keep=keep,
            config=LocalizeConfig(learned=config, seed=1),
        )
    second = localize(
        injected,
        target,
        method="learned",
        level="heads",
        keep=keep,
        config=LocalizeConfig(learned=config, seed=1),
    )
    for name, score in first.scores.items():
        assert torch.equal(score, second.scores[name])
    assert first.rank_of(head_injection.truth[0]) == 1


def test_every_localizer_leaves_the_model_unchanged_also_when_it_raises(
    organism: Organism, unchanged: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, target, keep = organism.model, organism.planted[:1], organism.control[:4]
    quick = LearnedMaskConfig(steps=2)
    for level, methods in METHODS.items():
        for method in methods:
            with unchanged(model):
                found = localize(
                    model,
                    target,
                    method=method,
                    level=level,  # type: ignore[arg-type]
                    keep=keep,
                    config=LocalizeConfig(learned=quick, ig_steps=2),
                )
            assert all(torch.isfinite(s).all() for s in found.scores.values()), (level, method)
    import memloc_tl.core.forward as memorization

    real = memorization.replaced_weights

    @contextlib.contextmanager
    def broken(*args: Any) -> Iterator[None]:
        with real(*args):  # fails while the gated weights stand in for the model's own
            raise RuntimeError("boom")
        yield

    monkeypatch.setattr(memorization, "replaced_weights", broken)
    with unchanged(model), pytest.raises(RuntimeError, match="boom"):
        localize(model, target, method="learned", keep=keep, config=LocalizeConfig(learned=quick))


def test_bad_input_is_refused_before_any_work(organism: Organism) -> None:
    model = organism.model
    with pytest.raises(ValueError, match="method for weights"):
        localize(model, organism.planted[:1], method="zero_ablation")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level must be"):
        localize(model, organism.planted[:1], method="random", level="layers")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs keep"):
        localize(model, organism.planted[:1], method="learned")
    with pytest.raises(ValueError, match="no paragraphs"):
        localize(model, organism.planted[:0], method="random")
    with pytest.raises(ValueError, match="batch_size"):
        LocalizeConfig(batch_size=0)
    with pytest.raises(TypeError, match="LocalizeConfig"):
        localize(model, organism.planted[:1], method="gradient", config={"seed": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no paragraph besides target"):
        deletion_benchmark(
            model,
            organism.planted[:1],
            others=organism.planted[:1],
            non_memorized=organism.control[:2],
            progress=False,
        )
    with pytest.raises(ValueError, match="preserve"):
        InjectionConfig(preserve="scale")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distinct heads"):
        inject_paragraphs(
            model,
            organism.heldout[:2],
            keep=organism.control[:2],
            config=InjectionConfig(level="heads", heads=("L0H0", "L0H0")),
            progress=False,
        )


def test_weight_injection_trains_disjoint_subsets_of_the_fraction(organism: Organism) -> None:
    config = InjectionConfig(fraction=0.05, max_steps=3, preserve="norm")
    injection = inject_paragraphs(
        organism.model,
        organism.heldout[:2],
        keep=organism.control[:4],
        config=config,
        progress=False,
    )
    first, second = injection.truth
    total = first.total
    assert first.count == second.count == int(0.05 * total)
    assert first.overlap(second) == 0
    assert injection.steps == 3
    for name in injection.edit.mask.names:  # norm preservation: same L2 norm per matrix
        before, after = injection.edit.before[name], injection.edit.after[name]
        assert float(after.norm()) == pytest.approx(float(before.norm()), rel=1e-4)


def test_benchmarks_round_trip_to_frames(
    organism: Organism, head_injection: Injection, injected: Any
) -> None:
    inj = injection_benchmark(
        organism.model,
        organism.heldout[:1],
        keep=organism.control[:8],
        config=HEAD_INJECTION,
        benchmark=BenchmarkConfig(methods=("zero_ablation", "attribution", "random")),
        progress=False,
    )
    frame = inj.to_frame()
    assert set(frame["method"]) == {"zero_ablation", "attribution", "random"}
    assert frame.loc[frame["method"] == "zero_ablation", "rank"].iloc[0] == 1
    summary = inj.summary()
    assert summary.loc[summary["method"] == "zero_ablation", "top1"].iloc[0] == 1.0
    assert bool(inj.injections["succeeded"].all())
    assert inj.figure().data[0].y is not None

    deletion = deletion_benchmark(
        organism.model,
        organism.planted[:2],
        others=organism.planted[2:8],
        non_memorized=organism.control[:8],
        config=DeletionConfig(fraction=0.01),
        benchmark=BenchmarkConfig(methods=("grad_x_weight", "random")),
        progress=False,
    )
    frame = deletion.to_frame()
    assert len(frame) == 4
    assert set(frame["paragraph"]) == set(organism.planted.ids[:2])
    expected = (frame["target_em_before"] - frame["target_em_after"]) - (
        frame["others_em_before"] - frame["others_em_after"]
    )
    torch.testing.assert_close(
        torch.tensor(frame["specificity"].to_numpy()), torch.tensor(expected.to_numpy())
    )


def test_a_failed_injection_is_a_warning_naming_the_ems(organism: Organism) -> None:
    from memloc_tl.localization import InjectionFailedWarning

    target = organism.heldout[:1]  # never trained on: one step cannot plant it
    config = InjectionConfig(level="heads", heads=("L1H1",), max_steps=1, check_every=1)
    with pytest.warns(InjectionFailedWarning, match=r"did not succeed: after 1 steps EM is"):
        injection = inject_paragraphs(
            organism.model, target, keep=organism.control[:2], config=config, progress=False
        )
    assert not injection.succeeded


def test_the_inj_summary_leaves_out_failed_injections() -> None:
    import pandas as pd

    from memloc_tl.localization import InjectionBenchmark

    rows = [
        {"seed": seed, "method": method, "recall": recall, "recall_at_0.1%": float("nan"),
         "rank": rank, "cost": 1.0}
        for seed, method, recall, rank in [
            (0, "zero_ablation", 1.0, 1), (1, "zero_ablation", 0.0, 9),
            (0, "random", 0.0, 5), (1, "random", 1.0, 1),
        ]
    ]  # fmt: skip
    injections = pd.DataFrame({"seed": [0, 1], "succeeded": [True, False]})
    bench = InjectionBenchmark(pd.DataFrame(rows), injections)
    assert bench.failed_seeds == [1]
    summary = bench.summary().set_index("method")
    assert summary.loc["zero_ablation", "recall"] == 1.0  # seed 1's 0.0 is left out
    assert summary.loc["random", "top1"] == 0.0
    assert summary["runs"].tolist() == [1, 1]
    assert summary["failed_runs"].tolist() == [1, 1]


def test_damage_is_measured_by_hand_and_bounds_turn_it_into_a_warning(
    organism: Organism, head_injection: Injection, injected: Any
) -> None:
    import dataclasses
    import warnings

    from memloc_tl.localization import InjectionDamageWarning
    from memloc_tl.localization.injection import report_problems

    memorized = organism.planted[:4]
    before = scan_memorization(organism.model, memorized, progress=False).exact_match
    after = scan_memorization(injected, memorized, progress=False).exact_match
    damage = head_injection.damage
    assert damage["memorized_em_drop"] == pytest.approx(float((before - after).float().mean()))
    assert math.isnan(damage["perplexity_ratio"])  # no general set given: not measured
    drop = damage["memorized_em_drop"]
    assert head_injection.damaging == (drop > HEAD_INJECTION.max_em_drop)
    # the same injection under a bound it exceeds is damaging, and says so with its numbers
    tight = dataclasses.replace(head_injection, config=dataclasses.replace(
        HEAD_INJECTION, max_em_drop=drop - 0.5
    ))  # fmt: skip
    assert tight.damaging
    assert tight.succeeded
    with pytest.warns(InjectionDamageWarning, match=rf"mean EM fell by {drop:.1f} tokens"):
        report_problems(tight, strict=False)
    loose = dataclasses.replace(tight, config=dataclasses.replace(tight.config, max_em_drop=50.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report_problems(loose, strict=False)  # clean: nothing to say
    assert loose.problems() == []


def test_strict_injection_raises_before_any_localizer_runs(
    organism: Organism, unchanged: Any
) -> None:
    from memloc_tl.localization import InjectionError

    config = InjectionConfig(level="heads", heads=("L1H1",), max_steps=1, check_every=1)
    with unchanged(organism.model), pytest.raises(InjectionError, match="did not succeed"):
        injection_benchmark(
            organism.model,
            organism.heldout[:1],
            keep=organism.control[:2],
            config=config,
            benchmark=BenchmarkConfig(methods=("random",), strict=True),
            progress=False,
        )


def test_the_inj_summary_counts_damaging_runs_but_keeps_them() -> None:
    import pandas as pd

    from memloc_tl.localization import InjectionBenchmark

    rows = [
        {"seed": seed, "method": "random", "recall": recall, "recall_at_0.1%": float("nan"),
         "rank": 1, "cost": 1.0}
        for seed, recall in [(0, 1.0), (1, 0.0)]
    ]  # fmt: skip
    injections = pd.DataFrame(
        {"seed": [0, 1], "succeeded": [True, True], "damaging": [False, True]}
    )
    bench = InjectionBenchmark(pd.DataFrame(rows), injections)
    assert bench.damaging_seeds == [1]
    assert bench.failed_seeds == []
    summary = bench.summary().set_index("method")
    assert summary.loc["random", "recall"] == 0.5
    assert summary.loc["random", "damaging_runs"] == 1


def test_a_registered_localizer_runs_in_localize_and_del_like_a_built_in_one(
    organism: Organism, unchanged: Any
) -> None:
    from memloc_tl.localization import register_localizer, unregister_localizer
    from memloc_tl.localization.units import unit_shapes

    model = organism.model

    def output_norm(task: Any) -> dict[str, torch.Tensor]:
        return {
            name: task.model.blocks[int(name.split(".")[1])].attn.W_O.detach().norm(dim=(1, 2))
            for name in unit_shapes(task.model, task.level)
        }

    def my_magnitude(task: Any) -> dict[str, torch.Tensor]:
        return {n: p.detach().abs() for n, p in attributed_parameters(task.model).items()}

    register_localizer("output_norm", output_norm, levels=["heads"])
    register_localizer("my_magnitude", my_magnitude, levels=["weights"])
    try:
        assert "output_norm" in METHODS["heads"]
        assert "output_norm" not in METHODS["weights"]
        with unchanged(model):
            found = localize(model, organism.planted[:1], method="output_norm", level="heads")
        expected = torch.stack([block.attn.W_O.detach().norm(dim=(1, 2)) for block in model.blocks])
        torch.testing.assert_close(found.head_scores().scores, expected)
        # the same name runs over training checkpoints (the registry is read at the call)
        from memloc_tl import load_model, localize_over_checkpoints, mask_drift
        from memloc_tl.checkpoints import analyses

        assert analyses()["output_norm"] == "largest"
        last = dataclasses.replace(
            organism.checkpoints, checkpoints=organism.checkpoints.checkpoints[-1:]
        )
        timeline = localize_over_checkpoints(
            last, organism.planted[:1], analysis="output_norm", progress=False
        )
        final = load_model(last.checkpoints[0].source)
        by_hand = torch.stack([block.attn.W_O.detach().norm(dim=(1, 2)) for block in final.blocks])
        torch.testing.assert_close(timeline.scores[0], by_hand.float())
        two = dataclasses.replace(
            organism.checkpoints, checkpoints=organism.checkpoints.checkpoints[-2:]
        )
        drifts = [
            mask_drift(two, organism.planted[:1], method=method, progress=False)
            for method in ("my_magnitude", "magnitude")
        ]
        assert drifts[0].sizes.tolist() == drifts[1].sizes.tolist()
        assert drifts[0].shared.tolist() == drifts[1].shared.tolist()
        assert 0 < int(drifts[0].shared[0]) <= int(drifts[0].sizes[0])
        deletion = deletion_benchmark(
            model,
            organism.planted[:1],
            others=organism.planted[1:4],
            non_memorized=organism.control[:4],
            config=DeletionConfig(fraction=0.01),
            benchmark=BenchmarkConfig(methods=("magnitude", "my_magnitude")),
            progress=False,
        )
        rows = deletion.to_frame().set_index("method")
        columns = ["units", "target_em_after", "others_em_after", "specificity"]
        assert rows.loc["my_magnitude", columns].tolist() == rows.loc["magnitude", columns].tolist()
        with pytest.raises(ValueError, match="exists"):
            register_localizer("output_norm", output_norm, levels=["heads"])
        register_localizer(
            "output_norm", lambda task: {"blocks.0.attn.hook_z": 1}, levels=["heads"], replace=True
        )
        with unchanged(model), pytest.raises(ValueError, match="one score tensor per unit group"):
            localize(model, organism.planted[:1], method="output_norm", level="heads")
        with pytest.raises(ValueError, match="level must be"):
            register_localizer("bad", output_norm, levels=["layers"])  # type: ignore[list-item]
    finally:
        unregister_localizer("output_norm")
        unregister_localizer("my_magnitude")
    assert "output_norm" not in METHODS["heads"]
    from memloc_tl.checkpoints import analyses

    assert "output_norm" not in analyses()
