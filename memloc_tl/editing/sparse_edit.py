"""Unlearn or edit a memorized paragraph by fine-tuning 0.1% of the weights (paper 5.3, Fig. 5).

Objectives (teacher-forced on the continuation positions):

- ``"unlearn"`` (Eq. 3): ``-w * NLL(memorized) + KL(p_theta0 || p_theta)`` on the keep set;
- ``"edit"`` (Eq. 4): ``+w * NLL(target) + KL(...)``, with ``target`` e.g. the perturbed
  paragraphs from :func:`~memloc_tl.analysis.perturb_prefixes`. By default the target's NLL is
  teacher-forced on the target itself; ``edit_context="memorized"`` reproduces the reference
  code (the memorized context, the target's tokens as labels).

The mask is chosen once from the objective's gradient at the first step (``"gradient"``: the
global top ``fraction`` by |gradient|), at random with the same exact count (``"random"``), all
attributed weights (``"all"``), or given. Training runs under :class:`MaskedOptimizer`, so no
weight outside the mask moves — unlike the reference code, whose coupled weight decay moved all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.analysis.perturbation import PerturbConfig, perturb_prefixes
from memloc_tl.core.backend import HookedModel, parameter_masks, parameters_of
from memloc_tl.core.forward import greedy_continuations
from memloc_tl.core.objectives import (
    PositionLoss,
    Reference,
    SetTerm,
    attributed_parameters,
    attributed_weights,
    contrastive_kl,
    final_gradients,
    grad_only_for,
    kl_loss,
    nll_loss,
    original_logprobs,
    recomputed_reference,
    reduce_kl,
    stored_reference,
)
from memloc_tl.core.paragraphs import Paragraphs, check_set
from memloc_tl.core.rendering import render
from memloc_tl.core.results import Drawable
from memloc_tl.core.validation import (
    check_bool,
    check_choice,
    check_config,
    check_fraction,
    check_positive_int,
    check_real,
    check_seed,
)
from memloc_tl.editing.masks import ParamMask, TopByMagnitude, check_mask_fraction
from memloc_tl.editing.optimizer import MaskedOptimizer
from memloc_tl.editing.weight_edit import InPlaceTraining, WeightEdit, trained_in_place
from memloc_tl.memorization import scan_memorization

Objective = Literal["unlearn", "edit"]
MaskChoice = Literal["gradient", "random", "all"]
KLReduction = Literal["sum_positions", "mean"]
EditContext = Literal["target", "memorized"]
KLReference = Literal["auto", "stored", "recomputed"]


@dataclass(frozen=True)
class EditConfig:
    """The settings of one sparse edit (every value checked when the config is made).

    Attributes:
        objective: ``"unlearn"`` (Eq. 3) or ``"edit"`` (Eq. 4, needs ``target=``).
        mask: ``"gradient"`` (top ``fraction`` by |objective gradient| at the first step),
            ``"random"`` (same exact count, seeded), ``"all"``, or a :class:`ParamMask`.
        fraction: share of the attributed weights in a gradient or random mask (paper: 0.001).
        steps: optimizer steps (paper: 10).
        lr: Adam's learning rate (reference code: 1e-5).
        nll_weight: weight of the NLL term (Eq. 3/4: 1; reference code: 0.1).
        weight_decay: Adam's coupled weight decay (reference code: 1.0); masked like the step,
            so it moves no weight outside the mask.
        kl_reduction: ``"sum_positions"`` (reference code) or ``"mean"``.
        edit_context: ``"target"`` (teacher-force on the target) or ``"memorized"``
            (reference code: the memorized context, the target's tokens as labels).
        reextraction: also measure how much of the memorized continuation comes back when
            one prefix token is changed (max EM over single-token perturbations).
        seed: seed of a random mask and of the re-extraction perturbations.
        batch_size: paragraphs per forward/backward pass.
        checkpoint_blocks: recompute each block's activations in the backward pass instead of
            keeping all of them (on both backends; a bridge's Hugging Face blocks run under
            checkpointing for the call): one more forward of the blocks per step for a
            backward pass that holds one block's activations at a time. The same numbers
            either way.
        kl_reference: how the KL term gets the original model's log-probabilities of the
            keep paragraphs: ``"stored"`` computes them once and holds them (keep paragraphs x
            continuation positions x vocabulary floats: 10 MB per paragraph with a
            50,257-token vocabulary, so the memory grows with the keep set);
            ``"recomputed"`` runs each keep batch's blocks again at every step with the
            masked entries' original values put back for that forward, keeps the residual
            after the last block and unembeds ten positions at a time as the KL reads them
            (one more forward of the blocks per keep batch and step, a copy of the masked
            entries; nothing vocabulary-sized beyond one chunk); ``"auto"`` recomputes for a
            mask of under half the attributed weights (where putting the originals back is
            cheap) and stores otherwise. The held-out set's KL to the original model is
            measured the same way. The same numbers either way, to float rounding.
    """

    objective: Objective = "unlearn"
    mask: MaskChoice | ParamMask = "gradient"
    fraction: float = 0.001
    steps: int = 10
    lr: float = 1e-5
    nll_weight: float = 1.0
    weight_decay: float = 0.0
    kl_reduction: KLReduction = "sum_positions"
    edit_context: EditContext = "target"
    reextraction: bool = False
    seed: int = 0
    batch_size: int = 16
    checkpoint_blocks: bool = True
    kl_reference: KLReference = "auto"

    def __post_init__(self) -> None:
        check_choice(self.objective, "objective", typing.get_args(Objective))
        if not isinstance(self.mask, ParamMask):
            if not isinstance(self.mask, str) or self.mask not in typing.get_args(MaskChoice):
                options = ", ".join(map(repr, typing.get_args(MaskChoice)))
                raise ValueError(f"mask must be one of {options} or a ParamMask; got {self.mask!r}")
            if self.mask != "all":
                check_fraction(self.fraction, "fraction")
        check_positive_int(self.steps, "steps")
        check_real(self.lr, "lr", above=0)
        check_real(self.nll_weight, "nll_weight", at_least=0)
        check_real(self.weight_decay, "weight_decay", at_least=0)
        check_choice(self.kl_reduction, "kl_reduction", typing.get_args(KLReduction))
        check_choice(self.edit_context, "edit_context", typing.get_args(EditContext))
        check_bool(self.reextraction, "reextraction")
        check_seed(self.seed)
        check_positive_int(self.batch_size, "batch_size")
        check_bool(self.checkpoint_blocks, "checkpoint_blocks")
        check_choice(self.kl_reference, "kl_reference", typing.get_args(KLReference))

    @classmethod
    def reference_code(cls, **changes: Any) -> EditConfig:
        """The paper's reference code: 5 Adam steps with coupled weight decay 1.0, NLL weight
        0.1, the memorized context for an edit's labels (still masked: no weight outside the
        mask moves, unlike there). ``changes`` override single fields, e.g. ``lr=3e-2``."""
        preset = cls(steps=5, nll_weight=0.1, weight_decay=1.0, edit_context="memorized")
        return dataclasses.replace(preset, **changes)


@dataclass(frozen=True)
class EvalSets:
    """Paragraphs an edit is measured on besides the edited ones (each optional).

    Attributes:
        heldout: non-memorized paragraphs, not in ``keep``, to check the edit spares them
            (scored against the unedited model's own continuation, as the paper scored NMPs,
            and by their KL to it).
        others: other memorized paragraphs (not the edited ones), to check the edit is
            specific: they should stay memorized. Put them in ``keep`` too for an edit that
            protects them.
        general: paragraphs of general text for perplexity before and after.
    """

    heldout: Paragraphs | None = None
    others: Paragraphs | None = None
    general: Paragraphs | None = None

    def __post_init__(self) -> None:
        for name in ("heldout", "others", "general"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Paragraphs):
                raise TypeError(f"{name} must be Paragraphs or None, got {type(value).__name__}")


@dataclass(frozen=True)
class EditResult(Drawable):
    """An edit: its mask, the weights it changed, the losses, and the evaluation.

    The result holds the change, not a model: ``with result.applied(model): ...`` puts it in
    the model it was made on (or a fresh copy of it) for the block only.

    Attributes:
        mask: the weights that were allowed to change.
        edit: the change itself (apply, revert, applied, save).
        objective: ``"unlearn"`` or ``"edit"``.
        losses: the objective's value before each step.
        evaluation: before/after measurements, one row per set and metric.
    """

    mask: ParamMask
    edit: WeightEdit
    objective: Objective
    losses: list[float]
    evaluation: pd.DataFrame = field(default_factory=pd.DataFrame)

    def metric(self, set_name: str, metric: str) -> tuple[float, float]:
        """``(before, after)`` of one evaluation row."""
        frame = self.evaluation
        row = frame.loc[(frame["set"] == set_name) & (frame["metric"] == metric)]
        if len(row) == 0:
            raise KeyError(f"no evaluation row for set {set_name!r}, metric {metric!r}")
        return float(row["before"].to_numpy()[0]), float(row["after"].to_numpy()[0])

    def to_frame(self) -> pd.DataFrame:
        """The evaluation: columns set, metric, before, after."""
        return self.evaluation.copy()

    def figure(self, metric: str = "mean_em") -> Any:
        """Before and after per evaluated set (:func:`memloc_tl.viz.edit_result_figure`)."""
        return render(self, metric=metric)

    def applied(self, model: HookedModel) -> contextlib.AbstractContextManager[HookedModel]:
        """``with result.applied(model): ...``: the edit is in ``model`` inside the block only
        (restored on exit, also on an error); see :meth:`WeightEdit.applied`."""
        return self.edit.applied(model)

    def revert(self, model: HookedModel) -> None:
        """Undo an edit left in ``model`` (``inplace=True``) exactly."""
        self.edit.revert(model)

    def __repr__(self) -> str:
        before, after = self.metric("edited", "mean_em") if not self.evaluation.empty else (0, 0)
        others = ""
        sets = set(self.evaluation["set"]) if "set" in self.evaluation.columns else set()
        if "others" in sets:
            was, now = self.metric("others", "mean_em")
            others = f", other memorized {was:.1f} -> {now:.1f}"
        return (
            f"EditResult({self.objective}, {self.mask!r}, "
            f"edited mean EM {before:.1f} -> {after:.1f}{others})"
        )


def _objective_terms(
    model: HookedModel,
    memorized: Paragraphs,
    keep: Paragraphs,
    reference: Reference,
    target: Paragraphs | None,
    config: EditConfig,
) -> list[SetTerm]:
    """The objective's two terms (Eq. 3 or 4): the memorized set's (negated or target) NLL
    times ``nll_weight``, and the keep set's KL to theta_0."""
    p = memorized.prefix_len
    weight = config.nll_weight
    blocks = config.checkpoint_blocks
    device = model.cfg.device

    def unlearn(tokens: Tensor, start: int) -> tuple[Tensor, PositionLoss]:
        return tokens, nll_loss(tokens.to(device), p)

    def edit(tokens: Tensor, start: int) -> tuple[Tensor, PositionLoss]:
        assert target is not None
        labels = target.tokens[start : start + len(tokens)].to(device)
        context = labels if config.edit_context == "target" else tokens
        return context, nll_loss(labels, p)

    def kl(tokens: Tensor, start: int) -> tuple[Tensor, PositionLoss]:
        return tokens, kl_loss(reference(tokens, start))

    sign = -1.0 if config.objective == "unlearn" else 1.0

    def weighted_nll(per_position: Tensor) -> Tensor:
        return sign * weight * per_position.mean(-1).mean()

    def reduced_kl(per_position: Tensor) -> Tensor:
        return reduce_kl(per_position, config.kl_reduction)

    nll_batch = unlearn if config.objective == "unlearn" else edit
    return [
        SetTerm(memorized, nll_batch, weighted_nll, blocks),
        SetTerm(keep, kl, reduced_kl, blocks),
    ]


