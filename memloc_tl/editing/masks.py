"""Which weights may an edit change? Boolean masks over the attributed matrices (paper 5.3).

A :class:`ParamMask` holds one boolean tensor per attributed matrix (W_Q, W_K, W_V, W_O, W_in,
W_out of every layer; never embeddings, unembedding or biases). The paper fine-tunes only the
0.1% of these weights with the largest contrastive-objective gradient, and compares with a
random 0.1%; both masks select exactly ``floor(fraction x candidates)`` weights here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from memloc_tl.core.backend import HookedModel
from memloc_tl.core.heads import HeadRef
from memloc_tl.core.objectives import (
    HEAD_MATRICES,
    MATRICES,
    attributed_parameters,
    component_labels,
)
from memloc_tl.core.results import LayerComponentScores
from memloc_tl.core.selection import (
    check_selection,
    compact_selection,
    selected_count,
    selected_indices,
    selected_mask,
)
from memloc_tl.core.validation import check_fraction


def _split(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return int(parts[1]), parts[-1]


@dataclass(frozen=True, init=False, eq=False)
class ParamMask:
    """Which entries of the attributed matrices an edit may change, by parameter name.

    Made from boolean masks (``ParamMask({"blocks.1.attn.W_V": bool tensor of W_V's shape,
    ...}, kind)``) or from flat indices (:meth:`from_selections`). Each matrix is held in the
    smaller form (:mod:`memloc_tl.core.selection`): a 0.1% mask as the chosen entries' flat
    indices (0.7 MiB for GPT-Neo 125M instead of 81 MiB of booleans), a mask of most entries as
    booleans. :meth:`boolean`, :meth:`indices` and :attr:`masks` give either form.

    Attributes:
        kind: how it was made (``"gradient"``, ``"random"``, ``"all"``, ``"scope"``, ...).
        shapes: each matrix's shape, by name, in the mask's order.
        selections: each matrix's chosen entries as held (sorted int64 flat indices, or a
            boolean mask of the matrix's shape); the tensors functions of
            :mod:`memloc_tl.core.selection` take.
    """

    kind: str
    shapes: Mapping[str, tuple[int, ...]]
    selections: Mapping[str, Tensor]

    def __init__(self, masks: Mapping[str, Tensor], kind: str = "custom") -> None:
        for name, mask in masks.items():
            if mask.dtype != torch.bool:
                raise TypeError(f"mask {name} must be boolean, got {mask.dtype}")
        self._set(kind, {n: tuple(m.shape) for n, m in masks.items()}, masks)

    @classmethod
    def from_selections(
        cls,
        selections: Mapping[str, Tensor],
        shapes: Mapping[str, Sequence[int]],
        kind: str = "custom",
    ) -> ParamMask:
        """A mask from each matrix's chosen entries: sorted, distinct int64 flat (row-major)
        indices, or a boolean mask of the matrix's shape (:mod:`memloc_tl.core.selection`).

        Raises:
            TypeError: a selection that is neither int64 nor boolean.
            ValueError: ``selections`` and ``shapes`` name different matrices, or indices that
                are not 1-D, sorted, distinct and within the matrix.
        """
        if list(selections) != list(shapes):
            raise ValueError(
                f"selections and shapes must name the same matrices in the same order, got "
                f"{list(selections)[:3]} and {list(shapes)[:3]}"
            )
        mask = cls.__new__(cls)
        mask._set(kind, {n: tuple(int(d) for d in s) for n, s in shapes.items()}, selections)
        return mask

    def _set(
        self, kind: str, shapes: dict[str, tuple[int, ...]], given: Mapping[str, Tensor]
    ) -> None:
        for name, selection in given.items():
            _, matrix = _split(name)
            if matrix not in MATRICES:
                raise ValueError(f"{name} is not an attributed matrix ({MATRICES})")
            check_selection(selection, shapes[name], name)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "selections", {n: compact_selection(s) for n, s in given.items()})

    # ------------------------------------------------------------------ constructors
    @classmethod
    def scope(
        cls,
        model: HookedModel,
        *,
        components: Sequence[str] | None = None,
        layers: Sequence[int] | None = None,
        heads: Sequence[HeadRef | str] | None = None,
    ) -> ParamMask:
        """Every weight of the chosen matrices, layers and heads (default: all of them).

        ``heads`` restricts the head matrices to those heads and drops W_in/W_out; e.g.
        ``ParamMask.scope(model, components=["W_V"], heads=["L1H2"])``.
        """
        components = tuple(MATRICES if components is None else components)
        unknown = [c for c in components if c not in MATRICES]
        if unknown:
            raise ValueError(f"components must be among {MATRICES}, got {unknown}")
        chosen_heads = None if heads is None else [HeadRef.parse(h).check(model.cfg) for h in heads]
        if layers is not None and any(not 0 <= l < model.cfg.n_layers for l in layers):  # noqa: E741
            raise ValueError(f"layers must be in 0..{model.cfg.n_layers - 1}, got {list(layers)}")
        masks = {}
        for name, param in attributed_parameters(model).items():
            layer, matrix = _split(name)
            mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
            if matrix in components and (layers is None or layer in layers):
                if chosen_heads is None:
                    mask[:] = True
                elif matrix in HEAD_MATRICES:
                    for head in chosen_heads:
                        if head.layer == layer:
                            mask[head.head] = True
            masks[name] = mask
        return cls(masks, "scope")

    @classmethod
    def all(cls, model: HookedModel) -> ParamMask:
        """Every attributed weight (full fine-tuning of the attributed matrices)."""
        scope = cls.scope(model)
        return cls.from_selections(scope.selections, scope.shapes, "all")

    @classmethod
    def from_gradients(
        cls,
        grads: Mapping[str, Tensor],
        *,
        fraction: float = 0.001,
        within: ParamMask | None = None,
    ) -> ParamMask:
        """The global top ``floor(fraction x candidates)`` weights by |gradient|.

        Args:
            grads: gradients by parameter name (e.g. ``contrastive_gradients``).
            fraction: share of the candidate weights to select (paper: 0.001).
            within: candidate weights (default all of ``grads``).
        """
        names = list(grads)
        bad = [n for n in names if not bool(torch.isfinite(grads[n]).all())]
        if bad:
            raise ValueError(
                f"the gradients of {bad[:3]} hold NaN or Inf: a top-|gradient| mask would be "
                "arbitrary; check the loss (e.g. an empty or mis-tokenized paragraph set)"
            )
        top = TopByMagnitude(grads, fraction=fraction, within=within)
        for name in names:
            top.add(name, grads[name])
        return top.mask()

    @classmethod
    def random(
        cls,
        model_or_shapes: HookedModel | Mapping[str, Tensor],
        *,
        fraction: float = 0.001,
        seed: int = 0,
        within: ParamMask | None = None,
    ) -> ParamMask:
        """Exactly ``floor(fraction x candidates)`` weights chosen uniformly at random, seeded."""
        tensors = (
            attributed_parameters(model_or_shapes)
            if isinstance(model_or_shapes, torch.nn.Module)
            else dict(model_or_shapes)
        )
        names = list(tensors)
        sizes = [_candidate_count(tensors[n], within, n) for n in names]
        k = _count(fraction, sum(sizes))
        generator = torch.Generator().manual_seed(seed)
        # k distinct ranks among all candidates, then each rank's place in its matrix
        ranks = distinct_integers(sum(sizes), k, generator).sort().values
        chosen, first_rank = {}, 0
        for name, size in zip(names, sizes, strict=True):
            tensor = tensors[name]
            mine = ranks[(ranks >= first_rank) & (ranks < first_rank + size)] - first_rank
            if within is not None:  # the rank among the candidates -> the place in the matrix
                mine = selected_indices(within.selections[name].cpu())[mine]
            chosen[name] = mine.to(tensor.device)
            first_rank += size
        return cls.from_selections(chosen, {n: tensors[n].shape for n in names}, "random")

    def check_model(self, model: HookedModel) -> ParamMask:
        """This mask fits ``model``: every matrix it names exists there, with the same shape.

        Raises:
            ValueError: a mask made for another model (architecture or size), naming the first
                matrix that does not fit.
        """
        check_masks_fit(
            self.shapes,
            model,
            "a mask made for another model; make it from this one (ParamMask.scope(model, "
            "...), ParamMask.random(model, ...))",
        )
        return self

    # ------------------------------------------------------------------ views
    @property
    def names(self) -> tuple[str, ...]:
        """The matrices the mask covers, in order."""
        return tuple(self.shapes)

    def boolean(self, name: str) -> Tensor:
        """Matrix ``name``'s mask as booleans of its shape (made if held as indices)."""
        return selected_mask(self._selection(name), self.shapes[name])

    def indices(self, name: str) -> Tensor:
        """Matrix ``name``'s chosen entries as sorted flat (row-major) int64 indices."""
        return selected_indices(self._selection(name))

    def count_in(self, name: str) -> int:
        """Selected weights of matrix ``name``."""
        return selected_count(self._selection(name))

    @property
    def masks(self) -> dict[str, Tensor]:
        """Every matrix's mask as booleans of its shape, by name: a new dict, with boolean
        tensors made for matrices held as indices (a byte per weight; prefer
        :meth:`boolean` for one matrix at a time)."""
        return {name: self.boolean(name) for name in self.shapes}

    def _selection(self, name: str) -> Tensor:
        if name not in self.selections:
            raise KeyError(f"the mask has no matrix {name!r}; it has {list(self.shapes)[:3]}...")
        return self.selections[name]

    @property
    def count(self) -> int:
        """Selected weights."""
        return sum(selected_count(s) for s in self.selections.values())

    @property
    def total(self) -> int:
        """Weights the mask covers (selected or not)."""
        return sum(math.prod(shape) for shape in self.shapes.values())

    def __and__(self, other: ParamMask) -> ParamMask:
        return self._combine(other, torch.logical_and)

    def __or__(self, other: ParamMask) -> ParamMask:
        return self._combine(other, torch.logical_or)

    def _combine(self, other: ParamMask, op: Callable[[Tensor, Tensor], Tensor]) -> ParamMask:
        if not isinstance(other, ParamMask):
            raise TypeError(f"a ParamMask combines with a ParamMask, not {type(other).__name__}")
        if dict(other.shapes) != dict(self.shapes):
            raise ValueError("the two masks cover different matrices or shapes")
        combined = {}
        for name in self.shapes:  # one matrix's booleans at a time
            mine = self.boolean(name)
            combined[name] = compact_selection(op(mine, other.boolean(name).to(mine.device)))
        return ParamMask.from_selections(combined, self.shapes, self.kind)

    def to(self, device: torch.device | str) -> ParamMask:
        moved = {n: s.to(device) for n, s in self.selections.items()}
        return ParamMask.from_selections(moved, self.shapes, self.kind)

    def counts(self, n_heads: int) -> LayerComponentScores:
        """Selected weights per layer x component (W_K.H0 ... W_O.H{n-1}, W_in, W_out)."""
        labels = component_labels(n_heads)
        n_layers = 1 + max(_split(n)[0] for n in self.shapes)
        scores = torch.zeros(n_layers, len(labels))
        for name, shape in self.shapes.items():
            layer, matrix = _split(name)
            if matrix in HEAD_MATRICES:
                start = HEAD_MATRICES.index(matrix) * n_heads
                per_head = math.prod(shape[1:])  # flat index // per_head is the head
                heads = torch.bincount(self.indices(name).cpu() // per_head, minlength=shape[0])
                scores[layer, start : start + n_heads] = heads.float()
            else:
                scores[layer, labels.index(matrix)] = float(self.count_in(name))
        return LayerComponentScores(f"{self.kind} mask: selected weights", scores, labels)

    def to_frame(self) -> pd.DataFrame:
        """One row per matrix: name, selected, total."""
        return pd.DataFrame(
            [
                {"parameter": n, "selected": self.count_in(n), "total": math.prod(shape)}
                for n, shape in self.shapes.items()
            ]
        )

    def __repr__(self) -> str:
        share = self.count / self.total if self.total else 0.0
        return f"ParamMask({self.kind}, {self.count} of {self.total} weights = {share:.4%})"


class TopByMagnitude:
    """The global top ``floor(fraction x candidates)`` entries by |value| of matrices handed
    over one at a time, in any order (e.g. gradients as a backward pass produces them): the
    k best so far are merged with each matrix's own top k, so no copy of all the matrices is
    made and a matrix can be dropped once it has been added.

    Args:
        shapes: every matrix that will be added, by name (tensors of their shapes, e.g. the
            parameters); the mask covers them in this order.
        fraction: share of the candidate entries to select.
        within: candidate entries (default all).
    """

    def __init__(
        self, shapes: Mapping[str, Tensor], *, fraction: float, within: ParamMask | None = None
    ):
        self._like = dict(shapes)
        self._within = within
        self._offsets: dict[str, int] = {}
        offset = 0
        for name, tensor in self._like.items():
            self._offsets[name] = offset
            offset += tensor.numel()
        self.k = _count(fraction, sum(_candidate_count(t, within, n) for n, t in shapes.items()))
        self._scores = torch.empty(0)
        self._ids = torch.empty(0, dtype=torch.long)
        self._added: set[str] = set()

    def add(self, name: str, values: Tensor) -> None:
        """Merge ``values`` (the matrix ``name``) into the top k.

        Raises:
            ValueError: an unknown or repeated matrix, a wrong shape, or NaN / Inf values
                (a top-|value| choice among them would be arbitrary).
        """
        if name not in self._like:
            raise ValueError(f"{name} is not among the matrices this top k was made for")
        if name in self._added:
            raise ValueError(f"{name} was added twice")
        if tuple(values.shape) != tuple(self._like[name].shape):
            raise ValueError(
                f"{name} has shape {tuple(values.shape)}, expected {tuple(self._like[name].shape)}"
            )
        if not bool(torch.isfinite(values).all()):
            raise ValueError(
                f"the gradients of {name} hold NaN or Inf: a top-|gradient| mask would be "
                "arbitrary; check the loss (e.g. an empty or mis-tokenized paragraph set)"
            )
        scores = values.detach().abs().float().where(_candidates(values, self._within, name), -1.0)
        top = torch.topk(scores.flatten(), min(self.k, values.numel()))
        merged_scores = torch.cat([self._scores, top.values.cpu()])
        merged_ids = torch.cat([self._ids, top.indices.cpu() + self._offsets[name]])
        keep = torch.topk(merged_scores, min(self.k, len(merged_scores))).indices
        self._scores, self._ids = merged_scores[keep], merged_ids[keep]
        self._added.add(name)

    def mask(self, kind: str = "gradient") -> ParamMask:
        """The chosen entries as a mask over every matrix (each must have been added)."""
        missing = [n for n in self._like if n not in self._added]
        if missing:
            raise ValueError(f"no values were added for {missing[:3]}")
        ids = self._ids.sort().values
        chosen = {}
        for name, tensor in self._like.items():
            start = self._offsets[name]
            lo, hi = torch.searchsorted(ids, torch.tensor([start, start + tensor.numel()]))
            chosen[name] = (ids[lo:hi] - start).to(tensor.device)
        shapes = {n: t.shape for n, t in self._like.items()}
        return ParamMask.from_selections(chosen, shapes, kind)


def _candidates(tensor: Tensor, within: ParamMask | None, name: str) -> Tensor:
    if within is None:
        return torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device)
    if name not in within.selections:
        raise ValueError(f"the scope has no mask for {name}")
    return within.boolean(name).to(tensor.device)


