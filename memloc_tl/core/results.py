"""Result types shared by the analyzers: scores per head, per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from memloc_tl.core.heads import HeadRef
from memloc_tl.core.paragraphs import Paragraphs
from memloc_tl.core.rendering import render

if TYPE_CHECKING:
    import plotly.graph_objects as go


@runtime_checkable
class Result(Protocol):
    """What every public result of memloc-tl offers (a test checks each result type).

    - ``to_frame()``: a ``pandas.DataFrame`` of its numbers, one row per unit of the result
      (head, paragraph, position, set x metric, ...);
    - ``figure(**options)``: a plotly figure of it, drawn by :mod:`memloc_tl.viz` (through
      :func:`memloc_tl.core.rendering.render`, so the result itself imports no plotting code);
    - ``repr(result)``: one short line that says what it holds and its headline number.
    """

    def to_frame(self) -> pd.DataFrame: ...

    def figure(self, *args: Any, **kwargs: Any) -> go.Figure: ...


class Drawable:
    """The base of the result types: ``figure()`` returns a plotly figure, ``show()`` shows it.

    A subclass implements :class:`Result`: ``to_frame`` and ``figure`` (which calls
    :func:`memloc_tl.core.rendering.render`).
    """

    def to_frame(self) -> pd.DataFrame:
        raise NotImplementedError(f"{type(self).__name__} does not implement to_frame")

    def figure(self, *args: Any, **kwargs: Any) -> go.Figure:
        raise NotImplementedError(f"{type(self).__name__} does not implement figure")

    def show(self, *args: Any, **kwargs: Any) -> None:
        """Show :meth:`figure` (in Jupyter, or a browser tab elsewhere)."""
        self.figure(*args, **kwargs).show()


def head_order(
    scores: Float[Tensor, "... n_layers n_heads"], order: Literal["largest", "smallest", "abs"]
) -> Tensor:
    """Flat head indices, first-ranked first, of each ``[n_layers, n_heads]`` score grid: the
    ranking of :meth:`HeadScores.top` (stable on ties; NaN, not analyzed, ranks last)."""
    flat = scores.flatten(-2)
    key = {"largest": flat, "smallest": -flat, "abs": flat.abs()}[order]
    return key.nan_to_num(nan=-torch.inf).argsort(dim=-1, descending=True, stable=True)


@dataclass(frozen=True)
class HeadScores(Drawable):
    """One score per attention head.

    Attributes:
        name: what the score is (e.g. ``"pooled Kendall tau (mean per rank)"``).
        scores: ``[n_layers, n_heads]``.
    """

    name: str
    scores: Float[Tensor, "n_layers n_heads"]

    def __post_init__(self) -> None:
        if self.scores.ndim != 2:
            raise ValueError(f"scores must be [n_layers, n_heads], got {tuple(self.scores.shape)}")

    def __getitem__(self, head: HeadRef | str) -> float:
        ref = HeadRef.parse(head).check_grid(*self.scores.shape)
        return float(self.scores[ref.layer, ref.head])

    def top(
        self, k: int = 5, *, order: Literal["largest", "smallest", "abs"] = "largest"
    ) -> list[tuple[HeadRef, float]]:
        """The ``k`` heads with the largest (or smallest, or largest absolute) score."""
        if order not in ("largest", "smallest", "abs"):
            raise ValueError(f"order must be 'largest', 'smallest' or 'abs', got {order!r}")
        flat = self.scores.flatten()
        n_heads = self.scores.shape[1]
        index = head_order(self.scores, order)[:k]
        return [(HeadRef(int(i) // n_heads, int(i) % n_heads), float(flat[i])) for i in index]

    def rank(
        self, head: HeadRef | str, *, order: Literal["largest", "smallest", "abs"] = "largest"
    ) -> int:
        """``head``'s 1-based place in :meth:`top`'s ranking (the same order and tie-breaking)."""
        ref = HeadRef.parse(head).check_grid(*self.scores.shape)
        ranking = self.top(self.scores.numel(), order=order)
        return next(i for i, (h, _) in enumerate(ranking, 1) if h == ref)

    def to_frame(self) -> pd.DataFrame:
        """Long format: layer, head, label, score."""
        n_layers, n_heads = self.scores.shape
        return pd.DataFrame(
            {
                "layer": [layer for layer in range(n_layers) for _ in range(n_heads)],
                "head": [head for _ in range(n_layers) for head in range(n_heads)],
                "label": [
                    str(HeadRef(layer, head))
                    for layer in range(n_layers)
                    for head in range(n_heads)
                ],
                "score": self.scores.flatten().tolist(),
                "name": self.name,
            }
        )

    def figure(self) -> Any:
        """A plotly heatmap, layers x heads (:func:`memloc_tl.viz.head_scores_figure`)."""
        return render(self)

    def __repr__(self) -> str:
        best = ", ".join(f"{h}={s:.3g}" for h, s in self.top(3, order="abs"))
        return f"HeadScores({self.name!r}, shape={tuple(self.scores.shape)}, top |score|: {best})"


@dataclass(frozen=True)
class TokenScores(Drawable):
    """One score per token position of each paragraph.

    Attributes:
        name: what the score is.
        scores: ``[n_paragraphs, pos]``.
        paragraphs: the paragraphs the positions belong to.
    """

    name: str
    scores: Float[Tensor, "n_paragraphs pos"]
    paragraphs: Paragraphs

    def __post_init__(self) -> None:
        if self.scores.ndim != 2 or self.scores.shape[0] != len(self.paragraphs):
            raise ValueError(
                f"scores must be [{len(self.paragraphs)}, pos], got {tuple(self.scores.shape)}"
            )

    def top(self, k: int = 5) -> list[tuple[str, int, float]]:
        """The ``k`` largest scores as (paragraph id, position, score)."""
        flat = self.scores.flatten().nan_to_num(nan=-torch.inf)
        width = self.scores.shape[1]
        index = flat.argsort(descending=True, stable=True)[:k]
        return [
            (self.paragraphs.ids[int(i) // width], int(i) % width, float(flat[i])) for i in index
        ]

    def to_frame(self) -> pd.DataFrame:
        """Long format: paragraph id, position, token id, score."""
        n, width = self.scores.shape
        return pd.DataFrame(
            {
                "id": [pid for pid in self.paragraphs.ids for _ in range(width)],
                "position": list(range(width)) * n,
                "token": self.paragraphs.tokens[:, :width].flatten().tolist(),
                "score": self.scores.flatten().tolist(),
                "name": self.name,
            }
        )

    def figure(self) -> Any:
        """A plotly heatmap, paragraphs x positions (:func:`memloc_tl.viz.token_scores_figure`)."""
        return render(self)

    def __repr__(self) -> str:
        return f"TokenScores({self.name!r}, shape={tuple(self.scores.shape)})"


@dataclass(frozen=True)
class LayerComponentScores(Drawable):
    """One score per layer and parameter component (e.g. ``W_V.H2``, ``W_in``).

    Attributes:
        name: what the score is.
        scores: ``[n_layers, component]``.
        components: the component labels, one per column.
    """

    name: str
    scores: Float[Tensor, "n_layers component"]
    components: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.scores.ndim != 2 or self.scores.shape[1] != len(self.components):
            raise ValueError(
                f"scores must be [n_layers, {len(self.components)}], got {tuple(self.scores.shape)}"
            )

    def __getitem__(self, key: tuple[int, str]) -> float:
        layer, component = key
        return float(self.scores[layer, self.components.index(component)])

    def layer_totals(self) -> Float[Tensor, " n_layers"]:
        """Sum over components, per layer (the paper's right-axis labels, Fig. 4 and 9)."""
        return self.scores.sum(-1)

    def layer_share(self) -> Float[Tensor, " n_layers"]:
        """Each layer's share of the total."""
        totals = self.layer_totals()
        return totals / totals.sum()

    def top(self, k: int = 5) -> list[tuple[int, str, float]]:
        """The ``k`` largest scores as (layer, component, score)."""
        flat = self.scores.flatten()
        width = self.scores.shape[1]
        index = flat.argsort(descending=True, stable=True)[:k]
        return [(int(i) // width, self.components[int(i) % width], float(flat[i])) for i in index]

    def to_frame(self) -> pd.DataFrame:
        """Long format: layer, component, score."""
        n_layers, width = self.scores.shape
        return pd.DataFrame(
            {
                "layer": [layer for layer in range(n_layers) for _ in range(width)],
                "component": list(self.components) * n_layers,
                "score": self.scores.flatten().tolist(),
                "name": self.name,
            }
        )

    def figure(self) -> Any:
        """A plotly heatmap, layers x components (:func:`memloc_tl.viz.layer_component_figure`)."""
        return render(self)

    def __repr__(self) -> str:
        best = ", ".join(f"L{layer}.{c}={s:.3g}" for layer, c, s in self.top(3))
        return f"LayerComponentScores({self.name!r}, shape={tuple(self.scores.shape)}, top: {best})"
