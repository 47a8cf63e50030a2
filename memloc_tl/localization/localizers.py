"""Localizers: which weights, neurons or heads hold a paragraph? One interface, many methods.

``localize(model, target, method=..., level=...)`` scores every unit of a level (see
:mod:`memloc_tl.localization.units`); higher means more responsible for the target's recall.
Each method's cost is counted in forward+backward passes over the target (``n_target``) and
the keep set (``n_keep``):

Weights (the attributed matrices):
- ``"gradient"``: |d NLL(target) / d w|, the paper's criterion (section 5.3). 1 pass.
- ``"grad_x_weight"``: |w * d NLL / d w|, the first-order effect of zeroing a weight. 1 pass.
- ``"contrastive"``: |gradient of the contrastive objective| (paper Eq. 3); at the model's own
  weights a rescaled ``"gradient"``. 1 pass plus one forward of the keep set.
- ``"magnitude"``: |w|, a trivial baseline that knows nothing of the paragraph. Free.
- ``"random"``: seeded uniform scores, the chance baseline. Free.
- ``"learned"``: a learned deletion mask (Hard Concrete gates with an L0 penalty, Louizos et
  al. 2018; the strongest method of Chang et al. 2024): gates that drop units are trained to
  destroy the target's recall while keeping the keep set's predictions, with as few units
  dropped as possible; the units' scores are the gates' log-odds. ``steps`` passes.

Neurons (``hook_post``) and heads (``hook_z``):
- ``"activation"``: mean |activation| on the target minus on the keep set. 1 forward each.
- ``"attribution"``: the first-order estimate of zeroing each unit,
  ``-(d NLL / d gate)`` at gate 1 (attribution patching against a zero source). 1 pass.
- ``"integrated_gradients"``: the same gradient integrated while the layer's units are scaled
  from 0 to 1 (``ig_steps`` points per layer; Sundararajan et al. 2017). ``n_layers x ig_steps``
  passes.
- ``"zero_ablation"``: the exact NLL increase when the unit alone is zeroed, batched per layer
  from the cached residual stream. ``n_units`` forward passes of the target (batched).
- ``"learned"``, ``"random"`` as above.

Localizers read the model and never change it: no parameter requires grad after, no ``.grad``,
no hook is left.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.analysis.gradients import contrastive_gradients
from memloc_tl.core.backend import HookedModel
from memloc_tl.core.forward import continuation_logits, layer_starts, score_continuations
from memloc_tl.core.hooks import make_unit_scale_hook
from memloc_tl.core.objectives import (
    accumulated_gradients,
    attributed_parameters,
    continuation_nll,
    grad_only_for,
    original_logprobs,
)
from memloc_tl.core.paragraphs import Paragraphs
from memloc_tl.core.unembedding import shared_unembedding
from memloc_tl.core.validation import (
    check_bool,
    check_config,
    check_positive_int,
    check_real,
    check_seed,
)
from memloc_tl.localization.units import Level, Localization, check_level, unit_shapes

Method = Literal[
    "gradient",
    "grad_x_weight",
    "contrastive",
    "magnitude",
    "activation",
    "attribution",
    "integrated_gradients",
    "zero_ablation",
    "learned",
    "random",
]


@dataclass(frozen=True)
class LearnedMaskConfig:
    """Settings of the learned deletion mask (``method="learned"``).

    ``None`` takes the level's default (:data:`LEARNED_DEFAULTS`, tuned on the organism: heads
    and neurons ``lr=0.1, init=-2, sparsity=1``; weights, where there are far more gates,
    ``lr=0.3, init=-4, sparsity=3``).

    Attributes:
        steps: optimizer steps.
        lr: Adam learning rate on the gates' log-odds.
        init: initial log-odds of dropping a unit (negative: little dropped yet).
        sparsity: weight of the expected share of dropped units (the L0 penalty).
        kl_weight: weight of the keep set's KL to the original model (per token).
        keep_batch: keep paragraphs per step (a seeded sample).
        stochastic: sample Hard Concrete gates (True), or use the deterministic sigmoid
            relaxation (False, the default: on a weights-level injection into the default
            organism it recovered 8.4% of the injected weights, the Hard Concrete samples 1.4-1.9%).
    """

    steps: int = 150
    lr: float | None = None
    init: float | None = None
    sparsity: float | None = None
    kl_weight: float = 1.0
    keep_batch: int = 8
    stochastic: bool = False

    def __post_init__(self) -> None:
        check_positive_int(self.steps, "steps")
        check_positive_int(self.keep_batch, "keep_batch")
        if self.lr is not None:
            check_real(self.lr, "lr", above=0.0)
        if self.init is not None:
            check_real(self.init, "init")
        if self.sparsity is not None:
            check_real(self.sparsity, "sparsity", at_least=0.0)
        check_real(self.kl_weight, "kl_weight", at_least=0.0)

    def resolved(self, level: Level) -> tuple[float, float, float]:
        """``(lr, init, sparsity)`` with the level's defaults filled in."""
        lr, init, sparsity = LEARNED_DEFAULTS[level]
        return (
            lr if self.lr is None else self.lr,
            init if self.init is None else self.init,
            sparsity if self.sparsity is None else self.sparsity,
        )


