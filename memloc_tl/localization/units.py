"""What a localization points at: weights, MLP neurons or attention heads, scored or chosen.

Every level keeps its units as tensors by name, so that one code path ranks, selects and scores
them all:

- ``"weights"``: the attributed matrices (``blocks.1.attn.W_V`` ... ``blocks.3.mlp.W_out``), each
  entry a unit;
- ``"neurons"``: ``blocks.{l}.mlp.hook_post``, ``[d_mlp]`` per layer;
- ``"heads"``: ``blocks.{l}.attn.hook_z``, ``[n_heads]`` per layer.

A :class:`Localization` is a localizer's scores (higher: more responsible for the paragraph); a
:class:`Units` is a chosen set (the planted truth of an injection, or a localization's top
``k``). :meth:`Units.weights` turns neurons and heads into the weights they own, which is what an
injection trains and a deletion zeroes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor

from memloc_tl.core.backend import HookedModel
from memloc_tl.core.heads import HeadRef
from memloc_tl.core.hooks import hook_name
from memloc_tl.core.objectives import HEAD_MATRICES, attributed_parameters
from memloc_tl.core.rendering import render
from memloc_tl.core.results import Drawable, HeadScores
from memloc_tl.core.validation import check_fraction
from memloc_tl.editing.masks import ParamMask, unflatten_like

Level = Literal["weights", "neurons", "heads"]
LEVELS: tuple[str, ...] = ("weights", "neurons", "heads")


def check_level(level: str) -> Level:
    if level not in LEVELS:
        raise ValueError(f"level must be 'weights', 'neurons' or 'heads', got {level!r}")
    return level  # type: ignore[return-value]


def unit_shapes(model: HookedModel, level: Level) -> dict[str, tuple[int, ...]]:
    """The units of a level, by name and shape, in a fixed order."""
    cfg = model.cfg
    if level == "weights":
        return {name: tuple(p.shape) for name, p in attributed_parameters(model).items()}
    if level == "neurons":
        if cfg.d_mlp is None:
            raise ValueError("the model has no MLP neurons (cfg.d_mlp is None)")
        return {hook_name("post", layer): (cfg.d_mlp,) for layer in range(cfg.n_layers)}
    return {hook_name("z", layer): (cfg.n_heads,) for layer in range(cfg.n_layers)}


def _flat(tensors: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([t.detach().flatten().float().cpu() for t in tensors.values()])


@dataclass(frozen=True)
class Units:
    """A set of units of one level, as boolean masks by name (see the module docs).

    Attributes:
        level: ``"weights"``, ``"neurons"`` or ``"heads"``.
        masks: ``{name: bool tensor}``, every unit of the level present.
    """

    level: Level
    masks: Mapping[str, Tensor]

    def __post_init__(self) -> None:
        check_level(self.level)
        for name, mask in self.masks.items():
            if mask.dtype != torch.bool:
                raise TypeError(f"units {name} must be boolean, got {mask.dtype}")
        object.__setattr__(self, "masks", {n: m.cpu() for n, m in self.masks.items()})

    @classmethod
    def empty(cls, model: HookedModel, level: Level) -> Units:
        shapes = unit_shapes(model, level)
        return cls(level, {n: torch.zeros(s, dtype=torch.bool) for n, s in shapes.items()})

    @classmethod
    def of_heads(cls, model: HookedModel, heads: list[HeadRef | str]) -> Units:
        units = cls.empty(model, "heads")
        for head in heads:
            ref = HeadRef.parse(head).check(model.cfg)
            units.masks[hook_name("z", ref.layer)][ref.head] = True
        return units

    @classmethod
    def of_neurons(cls, model: HookedModel, neurons: list[tuple[int, int]]) -> Units:
        """Neurons as ``(layer, index)`` pairs."""
        units = cls.empty(model, "neurons")
        for layer, index in neurons:
            name = hook_name("post", layer)
            if name not in units.masks or not 0 <= index < units.masks[name].numel():
                raise ValueError(f"the model has no neuron {index} in layer {layer}")
            units.masks[name][index] = True
        return units

    @classmethod
    def of_mask(cls, mask: ParamMask) -> Units:
        return cls("weights", mask.masks)

    @property
    def count(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    @property
    def total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def flat(self) -> Tensor:
        return torch.cat([m.flatten() for m in self.masks.values()])

    def __or__(self, other: Units) -> Units:
        if other.level != self.level:
            raise ValueError(f"cannot join {self.level} with {other.level}")
        return Units(self.level, {n: m | other.masks[n] for n, m in self.masks.items()})

    def overlap(self, other: Units) -> int:
        """Units in both sets."""
        return int((self.flat() & other.flat()).sum())

    def heads(self) -> list[HeadRef]:
        """The chosen heads (heads level)."""
        self._need("heads")
        return [
            HeadRef(int(name.split(".")[1]), int(h))
            for name, mask in self.masks.items()
            for h in mask.nonzero().flatten().tolist()
        ]

    def neurons(self) -> list[tuple[int, int]]:
        """The chosen neurons as ``(layer, index)`` (neurons level)."""
        self._need("neurons")
        return [
            (int(name.split(".")[1]), int(i))
            for name, mask in self.masks.items()
            for i in mask.nonzero().flatten().tolist()
        ]

    def weights(self, model: HookedModel) -> ParamMask:
        """The attributed weights these units own (a head: its W_Q/W_K/W_V/W_O slices; a
        neuron: its W_in column and W_out row)."""
        if self.level == "weights":
            return ParamMask(self.masks, "units")
        if self.level == "heads":
            chosen = self.heads()
            scope = ParamMask.scope(model, components=HEAD_MATRICES if chosen else [], heads=chosen)
            return ParamMask(scope.masks, "units")
        params = attributed_parameters(model)
        masks = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in params.items()}
        for layer, index in self.neurons():
            masks[f"blocks.{layer}.mlp.W_in"][:, index] = True
            masks[f"blocks.{layer}.mlp.W_out"][index, :] = True
        return ParamMask(masks, "units")

    def _need(self, level: str) -> None:
        if self.level != level:
            raise ValueError(f"these are {self.level}, not {level}")

    def describe(self) -> str:
        if self.level == "heads":
            return ", ".join(str(h) for h in self.heads())
        if self.level == "neurons":
            return f"{self.count} neurons"
        return f"{self.count} of {self.total} weights"

    def __repr__(self) -> str:
        return f"Units({self.level}: {self.describe()})"


@dataclass(frozen=True)
class Localization(Drawable):
    """A localizer's scores over every unit of one level: higher means more responsible.

    Attributes:
        method: the localizer (``"gradient"``, ``"learned"``, ...).
        level: ``"weights"``, ``"neurons"`` or ``"heads"``.
        scores: ``{name: float tensor}`` shaped like the level's units (see the module docs).
        seconds: wall-clock time the localizer took.
    """

    method: str
    level: Level
    scores: Mapping[str, Tensor]
    seconds: float = 0.0

    def __post_init__(self) -> None:
        check_level(self.level)
        object.__setattr__(
            self, "scores", {n: s.detach().float().cpu() for n, s in self.scores.items()}
        )

    @property
    def total(self) -> int:
        return sum(s.numel() for s in self.scores.values())

    def top(self, count: int) -> Units:
        """The ``count`` highest-scoring units (exact count; NaN ranks last, ties by order)."""
        if not 1 <= count <= self.total:
            raise ValueError(f"count must be in 1..{self.total}, got {count}")
        flat = _flat(self.scores).nan_to_num(nan=-torch.inf)
        chosen = torch.zeros(len(flat), dtype=torch.bool)
        chosen[flat.argsort(descending=True, stable=True)[:count]] = True
        masks = unflatten_like(chosen, list(self.scores), self.scores)
        return Units(self.level, masks)

    def at_fraction(self, fraction: float) -> Units:
        """The top ``floor(fraction x units)`` units (at least one)."""
        check_fraction(fraction, "fraction")
        return self.top(max(1, int(fraction * self.total)))

    def param_mask(self, fraction: float = 0.001) -> ParamMask:
        """Weights level: the top ``fraction``, as a mask for :func:`~memloc_tl.sparse_edit`."""
        if self.level != "weights":
            raise ValueError(f"these are {self.level} scores; Units.weights(model) maps units")
        return ParamMask(self.at_fraction(fraction).masks, self.method)

    def head_scores(self) -> HeadScores:
        """Heads level: the scores as :class:`HeadScores` (``.top(k)``, heatmap)."""
        if self.level != "heads":
            raise ValueError(f"these are {self.level} scores, not heads")
        return HeadScores(f"{self.method} score", torch.stack(list(self.scores.values())))

    def rank_of(self, units: Units) -> float:
        """The best (lowest, 1-based) rank any of ``units`` gets."""
        flat = _flat(self.scores).nan_to_num(nan=-torch.inf)
        order = flat.argsort(descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, len(order) + 1)
        return float(ranks[units.flat()].min())

    def recall(self, truth: Units, count: int | None = None) -> float:
        """Share of ``truth`` among the top ``count`` units (default ``truth.count``: then
        recall equals precision)."""
        if truth.level != self.level:
            raise ValueError(f"truth is {truth.level}, the scores {self.level}")
        if truth.count == 0:
            raise ValueError("the truth holds no units")
        chosen = self.top(truth.count if count is None else count)
        return chosen.overlap(truth) / truth.count

    def to_frame(self) -> pd.DataFrame:
        """Heads and neurons: one row per unit; weights: one row per matrix (sum and max)."""
        rows: list[dict[str, Any]] = []
        for name, score in self.scores.items():
            layer = int(name.split(".")[1])
            if self.level == "weights":
                rows.append(
                    {
                        "parameter": name,
                        "layer": layer,
                        "sum": float(score.sum()),
                        "max": float(score.max()),
                    }
                )
            else:
                unit = "head" if self.level == "heads" else "neuron"
                rows += [{"layer": layer, unit: i, "score": float(s)} for i, s in enumerate(score)]
        return pd.DataFrame(rows).assign(method=self.method, level=self.level)

    def figure(self) -> Any:
        return render(self)

    def __repr__(self) -> str:
        return f"Localization({self.method}, {self.level}, {self.total} units, {self.seconds:.2f}s)"
