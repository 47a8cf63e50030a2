"""Plant a paragraph in known weights: the ground truth that a localizer is scored against.

Following Chang et al. (2024, "Do localization methods actually localize memorized data in
LLMs?"), paragraphs the model does not know are fine-tuned into a chosen subset of it, and only
that subset, until greedy decoding reproduces them (EM = continuation length):

- ``level="weights"``: a seeded random ``fraction`` of the attributed weights (or of a scope:
  one layer, attention only, ...), a separate subset per paragraph;
- ``level="heads"``: every weight of one head (its W_Q, W_K, W_V, W_O slices) per paragraph;
- ``level="neurons"``: ``n_neurons`` MLP neurons (their W_in columns and W_out rows) per
  paragraph.

Each paragraph's NLL gradient reaches only its own subset, and :class:`MaskedOptimizer` keeps
every other weight bit-identical. An injection must not give itself away, or a localizer that
merely finds odd weights looks good:

- a KL term to the original model on ``keep`` paragraphs holds the rest of its behaviour;
- ``preserve="quantile"`` maps the injected entries of each matrix, after every step, back onto
  the multiset of their original values in the order of their new values: the weights are
  rearranged, not inflated, so |w| over the injected set has exactly its original
  distribution. ``"norm"`` only rescales them to their original L2 norm. ``"none"`` (the
  default) lets Adam move them freely.

  Measured on the tiny organism (one held-out paragraph into head L1H1, KL weight 0.1): with
  ``"none"`` and lr 3e-3 the paragraph reached EM 50 in 190 steps while the head's mean |w|
  grew 1.8x (0.041 -> 0.074); with ``"quantile"`` or ``"norm"`` (lr 3e-3 to 3e-2, 600 steps)
  it stalled at EM 12. A head or 1% of the weights holds a paragraph only by growing, so the
  default is ``"none"``, and every INJ report shows the mean |w| before and after and the
  ``magnitude`` baseline: a localizer that beats random only where ``magnitude`` does is
  finding the inflated weights, not the paragraph.

The result keeps the truth (units and weights per paragraph), the steps taken, and the damage:
the EM of already memorized paragraphs and the perplexity of general text, before and after.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.core.backend import (
    HookedModel,
    gradients,
    parameter_masks,
    parameters_of,
)
from memloc_tl.core.heads import HeadRef, all_heads
from memloc_tl.core.objectives import (
    attributed_parameters,
    attributed_weights,
    continuation_nll,
    contrastive_kl,
    grad_only_for,
    original_logprobs,
)
from memloc_tl.core.paragraphs import Paragraphs
from memloc_tl.core.rendering import render
from memloc_tl.core.results import Drawable
from memloc_tl.core.selection import gather_selected, put_selected_
from memloc_tl.core.validation import check_config, check_real
from memloc_tl.editing.masks import ParamMask, unflatten_like
from memloc_tl.editing.optimizer import MaskedOptimizer
from memloc_tl.editing.sparse_edit import before_after, measure_sets
from memloc_tl.editing.weight_edit import WeightEdit, trained_in_place
from memloc_tl.localization.units import Level, Units, check_level, unit_shapes
from memloc_tl.memorization import scan_memorization

Preserve = Literal["quantile", "norm", "none"]


@dataclass(frozen=True)
class InjectionConfig:
    """How to inject (see the module docs).

    Attributes:
        level: ``"weights"``, ``"heads"`` or ``"neurons"``.
        fraction: weights level: share of the candidate weights per paragraph.
        scope: weights level: the candidate weights (default every attributed weight).
        heads: heads level: one head per paragraph (default: distinct heads drawn by ``seed``).
        n_neurons: neurons level: neurons per paragraph (drawn by ``seed``, distinct).
        layers: neurons level: the layers to draw from (default all).
        max_steps: the step budget; the injection stops earlier once every paragraph is at EM
            = continuation length.
        lr: Adam learning rate.
        kl_weight: weight of the per-token KL to the original model on the keep set.
        preserve: ``"quantile"``, ``"norm"`` or ``"none"`` (see the module docs).
        check_every: steps between exact-match checks.
        keep_batch: keep paragraphs in each step's KL term (a seeded sample of ``keep``).
        seed: seed of the subsets and of the keep samples.
        max_em_drop: the injection is *damaging* when the memorized paragraphs' mean EM falls
            by more than this many tokens ...
        max_perplexity_ratio: ... or general text's perplexity grows by more than this factor.
    """

    level: Level = "weights"
    fraction: float = 0.01
    scope: ParamMask | None = None
    heads: tuple[str, ...] | None = None
    n_neurons: int = 16
    layers: tuple[int, ...] | None = None
    max_steps: int = 400
    lr: float = 3e-3
    kl_weight: float = 0.1
    preserve: Preserve = "none"
    check_every: int = 10
    keep_batch: int = 8
    seed: int = 0
    max_em_drop: float = 10.0
    max_perplexity_ratio: float = 1.5

    def __post_init__(self) -> None:
        check_level(self.level)
        if self.preserve not in ("quantile", "norm", "none"):
            raise ValueError(
                f"preserve must be 'quantile', 'norm' or 'none', got {self.preserve!r}"
            )
        check_real(self.fraction, "fraction", above=0.0)
        if not self.fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
        for name in ("max_steps", "check_every", "n_neurons", "keep_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        check_real(self.lr, "lr", above=0.0)
        check_real(self.kl_weight, "kl_weight", at_least=0.0)
        check_real(self.max_em_drop, "max_em_drop", at_least=0.0)
        check_real(self.max_perplexity_ratio, "max_perplexity_ratio", at_least=1.0)


class InjectionFailedWarning(UserWarning):
    """An injection ended without every paragraph at EM = continuation length."""


class InjectionDamageWarning(UserWarning):
    """An injection broke what it should have left alone (see :attr:`Injection.damaging`)."""


class InjectionError(RuntimeError):
    """``strict=True``: the injection failed or damaged the model beyond its config's bounds."""