LEARNED_DEFAULTS: dict[str, tuple[float, float, float]] = {
    "weights": (0.3, -4.0, 3.0),
    "neurons": (0.1, -2.0, 1.0),
    "heads": (0.1, -2.0, 1.0),
}
"""Per level: the learned mask's (lr, init, sparsity)."""


@dataclass(frozen=True)
class LocalizeConfig:
    """The settings of :func:`localize` (each localizer reads the ones it needs).

    Attributes:
        learned: settings of ``"learned"``.
        ig_steps: integration points per layer for ``"integrated_gradients"``.
        ablation_batch: units silenced per forward pass in ``"zero_ablation"``.
        seed: seed of ``"random"`` and of ``"learned"``'s gate samples and keep batches.
        batch_size: paragraphs per forward pass.
    """

    learned: LearnedMaskConfig = field(default_factory=LearnedMaskConfig)
    ig_steps: int = 8
    ablation_batch: int = 64
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.learned, LearnedMaskConfig):
            raise TypeError(f"learned must be a LearnedMaskConfig, got {self.learned!r}")
        check_positive_int(self.ig_steps, "ig_steps")
        check_positive_int(self.ablation_batch, "ablation_batch")
        check_positive_int(self.batch_size, "batch_size")
        check_seed(self.seed)


@dataclass(frozen=True)
class LocalizationTask:
    """What a localizer is asked: score every unit of ``level`` for ``target``.

    Attributes:
        model: the model (a localizer must leave it as it found it).
        target: the paragraph(s) to localize.
        level: ``"weights"``, ``"neurons"`` or ``"heads"``; the answer has one tensor per
            unit group of :func:`~memloc_tl.localization.units.unit_shapes`, higher meaning
            more responsible.
        keep: the paragraphs whose predictions must not depend on the units, or ``None``.
        config: the settings.
        progress: whether a progress bar may be shown.
    """

    model: HookedModel
    target: Paragraphs
    level: Level
    keep: Paragraphs | None
    config: LocalizeConfig
    progress: bool

    def needed_keep(self) -> Paragraphs:
        """``keep``, which a localizer registered with ``needs_keep=True`` always gets."""
        if self.keep is None:
            raise ValueError("this localizer needs keep paragraphs")
        return self.keep


@dataclass(frozen=True)
class Localizer:
    """A registered localizer.

    Attributes:
        name: the name ``localize(method=...)``, INJ and DEL know it by.
        levels: the levels it scores.
        scores: ``scores(task) -> {unit group: scores}`` (see :class:`LocalizationTask`).
        needs_keep: whether it reads ``task.keep`` (``localize`` then refuses a call without).
    """

    name: str
    levels: tuple[Level, ...]
    scores: Callable[[LocalizationTask], dict[str, Tensor]]
    needs_keep: bool = False


_REGISTRY: dict[str, Localizer] = {}


