"""One validation path for what analyzers and editors are given, checked before any work.

Every public entry point checks its inputs here first, so a bad input is a ``TypeError`` or
``ValueError`` that names the argument and the fix, raised before a forward pass, a hook or a
write, never a NaN result or a traceback from deep inside torch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor


def check_positive_int(value: Any, name: str) -> int:
    """An ``int`` (not a bool or float) of at least 1, e.g. a batch size or a step count."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_seed(value: Any, name: str = "seed") -> int:
    """An ``int`` seed (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """Exactly ``True`` or ``False`` (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: Iterable[str]) -> str:
    """``value`` is exactly one of ``choices`` (no prefix or case matching)."""
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def check_fraction(value: Any, name: str) -> float:
    """A finite number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {type(value).__name__}")
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def check_finite_weights(named: Iterable[tuple[str, Tensor]], what: str = "the model") -> None:
    """Every tensor is finite; otherwise a ``ValueError`` naming the first bad one.

    A model holding NaN or infinite weights gives NaN scores that rank like numbers (a plausible
    ``top(3)``), or EMs computed from garbage; it is refused before any analysis instead.
    """
    for name, tensor in named:
        if not tensor.is_floating_point():
            continue
        # NaN and infinities reach a sum, so a finite sum means every entry is finite; a sum
        # is one pass with no tensor allocated (torch.isfinite of the embedding alone makes
        # four temporaries, 0.4 GPT-Neo 125M models). Only a non-finite sum (a bad entry, or
        # finite entries whose sum overflows) is looked at entry by entry, in chunks.
        if bool(torch.isfinite(tensor.detach().sum())):
            continue
        bad = _non_finite_count(tensor)
        if bad:
            raise ValueError(
                f"{what} holds non-finite values in {name} ({bad} of {tensor.numel()} entries "
                "are NaN or infinite): analyses of it would rank NaN scores; reload the "
                "checkpoint, or find the step that diverged (e.g. a learning rate too large)"
            )


def _non_finite_count(tensor: Tensor, chunk: int = 1 << 20) -> int:
    """How many entries of ``tensor`` are NaN or infinite, ``chunk`` entries at a time."""
    flat = tensor.detach().reshape(-1)
    return sum(
        int((~torch.isfinite(flat[start : start + chunk])).sum())
        for start in range(0, flat.numel(), chunk)
    )


def check_real(
    value: Any,
    name: str,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
) -> float:
    """A finite real number (not a bool, NaN or infinity) within the given bounds.

    Every float hyperparameter (learning rates, weights of loss terms, temperatures, fractions)
    goes through here before any work, so ``lr=float("inf")`` or ``kl_weight=float("nan")`` is a
    ``ValueError`` naming the argument, never a model with NaN weights or a silently dropped term.

    Args:
        value: the number.
        name: the argument's name, for the message.
        above: the number must be > this (e.g. 0 for a learning rate).
        at_least: the number must be >= this (e.g. 0 for a loss weight).
        at_most: the number must be <= this.
    """
    # numbers.Real: int, float and numpy's scalars; a bool is a number only to Python
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    bounds = []
    if above is not None and not value > above:
        bounds.append(f"> {above}")
    if at_least is not None and not value >= at_least:
        bounds.append(f">= {at_least}")
    if at_most is not None and not value <= at_most:
        bounds.append(f"<= {at_most}")
    if bounds:
        raise ValueError(f"{name} must be {' and '.join(bounds)}, got {value}")
    return float(value)


def check_positions(
    positions: Sequence[int] | Tensor, length: int, name: str = "positions"
) -> Tensor:
    """Non-empty integer positions within ``0..length-1``, as a long tensor.

    Floats are refused rather than truncated (``1.7`` is not position 1), and so are bools.
    """
    if isinstance(positions, Tensor):
        values = positions.flatten()
        if values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
            raise TypeError(f"{name} must hold integers, got a {values.dtype} tensor")
        values = values.long()
    else:
        items = list(positions)
        bad = [p for p in items if isinstance(p, bool) or not isinstance(p, int)]
        if bad:
            raise TypeError(f"{name} must hold integers, got {bad[0]!r} ({type(bad[0]).__name__})")
        values = torch.tensor(items, dtype=torch.long)
    if len(values) == 0:
        raise ValueError(f"{name} is empty: pass at least one position (or None for all)")
    if int(values.min()) < 0 or int(values.max()) >= length:
        raise ValueError(f"{name} must lie within 0..{length - 1}, got {values.tolist()}")
    return values


def check_device(device: Any, name: str = "device") -> torch.device | None:
    """A device this machine has (``None`` stays ``None``: the caller's default).

    ``device="cuda"`` on a machine without CUDA is a ``ValueError`` with the fix, not torch's
    ``AssertionError`` ("Torch not compiled with CUDA enabled") from deep inside a load.
    """
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{name} must be a string such as 'cpu' or 'cuda', got {device!r}")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(
            f"{name}={device!r} is not a device ({error}); try 'cpu' or 'cuda'"
        ) from error
    if resolved.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise ValueError(f"{name}={device!r}, but this machine has no CUDA device; use 'cpu'")
        if resolved.index is not None and resolved.index >= available:
            raise ValueError(
                f"{name}={device!r}, but this machine has {available} CUDA device(s) "
                f"(cuda:0..cuda:{available - 1})"
            )
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={device!r}, but MPS is not available here; use 'cpu'")
    return resolved


Config = TypeVar("Config")


def check_config(value: Config | None, kind: type[Config], name: str = "config") -> Config:
    """``value`` is a ``kind`` (a config dataclass), or ``None`` for ``kind()``'s defaults."""
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise TypeError(
            f"{name} must be a {kind.__name__} (e.g. {kind.__name__}(...)), got "
            f"{type(value).__name__}"
        )
    return value