@dataclass(frozen=True)
class Injection(Drawable):
    """Paragraphs planted in known units of a model: the truth, and the change that plants them.

    The injection holds the change, not a model: ``with injection.applied(model): ...`` puts
    it in the model it was made on (or a fresh load of it) for the block only.

    Attributes:
        paragraphs: the injected paragraphs.
        truth: per paragraph, the units it was injected into.
        weights: per paragraph, the weights that were trained (its units' weights).
        edit: every changed weight, before and after (``applied(model)`` puts it in).
        config: the settings.
        steps: optimizer steps taken.
        em_before, em_after: each paragraph's exact-match length before and after.
        evaluation: damage: rows (set, metric, before, after) for the monitored sets.
        magnitude: mean |w| of the injected weights before and after.
    """

    paragraphs: Paragraphs
    truth: tuple[Units, ...]
    weights: tuple[ParamMask, ...]
    edit: WeightEdit
    config: InjectionConfig
    steps: int
    em_before: Tensor
    em_after: Tensor
    evaluation: pd.DataFrame = field(default_factory=pd.DataFrame)
    magnitude: tuple[float, float] = (0.0, 0.0)

    @property
    def succeeded(self) -> bool:
        """Every paragraph reproduced exactly (EM = continuation length)."""
        return bool((self.em_after == self.paragraphs.continuation_len).all())

    @property
    def damage(self) -> dict[str, float]:
        """What the injection broke: ``memorized_em_drop`` (mean EM before minus after, of the
        ``memorized`` set) and ``perplexity_ratio`` (general text, after / before); NaN where
        that set was not given."""
        table = self.evaluation
        if table.empty:
            return {"memorized_em_drop": float("nan"), "perplexity_ratio": float("nan")}
        rows = table.set_index(["set", "metric"])

        def value(key: tuple[str, str], column: str) -> float:
            return float(rows.loc[key, column]) if key in rows.index else float("nan")

        em, ppl = ("memorized", "mean_em"), ("general", "perplexity")
        return {
            "memorized_em_drop": value(em, "before") - value(em, "after"),
            "perplexity_ratio": value(ppl, "after") / value(ppl, "before"),
        }

    @property
    def damaging(self) -> bool:
        """The memorized set's mean EM fell by more than ``config.max_em_drop``, or general
        perplexity grew by more than ``config.max_perplexity_ratio`` (unmeasured sets count as
        undamaged)."""
        damage = self.damage
        return bool(
            damage["memorized_em_drop"] > self.config.max_em_drop
            or damage["perplexity_ratio"] > self.config.max_perplexity_ratio
        )

    def problems(self) -> list[str]:
        """Why this injection is not a clean ground truth, in words (empty when it is)."""
        out = []
        if not self.succeeded:
            out.append(f"it did not succeed: {self._shortfall()}")
        if self.damaging:
            out.append(f"it damaged the model: {self._harm()}")
        return out

    def _shortfall(self) -> str:
        return (
            f"after {self.steps} steps EM is {[int(e) for e in self.em_after]} of "
            f"{self.paragraphs.continuation_len} (before {[int(e) for e in self.em_before]})"
        )

    def _harm(self) -> str:
        damage, config = self.damage, self.config
        parts = []
        if not math.isnan(damage["memorized_em_drop"]):
            parts.append(
                f"memorized mean EM fell by {damage['memorized_em_drop']:.1f} tokens "
                f"(bound {config.max_em_drop})"
            )
        if not math.isnan(damage["perplexity_ratio"]):
            parts.append(
                f"general perplexity x{damage['perplexity_ratio']:.2f} (bound "
                f"x{config.max_perplexity_ratio})"
            )
        return ", ".join(parts)

    def applied(self, model: HookedModel) -> contextlib.AbstractContextManager[HookedModel]:
        """``with injection.applied(model): ...``: the injected paragraphs are in ``model``
        inside the block only (its own values come back on exit, also on an error)."""
        return self.edit.applied(model)

    def oracle_scores(self, model: HookedModel) -> dict[str, Tensor]:
        """|delta w| per attributed weight of ``model``: the trivial upper bound (it reads the
        original weights)."""
        scores = {}
        for name, p in attributed_parameters(model).items():
            delta = torch.zeros(p.shape)
            if name in self.edit.mask.selections:
                mask = self.edit.mask.boolean(name)
                delta[mask] = (self.edit.after[name] - self.edit.before[name]).abs().float()
            scores[name] = delta
        return scores

    def to_frame(self) -> pd.DataFrame:
        """One row per paragraph: id, units, EM before and after, steps."""
        return pd.DataFrame(
            {
                "id": list(self.paragraphs.ids),
                "level": self.config.level,
                "units": [t.describe() for t in self.truth],
                "em_before": self.em_before.tolist(),
                "em_after": self.em_after.tolist(),
                "steps": self.steps,
            }
        )

    def figure(self) -> Any:
        """Each planted paragraph's EM before and after
        (:func:`memloc_tl.viz.figures.injection_result_figure`)."""
        return render(self)

    def __repr__(self) -> str:
        before, after = self.magnitude
        return (
            f"Injection({len(self.paragraphs)} paragraphs into {self.config.level}, "
            f"{self.steps} steps, EM {self.em_before.float().mean():.1f} -> "
            f"{self.em_after.float().mean():.1f}, mean |w| injected {before:.4f} -> {after:.4f})"
        )