def _sparse(model: HookedModel, config: EditConfig) -> bool:
    """Does the mask select under half of the attributed weights?"""
    if isinstance(config.mask, ParamMask):
        return 2 * config.mask.count < config.mask.total
    if config.mask == "all":
        return False
    total = sum(w.value.numel() for w in attributed_weights(model).values())
    return 2 * check_mask_fraction(model, config.fraction) < total


def _mask(
    model: HookedModel,
    terms: list[SetTerm],
    config: EditConfig,
) -> ParamMask:
    choice = config.mask
    if isinstance(choice, ParamMask):
        return choice
    if choice == "all":
        return ParamMask.all(model)
    if choice == "random":
        return ParamMask.random(model, fraction=config.fraction, seed=config.seed)
    # each matrix's gradient goes into the top k as it comes (in one backward pass when every
    # set fits a batch); the mask ParamMask.from_gradients(accumulated_gradients(...)) makes
    top = TopByMagnitude(attributed_parameters(model), fraction=config.fraction)
    final_gradients(model, terms, config.batch_size, top.add)
    return top.mask("gradient")


def sparse_edit(
    model: HookedModel,
    memorized: Paragraphs,
    *,
    keep: Paragraphs,
    target: Paragraphs | None = None,
    config: EditConfig | None = None,
    evaluate_on: EvalSets | None = None,
    inplace: bool = False,
    progress: bool = True,
) -> EditResult:
    """Unlearn (Eq. 3) or edit (Eq. 4) memorized paragraphs through a sparse weight mask.

    The edit is trained in ``model`` itself (no copy of the model is made), measured, and
    taken out again unless ``inplace=True``: an error or Ctrl-C at any point, also during the
    evaluation, leaves the model's weights and its own ``.grad`` tensors as they were.

    Args:
        model: the model to edit.
        memorized: the paragraphs to unlearn or edit.
        keep: paragraphs whose predictions must stay (the KL term).
        target: for ``objective="edit"``, the paragraphs to teach instead (row-aligned with
            ``memorized``), e.g. ``perturb_prefixes(...).perturbed``.
        config: the objective, mask and optimizer settings (default :class:`EditConfig`;
            ``EditConfig.reference_code()`` for the paper's code).
        evaluate_on: more sets to measure before and after (:class:`EvalSets`).
        inplace: leave the edit in ``model`` (undo it with ``result.revert(model)``).
        progress: show a progress bar.
    """
    config = check_config(config, EditConfig)
    sets = check_config(evaluate_on, EvalSets, "evaluate_on")
    check_set(model, memorized, "memorized")
    check_set(model, keep, "keep")
    if config.objective == "edit" and target is None:
        raise ValueError(
            "objective='edit' needs target paragraphs (e.g. perturb_prefixes(...).perturbed)"
        )
    if target is not None and target.tokens.shape != memorized.tokens.shape:
        raise ValueError("target must be row-aligned with memorized (same shape)")
    if isinstance(config.mask, ParamMask):
        config.mask.check_model(model)
    elif config.mask != "all":
        check_mask_fraction(model, config.fraction)
    for paragraphs in (memorized, keep, target, sets.heldout, sets.others, sets.general):
        if paragraphs is not None:
            paragraphs.check_model(model)
    batch_size = config.batch_size
    heldout = None
    if sets.heldout is not None:  # the model's own continuation, as the paper scored NMPs
        prefix, n = sets.heldout.prefix, sets.heldout.continuation_len
        heldout = sets.heldout.with_continuation(
            greedy_continuations(model, prefix, n, progress=progress)
        )
    # the same measurements before and after; after, also the held-out KL to the original
    evaluate = functools.partial(
        _evaluate, model, memorized, target, heldout, sets, config, progress=progress
    )
    before = evaluate(heldout_reference=None)
    stored = config.kl_reference == "stored" or (
        config.kl_reference == "auto" and not _sparse(model, config)
    )
    # theta_0's log-probabilities: stored now, or recomputed with the original entries put back
    in_training: list[InPlaceTraining] = []  # the training scope, once it is entered

    def original() -> contextlib.AbstractContextManager[None]:
        return in_training[0].original_values() if in_training else contextlib.nullcontext()

    def reference_of(paragraphs: Paragraphs) -> Reference:
        if stored:
            return stored_reference(original_logprobs(model, paragraphs, batch_size))
        return recomputed_reference(model, paragraphs.prefix_len, original)

    reference = reference_of(keep)
    heldout_reference = reference_of(heldout) if heldout is not None else None
    terms = _objective_terms(model, memorized, keep, reference, target, config)
    chosen = _mask(model, terms, config)
    chosen_weights = attributed_weights(model)
    trained = parameters_of(chosen_weights)
    losses: list[float] = []
    # All or nothing: until the result exists, an error or interrupt (also during the
    # evaluation) puts the weights back; the caller's own .grad tensors are given back.
    with trained_in_place(model, chosen, keep=inplace) as run:
        in_training.append(run)
        inner = torch.optim.Adam(trained, lr=config.lr, weight_decay=config.weight_decay)
        optimizer = MaskedOptimizer(inner, parameter_masks(chosen_weights, chosen.selections))
        # a sparse mask's steps need only its entries' gradients: gathered as they come
        compact = optimizer.mode == "compact"
        gathering = optimizer.gathering_gradients() if compact else contextlib.nullcontext()
        with grad_only_for(model, trained), gathering:
            steps = range(config.steps)
            for _ in tqdm(steps, desc=f"{config.objective} ({chosen.kind})", disable=not progress):
                optimizer.zero_grad()
                total = 0.0
                for term in terms:
                    paragraphs = term.paragraphs
                    for start in range(0, len(paragraphs), batch_size):
                        tokens = paragraphs.tokens[start : start + batch_size].to(model.cfg.device)
                        share = len(tokens) / len(paragraphs)
                        loss = term.batch_loss(model, tokens, start) * share
                        loss.backward()
                        total += float(loss.detach())
                losses.append(total)
                optimizer.step()
        optimizer.zero_grad()
        del optimizer, inner  # the optimizer's state before the evaluation's forward passes
        edit = run.edit()
        after = evaluate(heldout_reference=heldout_reference)
    return EditResult(
        mask=chosen,
        edit=edit,
        objective=config.objective,
        losses=losses,
        evaluation=before_after(before, after),
    )


