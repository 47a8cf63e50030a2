"""Quiet by default: other libraries' progress bars off while memloc-tl calls them.

Loading a checkpoint prints transformers' "Loading weights" bar, reading a data file prints
datasets' "Generating train split" bar; neither says anything a memloc-tl user needs, and both
bury memloc-tl's own bars (one per phase that takes longer than a few seconds). Inside
:func:`quiet_libraries` those bars are off; each library's own setting is restored afterwards.
``MEMLOC_VERBOSE=1`` (``memloc --verbose``) leaves them on.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def verbose() -> bool:
    """Whether third-party progress bars stay on (``MEMLOC_VERBOSE`` set to 1, true or yes)."""
    return os.environ.get("MEMLOC_VERBOSE", "").lower() in ("1", "true", "yes")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers' and datasets' progress bars off inside, restored on exit."""
    if verbose():
        yield
        return
    restore: list[Callable[[], None]] = []
    with contextlib.suppress(ImportError):
        import transformers.utils.logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            restore.append(hf_logging.enable_progress_bar)
    with contextlib.suppress(ImportError):
        import datasets

        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            restore.append(datasets.enable_progress_bars)
    try:
        yield
    finally:
        for undo in restore:
            undo()


def quietly(function: F) -> F:
    """Run ``function`` inside :func:`quiet_libraries`."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with quiet_libraries():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
