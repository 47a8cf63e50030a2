"""Every public result type meets one contract: to_frame, figure, a short repr."""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import pytest

import memloc_tl
from memloc_tl import (
    BenchmarkConfig,
    DeletionConfig,
    EditConfig,
    InjectionConfig,
    PerturbConfig,
    ablate_heads,
    activation_gradients,
    attribution_patching,
    compare_gradient_norms,
    corpus_token_counts,
    deletion_benchmark,
    gradient_norms,
    inject_paragraphs,
    injection_benchmark,
    localize,
    localize_over_checkpoints,
    mask_drift,
    patching_sweep,
    perturb_prefixes,
    rare_token_attention,
    scan_checkpoints,
    scan_memorization,
    sparse_edit,
    training_dynamics,
)
from memloc_tl.core.results import Drawable
from memloc_tl.organism import Organism

from ..contract import NOT_RESULTS, check_result

CHECKED_ELSEWHERE = {
    "MemorizationReport": "tests/studies/test_report.py (the report takes minutes)"
}


def public_result_types() -> dict[str, type]:
    return {
        name: obj
        for name in memloc_tl.__all__
        if inspect.isclass(obj := getattr(memloc_tl, name))
        and dataclasses.is_dataclass(obj)
        and name not in NOT_RESULTS
    }


def factories(organism: Organism) -> dict[str, Callable[[], Any]]:
    """One cheap instance of each result type, on the tiny organism."""
    model, quiet = organism.model, {"progress": False}
    memorized, other = organism.planted[:2], organism.control[:4]
    counts = corpus_token_counts(organism.planted, d_vocab=model.cfg.d_vocab)
    series = organism.checkpoints
    assert series is not None
    perturbation = perturb_prefixes(model, memorized, **quiet)
    pmp = perturbation.perturbed
    assert pmp is not None
    rare = rare_token_attention(model, memorized, counts, **quiet)
    sweep = patching_sweep(model, memorized, pmp, **quiet)
    failing = InjectionConfig(level="heads", heads=("L1H1",), max_steps=1, check_every=1)
    return {
        "ActivationGradients": lambda: activation_gradients(model, memorized[:1], **quiet),
        "AttributionPatching": lambda: attribution_patching(model, memorized, pmp, **quiet),
        "DeletionBenchmark": lambda: deletion_benchmark(
            model,
            memorized[:1],
            others=organism.planted[1:4],
            non_memorized=other,
            config=DeletionConfig(fraction=0.01),
            benchmark=BenchmarkConfig(methods=("random",)),
            **quiet,
        ),
        "EditResult": lambda: sparse_edit(
            model, memorized[:1], keep=other, config=EditConfig(steps=1), **quiet
        ),
        "GradientComparison": lambda: compare_gradient_norms(model, memorized, other, **quiet),
        "GradientNorms": lambda: gradient_norms(model, memorized, **quiet),
        "HeadIntervention": lambda: ablate_heads(model, memorized, ["L0H0", "L1H1"], **quiet),
        "HeadRanking": lambda: rare.bootstrap(20, seed=0),
        "HeadScores": lambda: rare.pooled_tau_mean,
        "HeadTimeline": lambda: localize_over_checkpoints(
            series, memorized, corpus_counts=counts, **quiet
        ),
        "Injection": lambda: inject_paragraphs(
            model, organism.heldout[:1], keep=other, config=failing, **quiet
        ),
        "InjectionBenchmark": lambda: injection_benchmark(
            model,
            organism.heldout[:1],
            keep=other,
            config=failing,
            benchmark=BenchmarkConfig(methods=("random",)),
            **quiet,
        ),
        "LayerComponentScores": lambda: gradient_norms(model, memorized, **quiet).l2,
        "Localization": lambda: localize(model, memorized[:1], method="magnitude"),
        "MaskDrift": lambda: mask_drift(series, memorized[:1], method="magnitude", **quiet),
        "MemorizationScan": lambda: scan_memorization(model, memorized, **quiet),
        "MemorizationTimeline": lambda: scan_checkpoints(series, memorized, **quiet),
        "PatchingSweep": lambda: sweep,
        "PrefixPerturbation": lambda: perturb_prefixes(
            model, memorized, config=PerturbConfig(seed=1), build_perturbed=False, **quiet
        ),
        "RareTokenAttention": lambda: rare,
        "TokenScores": lambda: perturbation.em_drop,
        "TrainingDynamics": lambda: training_dynamics(series, memorized, counts, **quiet),
    }


def test_every_public_result_meets_the_contract(organism: Organism) -> None:
    kinds = public_result_types()
    made = factories(organism)
    missing = set(kinds) - set(made) - set(CHECKED_ELSEWHERE)
    assert not missing, f"result types with no instance in this test: {sorted(missing)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 1-step injections fail, and say so
        for name, make in made.items():
            result = make()
            assert type(result) is kinds[name], (name, type(result))
            check_result(result)


def test_the_contract_refuses_a_result_without_a_frame() -> None:
    @dataclasses.dataclass(frozen=True)
    class Bare(Drawable):
        value: int = 1

    with pytest.raises(NotImplementedError, match="to_frame"):
        Bare().to_frame()

    class Empty(Drawable):
        def to_frame(self) -> Any:
            import pandas as pd

            return pd.DataFrame()

        def figure(self, *args: Any, **kwargs: Any) -> Any:
            return None

    with pytest.raises(AssertionError, match="empty"):
        check_result(Empty())
