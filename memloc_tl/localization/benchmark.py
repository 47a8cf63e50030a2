"""Is a localization real? Two benchmarks with ground truth: INJ and DEL.

- **INJ** (:func:`injection_benchmark`): paragraphs the model does not know are injected into
  known units (:func:`~memloc_tl.localization.injection.inject_paragraphs`); each localizer is
  asked where each paragraph is, and scored by the share of its true units among its top
  ``|truth|`` units (recall = precision there), and among the top 0.1% (weights). Beside the
  localizers stand the trivial baselines: ``random`` (chance = the injected fraction),
  ``magnitude`` (|w|: finds weights an injection inflated) and ``oracle`` (|delta w|, which
  needs the original weights: the ceiling). Heads: the rank of the injected head (1 = first).
- **DEL** (:func:`deletion_benchmark`): for each memorized paragraph, its top units by a
  localizer are zeroed; a real localization takes that paragraph's recall and leaves the other
  memorized paragraphs and general text alone. Specificity is the target's EM drop minus the
  others' mean EM drop.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from tqdm.auto import tqdm

from memloc_tl.core.backend import HookedModel
from memloc_tl.core.forward import exact_match_length, score_continuations
from memloc_tl.core.objectives import attributed_parameters
from memloc_tl.core.paragraphs import Paragraphs
from memloc_tl.core.rendering import render
from memloc_tl.core.results import Drawable
from memloc_tl.core.unembedding import shared_unembedding
from memloc_tl.core.validation import (
    check_bool,
    check_choice,
    check_config,
    check_fraction,
    check_positive_int,
)
from memloc_tl.localization.injection import Injection, InjectionConfig, inject_paragraphs
from memloc_tl.localization.localizers import (
    METHODS,
    LocalizeConfig,
    forward_backward_seconds,
    localize,
)
from memloc_tl.localization.units import Level, Localization, Units, check_level

BASELINES = ("random", "magnitude", "oracle")


@dataclass(frozen=True)
class BenchmarkConfig:
    """Which localizers INJ and DEL score, with which settings, over which seeds.

    Attributes:
        methods: localizers and baselines (default: every localizer of the level, plus
            ``"magnitude"`` and, for INJ, ``"oracle"`` at the weights level).
        seeds: INJ: one injection per seed (different units), its localizers run with that
            seed. DEL runs once: one seed.
        localize: the localizers' settings (their ``seed`` is the run's).
        strict: INJ: raise :class:`~memloc_tl.localization.injection.InjectionError` at a
            failed or damaging injection (before any localizer runs) instead of warning.
    """

    methods: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0,)
    localize: LocalizeConfig = dataclasses.field(default_factory=LocalizeConfig)
    strict: bool = False

    def __post_init__(self) -> None:
        if self.methods is not None:
            if isinstance(self.methods, str) or not all(isinstance(m, str) for m in self.methods):
                raise TypeError(f"methods must be a tuple of names, got {self.methods!r}")
            object.__setattr__(self, "methods", tuple(self.methods))
        seeds = tuple(self.seeds) if not isinstance(self.seeds, (int, str)) else None
        if not seeds or any(isinstance(x, bool) or not isinstance(x, int) for x in seeds):
            raise ValueError(f"seeds must be a non-empty tuple of ints, got {self.seeds!r}")
        object.__setattr__(self, "seeds", seeds)
        if not isinstance(self.localize, LocalizeConfig):
            raise TypeError(f"localize must be a LocalizeConfig, got {self.localize!r}")
        check_bool(self.strict, "strict")


@dataclass(frozen=True)
class DeletionConfig:
    """What DEL zeroes.

    Attributes:
        level: ``"weights"``, ``"neurons"`` or ``"heads"``.
        fraction: weights and neurons: the share of units zeroed (paper: 0.1% of weights).
        n_units: instead of ``fraction``, a number of units (heads: default 1).
    """

    level: Level = "weights"
    fraction: float = 0.001
    n_units: int | None = None

    def __post_init__(self) -> None:
        check_level(self.level)
        if self.n_units is None:
            check_fraction(self.fraction, "fraction")
        else:
            check_positive_int(self.n_units, "n_units")


@dataclass(frozen=True)
class InjectionBenchmark(Drawable):
    """INJ results: one row per seed, paragraph and localizer.

    Attributes:
        frame: columns ``seed, paragraph, level, method, truth, recall, recall_at_0.1%,
            rank, seconds, cost`` (``cost``: seconds / one forward+backward of the target).
        injections: one summary row per injection (steps, EM, damage, |w| before/after).
    """

    frame: pd.DataFrame
    injections: pd.DataFrame

    @property
    def failed_seeds(self) -> list[int]:
        """Seeds whose injection did not reach EM = continuation length (no truth planted)."""
        return self._seeds_where("succeeded", False)

    @property
    def damaging_seeds(self) -> list[int]:
        """Seeds whose injection damaged the model beyond its config's bounds (see
        :attr:`~memloc_tl.localization.injection.Injection.damaging`): their truth was planted,
        but in a model that no longer behaves like the original."""
        return self._seeds_where("damaging", True)

    def _seeds_where(self, column: str, flag: bool) -> list[int]:
        """Seeds whose injection has ``column == flag`` (none where the column is absent)."""
        if column not in self.injections.columns:
            return []
        rows = self.injections[column].astype(bool) == flag
        return sorted(int(s) for s in self.injections.loc[rows, "seed"])

    def summary(self) -> pd.DataFrame:
        """Mean per localizer over the injections that succeeded: recall, recall at 0.1%,
        top-1 share (heads), cost; ``failed_runs`` counts the rows left out because their
        injection failed (scores against a truth that was never planted mean nothing), and
        ``damaging_runs`` the rows kept whose injection damaged the model."""
        failed = self.frame["seed"].isin(self.failed_seeds)
        damaging = self.frame["seed"].isin(self.damaging_seeds)
        frame = self.frame.assign(first=self.frame["rank"] == 1, failed=failed, harm=damaging)
        kept = frame[~frame["failed"]]
        summary = (
            kept.groupby("method", sort=False)
            .agg(
                recall=("recall", "mean"),
                recall_at_0_1=("recall_at_0.1%", "mean"),
                top1=("first", "mean"),
                mean_rank=("rank", "mean"),
                cost=("cost", "mean"),
                runs=("recall", "size"),
            )
            .reindex(frame["method"].unique())
            .reset_index()
        )
        counts = {m: int(group["failed"].sum()) for m, group in frame.groupby("method")}
        harm = {m: int(group["harm"].sum()) for m, group in kept.groupby("method")}
        summary["runs"] = summary["runs"].fillna(0).astype(int)
        summary["failed_runs"] = [counts[m] for m in summary["method"]]
        summary["damaging_runs"] = [harm.get(m, 0) for m in summary["method"]]
        return summary

    def to_frame(self) -> pd.DataFrame:
        return self.frame

    def figure(self) -> Any:
        return render(self)

    def __repr__(self) -> str:
        best = self.summary().sort_values("recall", ascending=False).head(3)
        top = ", ".join(f"{m} {r:.2f}" for m, r in zip(best["method"], best["recall"], strict=True))
        return f"InjectionBenchmark({len(self.frame)} rows; best recall: {top})"


@dataclass(frozen=True)
class DeletionBenchmark(Drawable):
    """DEL results: one row per target paragraph and localizer.

    Attributes:
        frame: columns ``paragraph, level, method, units, target_em_before, target_em_after,
            others_em_before, others_em_after, nonmem_nll_change, specificity``.
    """

    frame: pd.DataFrame

    def summary(self) -> pd.DataFrame:
        return (
            self.frame.groupby("method", sort=False)
            .agg(
                target_em_after=("target_em_after", "mean"),
                others_em_after=("others_em_after", "mean"),
                nonmem_nll_change=("nonmem_nll_change", "mean"),
                specificity=("specificity", "mean"),
                runs=("specificity", "size"),
            )
            .reset_index()
        )

    def to_frame(self) -> pd.DataFrame:
        return self.frame

    def figure(self) -> Any:
        return render(self)

    def __repr__(self) -> str:
        best = self.summary().sort_values("specificity", ascending=False).head(3)
        top = ", ".join(
            f"{m} {s:.1f}" for m, s in zip(best["method"], best["specificity"], strict=True)
        )
        return f"DeletionBenchmark({len(self.frame)} rows; best specificity: {top})"


def _methods(level: str, methods: Sequence[str] | None) -> list[str]:
    """The chosen localizers and baselines, checked (``None``: the level's defaults)."""
    chosen = _default_methods(level) if methods is None else list(methods)
    unknown = [m for m in chosen if m not in METHODS[level] and m not in BASELINES]
    if unknown:
        raise ValueError(f"unknown methods for {level}: {unknown}; choose from {METHODS[level]}")
    if "oracle" in chosen and level != "weights":
        raise ValueError("the oracle baseline (|delta w|) is a weights-level baseline")
    return chosen


def injection_benchmark(
    model: HookedModel,
    paragraphs: Paragraphs,
    *,
    keep: Paragraphs,
    config: InjectionConfig | None = None,
    benchmark: BenchmarkConfig | None = None,
    memorized: Paragraphs | None = None,
    general: Paragraphs | None = None,
    progress: bool = True,
) -> InjectionBenchmark:
    """INJ: inject ``paragraphs`` (all at once, each in its own units), then localize each.

    A failed or damaging injection warns and is marked in ``injections`` (``succeeded``,
    ``damaging``); the summary leaves failed ones out. ``BenchmarkConfig(strict=True)`` raises
    :class:`~memloc_tl.localization.injection.InjectionError` at the first one instead.

    Args:
        model: the model (not changed).
        paragraphs: paragraphs to inject (not memorized by ``model``).
        keep: paragraphs the injection's KL term and the localizers' keep terms use.
        config: the injection (level, fraction, ...); ``seed`` is replaced by each seed of
            ``benchmark``.
        benchmark: the localizers, their settings and the seeds (:class:`BenchmarkConfig`).
        memorized: already memorized paragraphs, to measure the injection's damage.
        general: general text, for perplexity.
        progress: show progress bars.
    """
    config = check_config(config, InjectionConfig)
    benchmark = check_config(benchmark, BenchmarkConfig, "benchmark")
    level = config.level
    chosen = _methods(level, benchmark.methods)
    rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    for seed in benchmark.seeds:
        injection = inject_paragraphs(
            model,
            paragraphs,
            keep=keep,
            config=_with_seed(config, seed),
            memorized=memorized,
            general=general,
            progress=progress,
            strict=benchmark.strict,
        )
        summaries.append(_injection_summary(injection, seed))
        settings = dataclasses.replace(benchmark.localize, seed=seed)
        bar = tqdm(range(len(paragraphs)), desc="localizing", disable=not progress)
        with injection.applied(model):  # the localizers read the injected model
            for i in bar:
                target = paragraphs[i : i + 1]
                unit = forward_backward_seconds(model, target, settings.batch_size)
                for method in chosen:
                    bar.set_postfix_str(method)  # which one runs now (the learned one is slow)
                    found = _localize(model, injection, target, method, keep, settings, progress)
                    rows.append(_score(found, injection.truth[i], seed, target.ids[0], unit))
    return InjectionBenchmark(pd.DataFrame(rows), pd.DataFrame(summaries))


def _default_methods(level: str) -> list[str]:
    extra = ["magnitude", "oracle"] if level == "weights" else []
    return list(dict.fromkeys([*METHODS[level], *extra]))


def _with_seed(config: InjectionConfig, seed: int) -> InjectionConfig:
    return dataclasses.replace(config, seed=seed)


def _localize(
    model: HookedModel,
    injection: Injection,
    target: Paragraphs,
    method: str,
    keep: Paragraphs,
    config: LocalizeConfig,
    progress: bool,
) -> Localization:
    if method == "oracle":
        return Localization("oracle", "weights", injection.oracle_scores(model))
    return localize(
        model,
        target,
        method=method,
        level=injection.config.level,
        keep=keep,
        config=config,
        progress=progress and method == "learned",  # the one localizer with a loop of steps
    )


def _score(
    found: Localization, truth: Units, seed: int, paragraph: str, unit_seconds: float
) -> dict[str, Any]:
    small = max(1, int(0.001 * found.total))
    return {
        "seed": seed,
        "paragraph": paragraph,
        "level": found.level,
        "method": found.method,
        "truth": truth.count,
        "recall": found.recall(truth),
        "recall_at_0.1%": found.recall(truth, small) if found.level == "weights" else float("nan"),
        "rank": found.rank_of(truth),
        "seconds": found.seconds,
        "cost": found.seconds / max(unit_seconds, 1e-9),
    }


def _injection_summary(injection: Injection, seed: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "seed": seed,
        "level": injection.config.level,
        "paragraphs": len(injection.paragraphs),
        "steps": injection.steps,
        "succeeded": injection.succeeded,
        "damaging": injection.damaging,
        **injection.damage,
        "em_before": float(injection.em_before.float().mean()),
        "em_after": float(injection.em_after.float().mean()),
        "abs_w_before": injection.magnitude[0],
        "abs_w_after": injection.magnitude[1],
    }
    for record in injection.evaluation.to_dict(orient="records"):
        key = f"{record['set']}_{record['metric']}"
        row[f"{key}_before"], row[f"{key}_after"] = record["before"], record["after"]
    return row


def _recall(
    model: HookedModel,
    paragraphs: Paragraphs,
    weights: dict[str, torch.Tensor] | None = None,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EM and mean NLL per paragraph, optionally with ``weights`` in place of the model's."""
    ems, nlls = [], []
    with torch.no_grad(), shared_unembedding():
        for start in range(0, len(paragraphs), batch_size):
            tokens = paragraphs.tokens[start : start + batch_size]
            match, nll = score_continuations(model, tokens, paragraphs.prefix_len, weights=weights)
            ems.append(exact_match_length(match).float().cpu())
            nlls.append(nll.mean(-1).cpu())
    return torch.cat(ems), torch.cat(nlls)


def zeroed(model: HookedModel, units: Units) -> dict[str, torch.Tensor]:
    """The attributed weights with ``units``' weights set to zero (for ``weights=`` calls)."""
    mask = units.weights(model)
    return {
        name: param.detach() * (~mask.boolean(name)).to(param.device, param.dtype)
        for name, param in attributed_parameters(model).items()
        if mask.count_in(name)
    }


def deletion_benchmark(
    model: HookedModel,
    targets: Paragraphs,
    *,
    others: Paragraphs,
    non_memorized: Paragraphs,
    config: DeletionConfig | None = None,
    benchmark: BenchmarkConfig | None = None,
    progress: bool = True,
) -> DeletionBenchmark:
    """DEL: zero each memorized target's top units; compare its EM with the others'.

    Args:
        model: the model (not changed: units are zeroed for one forward at a time).
        targets: memorized paragraphs, each localized and deleted on its own.
        others: other memorized paragraphs (the target itself is excluded by id).
        non_memorized: non-memorized paragraphs: the localizers' keep set, and their NLL change.
        config: the level and how many units are zeroed (:class:`DeletionConfig`).
        benchmark: the localizers (default every localizer of the level, and ``"magnitude"``
            for weights), their settings, and one seed (:class:`BenchmarkConfig`).
        progress: show a progress bar.
    """
    config = check_config(config, DeletionConfig)
    benchmark = check_config(benchmark, BenchmarkConfig, "benchmark")
    if len(benchmark.seeds) != 1:
        raise ValueError(
            f"DEL runs once, so it takes one seed; got seeds={benchmark.seeds} (run it per seed)"
        )
    level, fraction, n_units = config.level, config.fraction, config.n_units
    settings = dataclasses.replace(benchmark.localize, seed=benchmark.seeds[0])
    chosen = [m for m in _methods(level, benchmark.methods) if m != "oracle"]
    if len(targets) == 0 or len(others) == 0 or len(non_memorized) == 0:
        raise ValueError("targets, others and non_memorized must each hold paragraphs")
    for paragraphs in (targets, others, non_memorized):
        paragraphs.check_model(model)
    lonely = [pid for pid in targets.ids if all(other == pid for other in others.ids)]
    if lonely:
        raise ValueError(
            f"others holds no paragraph besides target {lonely[0]!r}: pass other memorized "
            "paragraphs to compare with"
        )
    if level == "heads" and n_units is None:
        n_units = 1
    rows: list[dict[str, Any]] = []
    base_target_em, _ = _recall(model, targets)
    base_others_em, _ = _recall(model, others)
    _, base_nonmem_nll = _recall(model, non_memorized)
    bar = tqdm(range(len(targets)), desc="deleting", disable=not progress)
    for i in bar:
        target = targets[i : i + 1]
        rest = others.select(torch.tensor([pid != target.ids[0] for pid in others.ids]))
        rest_before = base_others_em[torch.tensor([pid != target.ids[0] for pid in others.ids])]
        for method in chosen:
            bar.set_postfix_str(method)
            started = time.perf_counter()
            found = localize(
                model,
                target,
                method=method,
                level=level,
                keep=non_memorized,
                config=settings,
                progress=progress and method == "learned",
            )
            units = found.top(n_units) if n_units is not None else found.at_fraction(fraction)
            weights = zeroed(model, units)
            target_em = _recall(model, target, weights)[0]
            others_em = _recall(model, rest, weights)[0]
            nonmem_nll = _recall(model, non_memorized, weights)[1]
            target_drop = float(base_target_em[i] - target_em.mean())
            others_drop = float(rest_before.mean() - others_em.mean())
            rows.append(
                {
                    "paragraph": target.ids[0],
                    "level": level,
                    "method": method,
                    "units": units.count,
                    "target_em_before": float(base_target_em[i]),
                    "target_em_after": float(target_em.mean()),
                    "others_em_before": float(rest_before.mean()),
                    "others_em_after": float(others_em.mean()),
                    "nonmem_nll_change": float((nonmem_nll - base_nonmem_nll).mean()),
                    "specificity": target_drop - others_drop,
                    "seconds": time.perf_counter() - started,
                }
            )
    return DeletionBenchmark(pd.DataFrame(rows))


@dataclass(frozen=True)
class OrganismSets:
    """The organism's sets as the benchmarks use them.

    Attributes:
        inject: held-out paragraphs (never trained on): what INJ plants.
        memorized: the most repeated planted tier (memorized): DEL's targets and others, and
            where INJ measures its damage.
        keep: control paragraphs plus the second half of ``memorized``: the KL and keep terms.
        non_memorized: control paragraphs (trained on once, not memorized).
        general: the other half of the held-out set, for perplexity.
    """

    inject: Paragraphs
    memorized: Paragraphs
    keep: Paragraphs
    non_memorized: Paragraphs
    general: Paragraphs


def organism_sets(organism: Any) -> OrganismSets:
    """Split an :class:`~memloc_tl.organism.Organism`'s paragraphs for INJ and DEL."""
    tiers = torch.tensor(organism.planted.meta["tier"])
    memorized = organism.planted.select(tiers == 0)
    half_heldout = len(organism.heldout) // 2
    half_control = len(organism.control) // 2
    return OrganismSets(
        inject=organism.heldout[:half_heldout],
        memorized=memorized,
        keep=Paragraphs.concat(organism.control[:half_control], memorized[len(memorized) // 2 :]),
        non_memorized=organism.control[:half_control],
        general=organism.heldout[half_heldout:],
    )


def organism_benchmark(
    organism: Any,
    *,
    kind: Literal["inj", "del"] = "inj",
    level: Level = "heads",
    n_paragraphs: int = 2,
    config: InjectionConfig | DeletionConfig | None = None,
    benchmark: BenchmarkConfig | None = None,
    progress: bool = True,
) -> InjectionBenchmark | DeletionBenchmark:
    """INJ or DEL on an organism's own sets (see :func:`organism_sets`).

    Args:
        organism: a built :class:`~memloc_tl.organism.Organism`.
        kind: ``"inj"`` or ``"del"``.
        level: ``"weights"``, ``"neurons"`` or ``"heads"`` (replaces the level of ``config``).
        n_paragraphs: INJ: paragraphs injected at once; DEL: memorized targets.
        config: an :class:`~memloc_tl.localization.injection.InjectionConfig` for INJ, a
            :class:`DeletionConfig` for DEL (default: the defaults; DEL zeroes 0.1% of the
            weights or neurons, or one head).
        benchmark: the localizers, their settings and the seeds (:class:`BenchmarkConfig`).
        progress: show progress bars.
    """
    check_choice(kind, "kind", ("inj", "del"))
    level = check_level(level)
    if isinstance(n_paragraphs, bool) or not isinstance(n_paragraphs, int) or n_paragraphs < 1:
        raise ValueError(f"n_paragraphs must be an int >= 1, got {n_paragraphs!r}")
    wanted = InjectionConfig if kind == "inj" else DeletionConfig
    if config is not None and not isinstance(config, wanted):
        raise TypeError(
            f"kind={kind!r} takes a {wanted.__name__} as config, got {type(config).__name__}"
        )
    sets = organism_sets(organism)
    if kind == "inj":
        injection = dataclasses.replace(config or InjectionConfig(), level=level)
        assert isinstance(injection, InjectionConfig)
        return injection_benchmark(
            organism.model,
            sets.inject[:n_paragraphs],
            keep=sets.keep,
            config=injection,
            benchmark=benchmark,
            memorized=sets.memorized[: len(sets.memorized) // 2],
            general=sets.general,
            progress=progress,
        )
    deletion = dataclasses.replace(config or DeletionConfig(), level=level)
    assert isinstance(deletion, DeletionConfig)
    return deletion_benchmark(
        organism.model,
        sets.memorized[:n_paragraphs],
        others=sets.memorized,
        non_memorized=sets.non_memorized,
        config=deletion,
        benchmark=benchmark,
        progress=progress,
    )
