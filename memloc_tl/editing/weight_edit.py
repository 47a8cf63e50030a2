"""A weight edit as a value: the masked entries' values before and after, and how to put it in.

:class:`WeightEdit` is what :func:`~memloc_tl.editing.sparse_edit` and
:func:`~memloc_tl.localization.inject_paragraphs` return instead of an edited copy of the model:
``apply`` / ``revert`` write it into a model of the same architecture (bit for bit),
``applied`` puts it in for a ``with`` block, ``save`` / ``load`` keep it as safetensors with a
checksum. :func:`trained_in_place` is the scope both train in: the model's own masked entries
change inside it and come back on exit (on an error always, otherwise unless the edit is kept).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from memloc_tl.core.backend import HookedModel, model_parameters
from memloc_tl.core.files import CorruptFileError, atomic_write, save_safetensors, tensors_sha256
from memloc_tl.core.objectives import attributed_parameters
from memloc_tl.core.selection import gather_selected, put_selected_
from memloc_tl.editing.masks import ParamMask, check_masks_fit

EDIT_FORMAT = "memloc-tl weight edit v1"
"""The ``format`` metadata of a saved :class:`WeightEdit`."""


def _masked(params: Mapping[str, Tensor], selections: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A copy of each matrix's chosen entries (1-D, row-major)."""
    return {n: gather_selected(params[n], s) for n, s in selections.items()}


def _write_masked(
    params: Mapping[str, Tensor], selections: Mapping[str, Tensor], values: Mapping[str, Tensor]
) -> None:
    """Write ``values`` into each matrix's chosen entries."""
    for name, selection in selections.items():
        put_selected_(params[name], selection, values[name])


