"""The installed TransformerLens's version, for code that runs a leaner copy of one of its
methods only on the versions that copy was checked against bit for bit."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from typing import Any


@functools.cache
def transformer_lens_minor() -> str | None:
    """``"major.minor"`` of the installed TransformerLens (``"3.9"``), None if none is."""
    try:
        version = importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        return None
    return ".".join(version.split(".")[:2])


def checked_class(versions: tuple[str, ...], module: str, name: str) -> Any:
    """TransformerLens's class ``module.name`` where the installed version is one of
    ``versions`` (major.minor) and has it; otherwise None."""
    if transformer_lens_minor() not in versions:
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # pragma: no cover - checked versions have it
        return None