def register_localizer(
    name: str,
    scores: Callable[[LocalizationTask], dict[str, Tensor]],
    *,
    levels: Sequence[Level],
    needs_keep: bool = False,
    replace: bool = False,
) -> Localizer:
    """Add a localizer: ``localize(method=name)``, INJ and DEL then run it like a built-in one.

    ``scores(task)`` returns one tensor per unit group of the level
    (:func:`~memloc_tl.localization.units.unit_shapes`), higher meaning more responsible;
    ``localize`` checks the names and shapes of the answer.

    Raises:
        ValueError: the name is taken (``replace=True`` overrides it), or a level is unknown.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a localizer's name must be an identifier, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"a localizer named {name!r} exists; pass replace=True to override it")
    if not callable(scores):
        raise TypeError(f"scores must be callable, got {type(scores).__name__}")
    checked: tuple[Level, ...] = tuple(check_level(str(level)) for level in levels)
    if not checked:
        raise ValueError("levels must name at least one level")
    check_bool(needs_keep, "needs_keep")
    localizer = Localizer(name, checked, scores, needs_keep)
    _REGISTRY[name] = localizer
    return localizer


def unregister_localizer(name: str) -> None:
    """Remove a localizer added with :func:`register_localizer`."""
    if name not in _REGISTRY:
        raise KeyError(f"no localizer named {name!r}")
    del _REGISTRY[name]


def needs_keep(method: str) -> bool:
    """Whether the localizer ``method`` reads keep paragraphs (False for an unknown name)."""
    localizer = _REGISTRY.get(method)
    return localizer is not None and localizer.needs_keep


class _Methods(Mapping[str, tuple[str, ...]]):
    """The localizers of each level, as registered (a live view)."""

    def __getitem__(self, level: str) -> tuple[str, ...]:
        if level not in ("weights", "neurons", "heads"):
            raise KeyError(level)
        return tuple(n for n, loc in _REGISTRY.items() if level in loc.levels)

    def __iter__(self) -> Iterator[str]:
        return iter(("weights", "neurons", "heads"))

    def __len__(self) -> int:
        return 3

    def __repr__(self) -> str:
        return repr(dict(self))


METHODS: Mapping[str, tuple[str, ...]] = _Methods()
"""The localizers of each level: the built-in ones and every registered one."""


# Hard Concrete (Louizos et al. 2018): temperature and stretch of the distribution.
_BETA, _GAMMA, _ZETA = 2.0 / 3.0, -0.1, 1.1


def hard_concrete(log_alpha: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A gate in [0, 1]: a Hard Concrete sample (with ``generator``), else ``sigmoid``.

    Without a generator the gate is the plain sigmoid of the log-odds (a deterministic
    relaxation: never exactly 0, so every gate gets a gradient from the first step on).
    """
    if generator is None:
        return torch.sigmoid(log_alpha)
    u = torch.rand(log_alpha.shape, generator=generator).to(log_alpha.device)
    u = u.clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / _BETA)
    return (s * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)


def expected_l0(log_alpha: Tensor) -> Tensor:
    """P(gate != 0) per unit."""
    return torch.sigmoid(log_alpha - _BETA * math.log(-_GAMMA / _ZETA))


def _check_target(model: HookedModel, target: Paragraphs, keep: Paragraphs | None) -> None:
    if not isinstance(target, Paragraphs):
        raise TypeError(f"target must be Paragraphs, got {type(target).__name__}")
    if len(target) == 0:
        raise ValueError("target holds no paragraphs")
    target.check_model(model)
    if keep is not None:
        if len(keep) == 0:
            raise ValueError("keep holds no paragraphs")
        keep.check_model(model)


@contextmanager
def _scaled_units(model: HookedModel, level: Level, scales: Mapping[str, Tensor]) -> Iterator[None]:
    """Neurons or heads multiplied by ``scales`` (by hook name) inside the block."""
    hooks: list[Any] = [(name, make_unit_scale_hook(scale)) for name, scale in scales.items()]
    with model.hooks(fwd_hooks=hooks):
        yield


def _gated_logits(
    model: HookedModel,
    tokens: Tensor,
    prefix_len: int,
    level: Level,
    keep_share: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
) -> Tensor:
    """Continuation logits with every unit scaled by its keep share (1 - drop)."""
    if level == "weights":
        weights = {n: params[n] * keep_share[n] for n in keep_share}
        return continuation_logits(model, tokens, prefix_len, weights=weights)
    with _scaled_units(model, level, keep_share):
        return continuation_logits(model, tokens, prefix_len)