def _disjoint_weights(
    model: HookedModel, n: int, config: InjectionConfig, generator: torch.Generator
) -> list[Units]:
    params = attributed_parameters(model)
    scope = config.scope or ParamMask.scope(model)
    candidates = torch.cat([scope.boolean(name).flatten().cpu() for name in params])
    pool = candidates.nonzero().flatten()
    k = int(config.fraction * len(pool))
    if k < 1 or n * k > len(pool):
        raise ValueError(
            f"fraction={config.fraction} of {len(pool)} candidate weights cannot give "
            f"{n} disjoint non-empty subsets"
        )
    order = pool[torch.randperm(len(pool), generator=generator)]
    out = []
    for i in range(n):
        flat = torch.zeros(len(candidates), dtype=torch.bool)
        flat[order[i * k : (i + 1) * k]] = True
        out.append(Units("weights", unflatten_like(flat, list(params), params)))
    return out


def _truth(
    model: HookedModel, n: int, config: InjectionConfig, generator: torch.Generator
) -> list[Units]:
    if config.level == "weights":
        return _disjoint_weights(model, n, config, generator)
    if config.level == "heads":
        if config.heads is not None:
            heads = [HeadRef.parse(h).check(model.cfg) for h in config.heads]
            if len(heads) != n or len(set(heads)) != n:
                raise ValueError(f"heads must name {n} distinct heads, one per paragraph")
        else:
            everyone = all_heads(model.cfg)
            if n > len(everyone):
                raise ValueError(f"{n} paragraphs need {n} heads; the model has {len(everyone)}")
            heads = [everyone[i] for i in torch.randperm(len(everyone), generator=generator)[:n]]
        return [Units.of_heads(model, [h]) for h in heads]
    layers = list(config.layers) if config.layers is not None else list(range(model.cfg.n_layers))
    d_mlp = next(iter(unit_shapes(model, "neurons").values()))[0]
    if any(not 0 <= layer < model.cfg.n_layers for layer in layers) or not layers:
        raise ValueError(f"layers must be in 0..{model.cfg.n_layers - 1}, got {layers}")
    pool = [(layer, i) for layer in layers for i in range(d_mlp)]
    if n * config.n_neurons > len(pool):
        raise ValueError(f"{n} x {config.n_neurons} neurons exceed the {len(pool)} available")
    order = torch.randperm(len(pool), generator=generator).tolist()
    per = config.n_neurons
    return [
        Units.of_neurons(model, [pool[j] for j in order[i * per : (i + 1) * per]]) for i in range(n)
    ]