def _candidate_count(tensor: Tensor, within: ParamMask | None, name: str) -> int:
    """How many of ``tensor``'s entries are candidates (every one without ``within``)."""
    if within is None:
        return tensor.numel()
    if name not in within.selections:
        raise ValueError(f"the scope has no mask for {name}")
    return within.count_in(name)


def check_masks_fit(shapes: Mapping[str, Sequence[int]], model: HookedModel, fix: str) -> None:
    """Every masked matrix (``shapes``: its shape by name) exists in ``model`` with that shape;
    else a ``ValueError`` naming the first that does not, ending in ``fix``."""
    params = attributed_parameters(model)
    for name, shape in shapes.items():
        if name not in params:
            raise ValueError(f"{name} is not in this model: {fix}")
        if tuple(params[name].shape) != tuple(shape):
            raise ValueError(
                f"{name} has shape {tuple(params[name].shape)} in this model, "
                f"{tuple(shape)} in the mask: {fix}"
            )


def check_mask_fraction(model: HookedModel, fraction: float) -> int:
    """How many of ``model``'s attributed weights ``fraction`` selects; an error if none."""
    return _count(fraction, sum(p.numel() for p in attributed_parameters(model).values()))


def _count(fraction: float, candidates: int) -> int:
    check_fraction(fraction, "fraction")
    k = math.floor(fraction * candidates)
    if k < 1:
        raise ValueError(
            f"fraction={fraction} of {candidates} candidate weights selects none; raise it"
        )
    return k