def _target_nll(model: HookedModel, target: Paragraphs) -> Callable[[Tensor, int], Tensor]:
    def nll(tokens: Tensor, start: int) -> Tensor:
        return continuation_nll(model, tokens, target.prefix_len).mean()

    return nll


# ---------------------------------------------------------------------------- weights
def _weight_gradient(model: HookedModel, target: Paragraphs, batch_size: int) -> dict[str, Tensor]:
    return accumulated_gradients(
        model, [(target, _target_nll(model, target))], batch_size, False, ""
    )


def _gradient(task: LocalizationTask) -> dict[str, Tensor]:
    grads = _weight_gradient(task.model, task.target, task.config.batch_size)
    return {n: g.abs() for n, g in grads.items()}


def _grad_x_weight(task: LocalizationTask) -> dict[str, Tensor]:
    params = attributed_parameters(task.model)
    grads = _weight_gradient(task.model, task.target, task.config.batch_size)
    return {n: (g * params[n].detach().float()).abs() for n, g in grads.items()}


def _contrastive(task: LocalizationTask) -> dict[str, Tensor]:
    keep = task.needed_keep()
    grads = contrastive_gradients(task.model, task.target, keep, batch_size=task.config.batch_size)
    return {n: g.abs() for n, g in grads.items()}


def _magnitude(task: LocalizationTask) -> dict[str, Tensor]:
    return {n: p.detach().abs() for n, p in attributed_parameters(task.model).items()}


# ---------------------------------------------------------------------------- neurons, heads
def _activation(task: LocalizationTask) -> dict[str, Tensor]:
    model, batch_size = task.model, task.config.batch_size
    names = list(unit_shapes(model, task.level))

    def mean_abs(paragraphs: Paragraphs) -> dict[str, Tensor]:
        sums = {n: torch.zeros(0) for n in names}
        with torch.no_grad():
            for start in range(0, len(paragraphs), batch_size):
                tokens = paragraphs.tokens[start : start + batch_size].to(model.cfg.device)
                _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
                for n in names:
                    act = cache[n].abs()
                    act = act.mean(-1) if act.ndim == 4 else act  # heads: mean over d_head
                    total = act.double().sum((0, 1)).cpu()
                    sums[n] = total if sums[n].numel() == 0 else sums[n] + total
        n_tokens = len(paragraphs) * paragraphs.seq_len
        return {n: s / n_tokens for n, s in sums.items()}

    on_target, on_keep = mean_abs(task.target), mean_abs(task.needed_keep())
    return {n: (on_target[n] - on_keep[n]).float() for n in names}


def _gate_gradient(
    model: HookedModel,
    target: Paragraphs,
    level: Level,
    scales: dict[str, Tensor],
    batch_size: int,
) -> dict[str, Tensor]:
    """d mean-NLL(target) / d scale, for unit scales (leaves requiring grad)."""
    total = {n: torch.zeros_like(s) for n, s in scales.items()}
    with grad_only_for(model, []):
        for start in range(0, len(target), batch_size):
            tokens = target.tokens[start : start + batch_size]
            with _scaled_units(model, level, scales):
                nll = continuation_nll(model, tokens, target.prefix_len).mean()
            loss = nll * (len(tokens) / len(target))
            grads = torch.autograd.grad(loss, list(scales.values()))
            for n, g in zip(scales, grads, strict=True):
                total[n] += g
    return total


def _ones(model: HookedModel, level: Level) -> dict[str, Tensor]:
    return {
        n: torch.ones(s, device=model.cfg.device, requires_grad=True)
        for n, s in unit_shapes(model, level).items()
    }


def _attribution(task: LocalizationTask) -> dict[str, Tensor]:
    model, level = task.model, task.level
    grads = _gate_gradient(model, task.target, level, _ones(model, level), task.config.batch_size)
    return {n: -g for n, g in grads.items()}


