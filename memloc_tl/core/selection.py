"""Which entries of a matrix: a boolean mask of its shape, or the flat indices of the chosen ones.

A *selection* is how a weight mask is held in memory: either a boolean tensor of the matrix's
shape (a byte per entry) or a 1-D ``int64`` tensor of the chosen entries' flat (row-major)
indices, sorted and distinct (eight bytes per chosen entry). :func:`compact_selection` picks
the smaller: indices when under an eighth of the entries are chosen (a 0.1% mask of GPT-Neo
125M's attributed matrices is 0.7 MiB of indices instead of 81 MiB of booleans), booleans
otherwise (a mask of all weights stays a byte per weight).

Both forms list the chosen entries in the same order, row-major, so :func:`gather_selected`
returns the same values, in the same order, as ``matrix[boolean_mask]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

INDEX_SHARE = 1 / 8
"""A selection of under this share of a matrix's entries is held as indices (the break-even of
eight-byte indices against one-byte booleans)."""


def is_indices(selection: Tensor) -> bool:
    """Whether ``selection`` is held as flat indices (else as a boolean mask)."""
    return selection.dtype != torch.bool


def check_selection(selection: Tensor, shape: Sequence[int], what: str) -> None:
    """A boolean mask of ``shape``, or sorted distinct int64 flat indices into it; else an error
    naming ``what``.

    Raises:
        TypeError: neither boolean nor int64.
        ValueError: a boolean mask of another shape; indices that are not 1-D, out of range,
            unsorted or repeated.
    """
    shape = tuple(shape)
    if selection.dtype == torch.bool:
        if tuple(selection.shape) != shape:
            raise ValueError(
                f"the mask of {what} has shape {tuple(selection.shape)}, expected {shape}"
            )
        return
    if selection.dtype != torch.int64:
        raise TypeError(
            f"the mask of {what} must be boolean (or int64 flat indices), got {selection.dtype}"
        )
    size = _numel(shape)
    if selection.ndim != 1:
        raise ValueError(f"the indices of {what} must be 1-D, got shape {tuple(selection.shape)}")
    if len(selection) and (int(selection[0]) < 0 or int(selection[-1]) >= size):
        raise ValueError(f"the indices of {what} must lie in [0, {size})")
    if len(selection) > 1 and not bool((selection[1:] > selection[:-1]).all()):
        raise ValueError(f"the indices of {what} must be sorted and distinct")


def compact_selection(mask: Tensor) -> Tensor:
    """A boolean mask as the smaller selection: its flat indices when under
    :data:`INDEX_SHARE` of the entries are chosen, else the mask itself."""
    if not is_indices(mask) and int(mask.sum()) < INDEX_SHARE * mask.numel():
        return mask.flatten().nonzero().flatten()
    return mask


def selected_count(selection: Tensor) -> int:
    """How many entries are chosen."""
    return len(selection) if is_indices(selection) else int(selection.sum())


def selected_indices(selection: Tensor) -> Tensor:
    """The chosen entries' flat indices, sorted (made from a boolean mask if need be)."""
    return selection if is_indices(selection) else selection.flatten().nonzero().flatten()


def selected_mask(selection: Tensor, shape: Sequence[int]) -> Tensor:
    """The selection as a boolean mask of ``shape`` (made from indices if need be)."""
    if not is_indices(selection):
        return selection
    mask = torch.zeros(_numel(shape), dtype=torch.bool, device=selection.device)
    mask[selection] = True
    return mask.view(tuple(shape))


def gather_selected(matrix: Tensor, selection: Tensor) -> Tensor:
    """A copy of the chosen entries of ``matrix``, 1-D, row-major (as ``matrix[mask]``)."""
    selection = selection.to(matrix.device)
    if not is_indices(selection):
        return matrix.detach()[selection].clone()
    if matrix.is_contiguous():
        return matrix.detach().view(-1).index_select(0, selection)
    return matrix.detach()[torch.unravel_index(selection, matrix.shape)].clone()


def put_selected_(matrix: Tensor, selection: Tensor, values: Tensor) -> None:
    """Write ``values`` (1-D, row-major, as :func:`gather_selected` returns them) into the chosen
    entries of ``matrix``, in place (a view of a larger tensor included)."""
    selection = selection.to(matrix.device)
    values = values.to(matrix.device, matrix.dtype)
    with torch.no_grad():
        if not is_indices(selection):
            matrix[selection] = values
        elif matrix.is_contiguous():
            matrix.view(-1).index_copy_(0, selection, values)
        else:
            matrix[torch.unravel_index(selection, matrix.shape)] = values


def _numel(shape: Sequence[int]) -> int:
    size = 1
    for n in shape:
        size *= int(n)
    return size
