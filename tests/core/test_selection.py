"""Selections: a boolean mask and its flat indices choose the same entries, in the same order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memloc_tl.core.selection import (
    INDEX_SHARE,
    check_selection,
    compact_selection,
    gather_selected,
    is_indices,
    put_selected_,
    selected_count,
    selected_indices,
    selected_mask,
)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    share=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    transposed=st.booleans(),
)
def test_both_forms_gather_and_put_what_boolean_indexing_does(
    shape: list[int], share: float, seed: int, transposed: bool
) -> None:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape[::-1] if transposed else shape, generator=generator)
    reverse = list(range(len(shape)))[::-1]
    # transposed: a non-contiguous view (2-D and up), as a bridge's weights are
    matrix = base.permute(reverse) if transposed else base
    mask = torch.rand(matrix.shape, generator=generator) < share
    held = compact_selection(mask)
    # the smaller form: indices below an eighth of the entries, else the booleans
    assert is_indices(held) == (int(mask.sum()) < INDEX_SHARE * mask.numel())
    for selection in (mask, selected_indices(mask)):
        check_selection(selection, matrix.shape, "m")
        assert selected_count(selection) == int(mask.sum())
        assert torch.equal(selected_mask(selection, matrix.shape), mask)
        assert torch.equal(gather_selected(matrix, selection), matrix[mask])
        values = torch.randn(int(mask.sum()), generator=generator)
        expected = matrix.clone()
        expected[mask] = values
        written = base.clone()
        target = written.permute(reverse) if transposed else written
        put_selected_(target, selection, values)  # through the view, into its storage
        assert torch.equal(target, expected)


def test_a_gathered_copy_is_not_a_view_of_the_matrix() -> None:
    matrix = torch.arange(12.0).view(3, 4)
    selection = torch.tensor([0, 5, 11])
    values = gather_selected(matrix, selection)
    values.add_(100)
    assert torch.equal(matrix, torch.arange(12.0).view(3, 4))


@pytest.mark.parametrize(
    ("selection", "error", "message"),
    [
        (torch.tensor([3, 1]), ValueError, "sorted and distinct"),
        (torch.tensor([1, 1]), ValueError, "sorted and distinct"),
        (torch.tensor([0, 12]), ValueError, r"lie in \[0, 12\)"),
        (torch.tensor([-1, 2]), ValueError, r"lie in \[0, 12\)"),
        (torch.tensor([[1, 2]]), ValueError, "must be 1-D"),
        (torch.tensor([1, 2], dtype=torch.int32), TypeError, "int64 flat indices"),
        (torch.zeros(4, 3, dtype=torch.bool), ValueError, r"shape \(4, 3\), expected \(3, 4\)"),
    ],
)
def test_bad_selections_are_named(selection: torch.Tensor, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        check_selection(selection, (3, 4), "blocks.0.attn.W_Q")