def _integrated_gradients(task: LocalizationTask) -> dict[str, Tensor]:
    model, target, level, steps = task.model, task.target, task.level, task.config.ig_steps
    scores = {}
    for name in unit_shapes(model, level):
        total = torch.zeros(0)
        for i in range(steps):  # midpoint rule on [0, 1]
            scales = _ones(model, level)
            alpha = (i + 0.5) / steps
            scales[name] = torch.full_like(scales[name], alpha).requires_grad_(True)
            grad = _gate_gradient(model, target, level, scales, task.config.batch_size)[name]
            grad = grad.cpu()
            total = grad if total.numel() == 0 else total + grad
        scores[name] = -total / steps
    return scores


def _zero_ablation(task: LocalizationTask) -> dict[str, Tensor]:
    """Exact NLL increase of zeroing each unit alone; stacked variants from each layer on."""
    model, target, level = task.model, task.target, task.level
    chunk, batch_size = task.config.ablation_batch, task.config.batch_size
    shapes = unit_shapes(model, level)
    scores = {n: torch.zeros(s) for n, s in shapes.items()}
    with torch.no_grad(), shared_unembedding():
        for start in range(0, len(target), batch_size):
            tokens = target.tokens[start : start + batch_size].to(model.cfg.device)
            b = len(tokens)
            starts = layer_starts(model, tokens, target.prefix_len)
            base_nll = starts.token_nll.mean(-1)
            for layer, (name, (n_units,)) in enumerate(shapes.items()):
                for first in range(0, n_units, chunk):
                    units = torch.arange(first, min(first + chunk, n_units))
                    # row (u, i): paragraph i with unit units[u] silenced
                    scale = torch.ones(len(units), n_units, device=model.cfg.device)
                    scale[torch.arange(len(units)), units] = 0.0
                    scale = scale.repeat_interleave(b, 0)
                    with _scaled_units(model, level, {name: scale}):
                        _, nll = score_continuations(
                            model,
                            tokens.repeat(len(units), 1),
                            target.prefix_len,
                            **starts(layer, len(units)),
                        )
                    delta = nll.mean(-1).view(len(units), b) - base_nll[None]
                    scores[name][units] += delta.sum(-1).cpu()
    return {n: s / len(target) for n, s in scores.items()}


# ---------------------------------------------------------------------------- both
def _random(task: LocalizationTask) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(task.config.seed)
    shapes = unit_shapes(task.model, task.level)
    return {n: torch.rand(s, generator=generator) for n, s in shapes.items()}


def _learned(task: LocalizationTask) -> dict[str, Tensor]:
    """Train deletion gates: destroy the target's recall, keep the keep set, drop few units."""
    model, target, level, keep = task.model, task.target, task.level, task.needed_keep()
    config = task.config.learned
    device = model.cfg.device
    generator = torch.Generator().manual_seed(task.config.seed)
    lr, init, sparsity = config.resolved(level)
    log_alpha = {
        n: torch.full(s, float(init), device=device, requires_grad=True)
        for n, s in unit_shapes(model, level).items()
    }
    n_units = sum(t.numel() for t in log_alpha.values())
    optimizer = torch.optim.Adam(list(log_alpha.values()), lr=lr)
    params = {n: p.detach() for n, p in attributed_parameters(model).items()}
    reference = original_logprobs(model, keep, task.config.batch_size)
    tokens = target.tokens.to(device)
    labels = tokens[:, target.prefix_len :]
    with grad_only_for(model, []):
        steps = tqdm(
            range(config.steps), desc="learned mask", leave=False, disable=not task.progress
        )
        for _ in steps:
            sample = generator if config.stochastic else None
            share = {n: 1.0 - hard_concrete(a, sample) for n, a in log_alpha.items()}
            logits = _gated_logits(model, tokens, target.prefix_len, level, share, params)
            # unlikelihood of the target's tokens: -log(1 - p), zero once the recall is gone
            logp = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
            forget = -torch.log1p(-logp.exp().clamp(max=1 - 1e-6)).mean()
            rows = torch.randperm(len(keep), generator=generator)[: config.keep_batch]
            keep_logits = _gated_logits(
                model, keep.tokens[rows].to(device), keep.prefix_len, level, share, params
            )
            ref = reference[rows].to(device)
            kl = (ref.exp() * (ref - keep_logits.log_softmax(-1))).sum(-1).mean()
            l0 = sum(expected_l0(a).sum() for a in log_alpha.values()) / n_units
            loss = forget + config.kl_weight * kl + sparsity * l0
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {n: a.detach() for n, a in log_alpha.items()}


