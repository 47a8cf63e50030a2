"""Scoring in reduced precision (bf16, fp16) with an exactness guarantee for EM.

On a GPU, bf16 and fp16 matrix products are several times faster than fp32 ones, but EM counts
greedy matches "until the first mismatch", and where the reference token's logit nearly ties
the best other one, rounding can flip the decision and change EM by up to the whole
continuation. So every window scored in reduced precision gets its *decision margins*: at each
continuation position that decides its EM (every matched position and the first mismatch), the
reference token's logit minus the best other token's. A window with any such margin below
``Precision.margin`` in absolute value is *near a flip*. With ``verify="margin"`` (the default)
exactly those windows are scored again in float32, so the EM column equals the float32 scan's
wherever the reduced-precision logits are within ``margin / 2`` of the float32 ones (the
benchmark ``benchmarks/precision.py`` measures that error, and the agreement).

The NLL of a window that is not re-scored stays at the reduced precision (its error is printed
by the benchmark too); a re-scored window's NLL is float32's.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from memloc_tl.core.validation import check_choice, check_real

Verify = Literal["margin", "none"]
"""What a reduced-precision scan does with windows near a flip: score them again in float32
(``"margin"``), or only count them (``"none"``)."""

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

DEFAULT_MARGINS = {torch.bfloat16: 1.0, torch.float16: 0.25, torch.float32: 0.0}
"""Default flip margins in logits. A margin is a difference of two logits, each off by at most
the largest error, so it must exceed twice that error: measured against float32
(``benchmarks/precision.py``, docs/memorization.md) the largest error was 0.153 (bf16) and
0.021 (fp16) on the default organism, 0.053 and 0.0065 on GPT-Neo 125M's layout, so these
margins are 3.3-19x twice the largest error."""


@dataclass(frozen=True)
class Precision:
    """How a scan computes: the dtype of its matrix products, and the flip check.

    Attributes:
        dtype: ``torch.bfloat16``, ``torch.float16`` (autocast) or ``torch.float32`` (as is),
            or their names.
        verify: ``"margin"``: windows near a flip are scored again in float32; ``"none"``:
            they are only counted (``MemorizationScan.near_flip``).
        margin: the flip margin in logits (default :data:`DEFAULT_MARGINS` for the dtype).
    """

    dtype: torch.dtype | str = torch.bfloat16
    verify: Verify = "margin"
    margin: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):
            check_choice(self.dtype, "dtype", tuple(DTYPES))
            object.__setattr__(self, "dtype", DTYPES[self.dtype])
        if self.dtype not in DEFAULT_MARGINS:
            raise ValueError(
                f"dtype must be one of {list(DTYPES)} (a torch dtype or its name), got "
                f"{self.dtype!r}"
            )
        check_choice(self.verify, "verify", typing.get_args(Verify))
        if self.margin is not None:
            check_real(self.margin, "margin", at_least=0.0)

    @property
    def name(self) -> str:
        """The dtype's name (``"bfloat16"``)."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def threshold(self) -> float:
        """The flip margin in logits."""
        assert isinstance(self.dtype, torch.dtype)  # names are resolved in __post_init__
        return DEFAULT_MARGINS[self.dtype] if self.margin is None else float(self.margin)

    @property
    def reduced(self) -> bool:
        """Whether the products run below float32."""
        return self.dtype != torch.float32

    @contextlib.contextmanager
    def autocast(self, device: torch.device | str) -> Iterator[None]:
        """``torch.autocast`` to the dtype on ``device`` (nothing for float32)."""
        if not self.reduced:
            yield
            return
        assert isinstance(self.dtype, torch.dtype)
        with torch.autocast(device_type=torch.device(device).type, dtype=self.dtype):
            yield


def decision_margins(
    logits: Float[Tensor, "batch pos d_vocab"], target: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos"]:
    """The reference token's logit minus the best other token's, per position (> 0: the
    greedy choice is the reference token; the size says how far from a flip)."""
    reference = logits.gather(-1, target[..., None]).squeeze(-1)
    others = logits.scatter(-1, target[..., None], float("-inf"))
    return reference - others.amax(-1)


def near_flip(
    margins: Float[Tensor, "batch pos"], exact_match: Int[Tensor, " batch"], threshold: float
) -> Bool[Tensor, " batch"]:
    """Windows with a decision margin below ``threshold`` at a position that decides EM (the
    matched positions and the first mismatch; later positions do not change EM)."""
    positions = torch.arange(margins.shape[1], device=margins.device)
    deciding = positions[None, :] <= exact_match.to(margins.device)[:, None]
    return ((margins.abs() < threshold) & deciding).any(-1)