def before_after(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Rows (set, metric, before, after) from two (set, metric, value) frames, in the order
    they were measured; a row measured on one side only has NaN on the other."""
    keys = ["set", "metric"]
    rows = pd.concat([before[keys], after[keys]]).drop_duplicates()
    evaluation = rows.merge(before, on=keys, how="left").merge(
        after, on=keys, how="left", suffixes=("_before", "_after")
    )
    evaluation = evaluation.rename(columns={"value_before": "before", "value_after": "after"})
    return evaluation.reset_index(drop=True)


def measure_sets(
    model: HookedModel,
    sets: Mapping[str, Paragraphs | None],
    general: Paragraphs | None = None,
) -> pd.DataFrame:
    """Rows (set, metric, value): each set's mean EM, memorized share and mean NLL, and the
    perplexity of ``general``; ``None`` sets are skipped."""
    rows: list[dict[str, object]] = []
    for name, paragraphs in sets.items():
        if paragraphs is None or len(paragraphs) == 0:
            continue
        scan = scan_memorization(model, paragraphs, progress=False)
        em = scan.exact_match.float()
        rows.append({"set": name, "metric": "mean_em", "value": float(em.mean())})
        full = float((em == paragraphs.continuation_len).float().mean())
        rows.append({"set": name, "metric": "memorized_share", "value": full})
        rows.append({"set": name, "metric": "mean_nll", "value": float(scan.nll.mean())})
    if general is not None:
        scan = scan_memorization(model, general, progress=False)
        perplexity = float(scan.token_nll.mean().exp())
        rows.append({"set": "general", "metric": "perplexity", "value": perplexity})
    return pd.DataFrame(rows, columns=["set", "metric", "value"])


def _evaluate(
    model: HookedModel,
    memorized: Paragraphs,
    target: Paragraphs | None,
    heldout: Paragraphs | None,
    sets: EvalSets,
    config: EditConfig,
    heldout_reference: Reference | None,
    progress: bool = False,
) -> pd.DataFrame:
    named = {"edited": memorized, "target": target, "heldout": heldout, "others": sets.others}
    frame = measure_sets(model, named, sets.general)
    rows: list[dict[str, object]] = frame.to_dict(orient="records")

    def add(set_name: str, metric: str, value: float) -> None:
        rows.append({"set": set_name, "metric": metric, "value": value})

    if heldout is not None:
        if heldout_reference is None:
            add("heldout", "kl_to_original", 0.0)
        else:  # the mean over paragraphs and positions, a batch at a time
            total = 0.0
            for start in range(0, len(heldout), config.batch_size):
                tokens = heldout.tokens[start : start + config.batch_size]
                reference = heldout_reference(tokens, start)
                with torch.no_grad():
                    kl = contrastive_kl(
                        model, tokens, reference, heldout.prefix_len, reduction="mean"
                    )
                total += float(kl) * len(tokens)
            add("heldout", "kl_to_original", total / len(heldout))
    if config.reextraction:
        perturbed = perturb_prefixes(
            model,
            memorized,
            config=PerturbConfig(seed=config.seed),
            build_perturbed=False,
            progress=progress,
        )
        best = perturbed.em.max(dim=-1).values.max(dim=-1).values
        add("edited", "reextraction_max_em", float(best.float().mean()))
    return pd.DataFrame(rows)


def compare_edits(
    model: HookedModel,
    memorized: Paragraphs,
    *,
    keep: Paragraphs,
    masks: tuple[MaskChoice, ...] = ("gradient", "random", "all"),
    config: EditConfig | None = None,
    evaluate_on: EvalSets | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, EditResult]]:
    """Run the same edit with a gradient mask, a random mask and all weights (paper Fig. 5).

    Every edit is trained in ``model`` and taken out again before the next, so one model is in
    memory; the results hold the changes (``results["gradient"].applied(model)``).

    Returns:
        A table (one row per mask and evaluation metric: before, after) and the results.
    """
    config = check_config(config, EditConfig)
    if isinstance(masks, str) or not masks:
        raise ValueError(f"masks must be a non-empty tuple of mask choices, got {masks!r}")
    runs = {choice: dataclasses.replace(config, mask=choice) for choice in masks}  # checked
    results = {
        choice: sparse_edit(
            model, memorized, keep=keep, config=run, evaluate_on=evaluate_on, progress=progress
        )
        for choice, run in runs.items()
    }
    table = pd.concat(
        [r.evaluation.assign(mask=name, weights=r.mask.count) for name, r in results.items()],
        ignore_index=True,
    )
    return table, results