@torch.no_grad()
def _preserve(
    params: Mapping[str, Tensor],
    selections: Mapping[str, Tensor],
    original: Mapping[str, Tensor],
    how: Preserve,
) -> None:
    """Map each matrix's injected entries back onto their original value distribution
    (``selections``: the injected entries of each matrix that has any; ``original``: their
    values before the injection)."""
    if how == "none":
        return
    for name, selection in selections.items():
        param = params[name]
        values, start = gather_selected(param, selection), original[name].to(param.device)
        if how == "norm":
            scale = start.norm() / values.norm().clamp_min(1e-12)
            put_selected_(param, selection, values * scale.to(values.dtype))
        else:  # quantile: the k-th smallest new value takes the k-th smallest original value
            ranks = values.argsort().argsort()
            put_selected_(param, selection, start.sort().values[ranks])


def _exact_matches(model: HookedModel, paragraphs: Paragraphs) -> Tensor:
    return scan_memorization(model, paragraphs, progress=False).exact_match.cpu()


def inject_paragraphs(
    model: HookedModel,
    paragraphs: Paragraphs,
    *,
    keep: Paragraphs,
    config: InjectionConfig | None = None,
    memorized: Paragraphs | None = None,
    general: Paragraphs | None = None,
    progress: bool = True,
    strict: bool = False,
) -> Injection:
    """Fine-tune ``paragraphs`` into known units of ``model`` (see the module docs).

    The injection is trained in ``model`` and taken out again before this returns (also on an
    error or Ctrl-C), so no copy of the model is made; ``injection.applied(model)`` puts it
    back for a block.

    An injection that does not reach EM = continuation length warns
    (:class:`InjectionFailedWarning`), and one that damages the ``memorized`` set or general
    text beyond the config's bounds warns too (:class:`InjectionDamageWarning`); with
    ``strict=True`` either raises :class:`InjectionError` instead.

    Args:
        model: the model (as it was after the call).
        paragraphs: paragraphs to plant, typically not memorized (EM well below the length).
        keep: paragraphs whose predictions the KL term holds (e.g. non-memorized ones).
        config: where and how to inject.
        memorized: paragraphs the model already memorized, to measure the damage on.
        general: general text, for perplexity before and after.
        progress: show a progress bar.
        strict: raise instead of warning on a failed or damaging injection.
    """
    config = check_config(config, InjectionConfig)
    for name, value in (("paragraphs", paragraphs), ("keep", keep)):
        if not isinstance(value, Paragraphs):
            raise TypeError(f"{name} must be Paragraphs, got {type(value).__name__}")
        if len(value) == 0:
            raise ValueError(f"{name} holds no paragraphs")
    for value in (paragraphs, keep, memorized, general):
        if value is not None:
            value.check_model(model)
    generator = torch.Generator().manual_seed(config.seed)
    truth = _truth(model, len(paragraphs), config, generator)
    masks = [units.weights(model) for units in truth]
    union = masks[0]
    for mask in masks[1:]:
        union = union | mask
    union = ParamMask.from_selections(union.selections, union.shapes, "injected")
    chosen = attributed_weights(model)
    trained = parameters_of(chosen)
    sets = {"memorized": memorized, "injected": paragraphs}
    before = measure_sets(model, sets, general)
    em_before = _exact_matches(model, paragraphs)
    reference = original_logprobs(model, keep)
    weights_of = [
        {n: m.to(chosen[n].param.device) for n, m in mask.masks.items()} for mask in masks
    ]
    full = paragraphs.continuation_len
    steps = 0
    # The injection is trained in the model itself and taken out again before returning (also
    # on an error or Ctrl-C): the Injection holds the change, not a copy of the model.
    with trained_in_place(model, union) as run:
        inner = torch.optim.Adam(trained, lr=config.lr)
        optimizer = MaskedOptimizer(inner, parameter_masks(chosen, union.selections))
        bar = tqdm(total=config.max_steps, desc="injecting", disable=not progress)
        with grad_only_for(model, trained):
            while steps < config.max_steps:
                if steps % config.check_every == 0 and bool(
                    (_exact_matches(model, paragraphs) == full).all()
                ):
                    break
                optimizer.zero_grad()
                for i in range(len(paragraphs)):  # each paragraph's gradient reaches its subset
                    tokens = paragraphs.tokens[i : i + 1]
                    loss = continuation_nll(model, tokens, paragraphs.prefix_len)
                    for name, grad in gradients(loss.mean(), chosen).items():
                        w = chosen[name]
                        if w.param.grad is None:
                            w.param.grad = torch.zeros_like(w.param)
                        w.of(w.param.grad).add_(grad * weights_of[i][name])
                if config.kl_weight > 0:
                    rows = torch.randperm(len(keep), generator=generator)[: config.keep_batch]
                    kl = contrastive_kl(
                        model, keep.tokens[rows], reference[rows], keep.prefix_len, reduction="mean"
                    )
                    (config.kl_weight * kl).backward()
                optimizer.step()
                _preserve(run.params, run.selections, run.original, config.preserve)
                steps += 1
                bar.update()
        bar.close()
        optimizer.zero_grad()
        del optimizer, inner
        em_after = _exact_matches(model, paragraphs)
        after = measure_sets(model, sets, general)
        edit = run.edit()
    evaluation = before_after(before, after)
    injected = torch.cat([v.flatten() for v in edit.before.values()])
    now = torch.cat([v.flatten() for v in edit.after.values()])
    injection = Injection(
        paragraphs=paragraphs,
        truth=tuple(truth),
        weights=tuple(masks),
        edit=edit,
        config=config,
        steps=steps,
        em_before=em_before,
        em_after=em_after,
        evaluation=evaluation,
        magnitude=(float(injected.abs().mean()), float(now.abs().mean())),
    )
    report_problems(injection, strict=strict, stacklevel=3)
    return injection


def report_problems(injection: Injection, *, strict: bool, stacklevel: int = 2) -> None:
    """Warn about (or with ``strict``, raise on) a failed or damaging injection."""
    problems = injection.problems()
    if not problems:
        return
    # loud: localizer scores against a truth that was never planted mean nothing
    what = "; ".join(problems)
    fix = (
        "Raise max_steps or lr (InjectionConfig), inject into more units, or pick paragraphs "
        "closer to what the model knows"
    )
    if strict:
        raise InjectionError(f"the injection is not a clean ground truth: {what}. {fix}")
    if not injection.succeeded:
        warnings.warn(
            f"the injection did not succeed: {injection._shortfall()}; scoring localizers "
            f"against its truth measures nothing. {fix}",
            InjectionFailedWarning,
            stacklevel=stacklevel,
        )
    if injection.damaging:
        warnings.warn(
            f"the injection damaged the model: {injection._harm()}: localizers are scored on a "
            "model that no longer behaves like the original",
            InjectionDamageWarning,
            stacklevel=stacklevel,
        )