for _name, _scores, _levels, _needs_keep in (
    ("gradient", _gradient, ("weights",), False),
    ("grad_x_weight", _grad_x_weight, ("weights",), False),
    ("contrastive", _contrastive, ("weights",), True),
    ("magnitude", _magnitude, ("weights",), False),
    ("activation", _activation, ("neurons", "heads"), True),
    ("attribution", _attribution, ("neurons", "heads"), False),
    ("integrated_gradients", _integrated_gradients, ("neurons", "heads"), False),
    ("zero_ablation", _zero_ablation, ("neurons", "heads"), False),
    ("learned", _learned, ("weights", "neurons", "heads"), True),
    ("random", _random, ("weights", "neurons", "heads"), False),
):
    register_localizer(_name, _scores, levels=_levels, needs_keep=_needs_keep)  # type: ignore[arg-type]


def localize(
    model: HookedModel,
    target: Paragraphs,
    *,
    method: Method | str,
    level: Level = "weights",
    keep: Paragraphs | None = None,
    config: LocalizeConfig | None = None,
    progress: bool = False,
) -> Localization:
    """Score every unit of ``level`` for how much ``target``'s recall depends on it.

    Args:
        model: the model (not changed).
        target: the paragraph(s) to localize.
        method: a localizer of the level (``METHODS[level]``; see the module docs), built in
            or added with :func:`register_localizer`.
        level: ``"weights"``, ``"neurons"`` or ``"heads"``.
        keep: paragraphs whose predictions must not depend on the units (other memorized and
            non-memorized paragraphs); needed by ``"contrastive"``, ``"activation"`` and
            ``"learned"`` (and any localizer registered with ``needs_keep=True``).
        config: the localizers' settings (:class:`LocalizeConfig`: the learned mask, the
            integration points, the ablation batch, the seed, the batch size).
        progress: show a progress bar (``"learned"``).

    Returns:
        A :class:`~memloc_tl.localization.units.Localization` (``.top(k)``, ``.recall(truth)``,
        ``.param_mask(fraction)``, ``.head_scores()``).
    """
    level = check_level(level)
    config = check_config(config, LocalizeConfig)
    if method not in METHODS[level]:
        raise ValueError(f"method for {level} must be one of {METHODS[level]}, got {method!r}")
    _check_target(model, target, keep)
    localizer = _REGISTRY[method]
    if localizer.needs_keep and keep is None:
        raise ValueError(f"method={method!r} needs keep paragraphs (e.g. non-memorized ones)")
    task = LocalizationTask(model, target, level, keep, config, progress)
    started = time.perf_counter()
    scores = localizer.scores(task)
    _check_scores(scores, unit_shapes(model, level), method)
    return Localization(method, level, scores, time.perf_counter() - started)


def _check_scores(
    scores: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], method: str
) -> None:
    """A localizer's answer names every unit group of the level, each with its shape."""
    if not isinstance(scores, Mapping) or set(scores) != set(shapes):
        got = sorted(scores) if isinstance(scores, Mapping) else type(scores).__name__
        raise ValueError(
            f"localizer {method!r} must return one score tensor per unit group "
            f"{sorted(shapes)}, got {got}"
        )
    for name, shape in shapes.items():
        value = scores[name]
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(shape):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"localizer {method!r} scored {name} with {got}; expected a tensor of "
                f"shape {tuple(shape)}"
            )


def forward_backward_seconds(
    model: HookedModel, paragraphs: Paragraphs, batch_size: int = 16
) -> float:
    """Time of one forward and backward of the mean continuation NLL (the cost unit)."""
    started = time.perf_counter()
    accumulated_gradients(
        model, [(paragraphs, _target_nll(model, paragraphs))], batch_size, False, ""
    )
    return time.perf_counter() - started