def distinct_integers(n: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct integers from ``[0, n)``, every such set equally likely, seeded by
    ``generator``: the first ``k`` distinct values of a stream of uniform draws (or, for
    ``k > n / 2``, all but ``n - k`` of them), so no permutation of all ``n`` is made (eight
    bytes per weight, more than the model itself)."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} distinct integers from {n}")
    if 2 * k > n:
        kept = torch.ones(n, dtype=torch.bool)
        kept[distinct_integers(n, n - k, generator)] = False
        return kept.nonzero().flatten()
    taken = torch.empty(0, dtype=torch.long)
    while len(taken) < k:
        draws = torch.randint(n, (2 * (k - len(taken)) + 16,), generator=generator)
        stream = torch.cat([taken, draws])
        values, inverse = torch.unique(stream, return_inverse=True)
        first = torch.full((len(values),), len(stream)).scatter_reduce_(
            0, inverse, torch.arange(len(stream)), "amin"
        )  # where each value first occurs: the values in the order they were drawn
        taken = stream[first.sort().values][:k]
    return taken


def unflatten_like(flat: Tensor, names: list[str], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a flat tensor into tensors shaped like ``like[name]``, in ``names`` order."""
    masks, start = {}, 0
    for name in names:
        tensor = like[name]
        masks[name] = flat[start : start + tensor.numel()].view(tensor.shape).to(tensor.device)
        start += tensor.numel()
    return masks