@dataclass(frozen=True)
class WeightEdit:
    """The weights an edit changed: which entries (a mask over the matrices it changed) and
    their values before and after (1-D per matrix, row-major).

    ``apply`` writes the after-values into a model with the same architecture (e.g. freshly
    loaded); ``revert`` writes the before-values back, exactly.

    Attributes:
        mask: the changed entries of each matrix.
        before: ``{name: values}``, one per entry of ``mask``, in row-major order.
        after: the same, after the edit.
    """

    mask: ParamMask
    before: Mapping[str, Tensor]
    after: Mapping[str, Tensor]

    def __post_init__(self) -> None:
        if not isinstance(self.mask, ParamMask):
            raise TypeError(f"mask must be a ParamMask, got {type(self.mask).__name__}")
        if not (set(self.mask.names) == set(self.before) == set(self.after)):
            raise ValueError("mask, before and after must name the same matrices")
        for name in self.mask.names:
            n = self.mask.count_in(name)
            for side in ("before", "after"):
                values = getattr(self, side)[name]
                if values.ndim != 1 or len(values) != n:
                    raise ValueError(
                        f"{side}[{name!r}] holds {tuple(values.shape)} values for a mask of {n} "
                        "entries: one value per masked entry is needed"
                    )

    def _check(self, model: HookedModel) -> None:
        check_masks_fit(
            self.mask.shapes, model, "not the model (architecture) the edit was made on"
        )

    def _write(self, model: HookedModel, values: Mapping[str, Tensor]) -> None:
        self._check(model)  # every check before the first write: edited whole or not at all
        _write_masked(attributed_parameters(model), self.mask.selections, values)

    def apply(self, model: HookedModel) -> None:
        """Write the edited values into ``model``."""
        self._write(model, self.after)

    @contextlib.contextmanager
    def applied(self, model: HookedModel) -> Iterator[HookedModel]:
        """``with edit.applied(model): ...``: the edit is in ``model`` inside the block only.

        On exit, also on an error or Ctrl-C, the masked entries get back the values they had
        before the block (bit for bit), whatever model the edit was made on; no copy of the
        model is made.
        """
        self._check(model)  # before anything is read or written
        saved = _masked(attributed_parameters(model), self.mask.selections)
        self.apply(model)
        try:
            yield model
        finally:
            self._write(model, saved)

    def revert(self, model: HookedModel) -> None:
        """Write the original values back into ``model`` (bit-identical to before the edit)."""
        self._write(model, self.before)

    @property
    def count(self) -> int:
        return self.mask.count

    def __repr__(self) -> str:
        names = self.mask.names
        if not names:
            return "WeightEdit(no weights)"
        change = torch.cat([(self.after[n] - self.before[n]).abs().flatten() for n in names])
        return (
            f"WeightEdit({self.count} weights in {len(names)} matrices, "
            f"max |delta| {float(change.max()):.3g})"
        )

    def save(self, path: str | Path) -> None:
        """Save as safetensors (written to a temporary file, then renamed)."""
        path = Path(path)
        tensors = {}
        for name in self.mask.names:  # the file holds booleans (as bytes), one matrix at a time
            tensors[f"{name}.mask"] = self.mask.boolean(name).to(torch.uint8).contiguous()
            tensors[f"{name}.before"] = self.before[name].contiguous()
            tensors[f"{name}.after"] = self.after[name].contiguous()
        metadata = {"format": EDIT_FORMAT, "sha256": tensors_sha256(tensors)}
        atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | Path) -> WeightEdit:
        """Read an edit written by :meth:`save` (anything else is a clear ``ValueError``)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no edit file at {path}")
        fix = "save the edit again (WeightEdit.save)"
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
            tensors = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise CorruptFileError(
                f"{path} is not a readable safetensors file ({error}); {fix}"
            ) from error
        if metadata.get("format") != EDIT_FORMAT:
            raise ValueError(
                f"{path} is not a memloc-tl weight edit (format {metadata.get('format')!r}); "
                "write edits with WeightEdit.save or EditResult.edit.save"
            )
        if "sha256" not in metadata:
            raise CorruptFileError(f"{path} carries no checksum, so it cannot be checked; {fix}")
        if tensors_sha256(tensors) != metadata["sha256"]:
            raise CorruptFileError(f"{path} differs from when it was written (corrupted); {fix}")
        names = sorted({key.rsplit(".", 1)[0] for key in tensors})
        expected = {f"{n}.{part}" for n in names for part in ("mask", "before", "after")}
        if set(tensors) != expected:
            raise ValueError(f"{path} is incomplete: missing {sorted(expected - set(tensors))}")
        mask = {n: tensors[f"{n}.mask"].bool() for n in names}
        return cls(
            mask=ParamMask(mask, "edit"),
            before={n: tensors[f"{n}.before"] for n in names},
            after={n: tensors[f"{n}.after"] for n in names},
        )


@dataclass(frozen=True)
class InPlaceTraining:
    """What :func:`trained_in_place` yields.

    Attributes:
        params: the model's attributed matrices by name (the tensors training writes).
        mask: the entries that may change, over the matrices that have any.
        original: each of those matrices' masked entries before training (1-D, row-major).
    """

    params: Mapping[str, Tensor]
    mask: ParamMask
    original: Mapping[str, Tensor]

    @property
    def selections(self) -> Mapping[str, Tensor]:
        """The entries that may change, per matrix (:mod:`memloc_tl.core.selection`)."""
        return self.mask.selections

    def edit(self) -> WeightEdit:
        """The change so far: the masked entries before training and now."""
        after = _masked(self.params, self.selections)
        return WeightEdit(
            mask=self.mask.to("cpu"),
            before={n: v.cpu() for n, v in self.original.items()},
            after={n: v.cpu() for n, v in after.items()},
        )

    def restore(self) -> None:
        """Write the masked entries' original values back."""
        _write_masked(self.params, self.selections, self.original)

    @contextlib.contextmanager
    def original_values(self) -> Iterator[None]:
        """Inside the block the masked entries hold their values from before training (bit for
        bit), e.g. for the original model's reference log-probabilities; on exit, also after an
        error, the trained values come back. Costs a copy of the masked entries (0.1% of the
        weights for a sparse mask; all of them for a mask of all weights)."""
        trained = _masked(self.params, self.selections)
        self.restore()
        try:
            yield
        finally:
            _write_masked(self.params, self.selections, trained)


@contextlib.contextmanager
def trained_in_place(
    model: HookedModel, mask: ParamMask, *, keep: bool = False
) -> Iterator[InPlaceTraining]:
    """Train ``model``'s own entries under ``mask`` inside the block, without a copy of it.

    Only the masked entries are saved (training must leave every other entry alone, as
    :class:`~memloc_tl.editing.optimizer.MaskedOptimizer` does). On exit they get their original
    values back, bit for bit, unless ``keep`` (then the trained values stay); on an error or
    Ctrl-C they always do. The ``.grad`` of every parameter is given back as it was.
    """
    params = attributed_parameters(model)
    check_masks_fit(mask.shapes, model, "not a mask of this model")
    names = [n for n in mask.names if mask.count_in(n)]
    changing = ParamMask.from_selections(
        {n: mask.selections[n] for n in names}, {n: mask.shapes[n] for n in names}, mask.kind
    )
    run = InPlaceTraining(params, changing, _masked(params, changing.selections))
    saved_grads = {p: p.grad for p in model_parameters(model)}
    try:
        yield run
    except BaseException:
        run.restore()
        raise
    else:
        if not keep:
            run.restore()
    finally:
        for p in model_parameters(model):
            p.grad = saved_grads.get(p)
