"""Heads as values: ``HeadRef(layer=1, head=2)``, shown and parsed as ``"L1H2"``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_LABEL = re.compile(r"^\s*L(\d+)H(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class HeadRef:
    """One attention head: ``HeadRef(layer=1, head=2)``, shown ``L1H2`` (``str`` and ``repr``)."""

    layer: int
    head: int

    def __post_init__(self) -> None:
        for name in ("layer", "head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TypeError(f"{name} must be a non-negative int, got {value!r}")

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"

    def __repr__(self) -> str:  # in lists and tuples too (``scores.top(3)``): L0H0, not fields
        return str(self)

    @classmethod
    def parse(cls, label: str | HeadRef) -> HeadRef:
        """``"L1H2"`` (any case) -> ``HeadRef(1, 2)``; a HeadRef is returned as is."""
        if isinstance(label, HeadRef):
            return label
        match = _LABEL.match(label) if isinstance(label, str) else None
        if match is None:
            raise ValueError(f"a head label looks like 'L1H2', got {label!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    def check(self, cfg: Any) -> HeadRef:
        """Raise ``ValueError`` if the model (its ``cfg``) has no such head; return self."""
        return self.check_grid(cfg.n_layers, cfg.n_heads)

    def check_grid(self, n_layers: int, n_heads: int) -> HeadRef:
        """Raise ``ValueError`` unless ``layer < n_layers`` and ``head < n_heads``; return self."""
        if self.layer >= n_layers or self.head >= n_heads:
            raise ValueError(
                f"{self} does not exist: the model has {n_layers} layers of {n_heads} heads "
                f"(L0H0 to L{n_layers - 1}H{n_heads - 1})"
            )
        return self


def all_heads(cfg: Any) -> list[HeadRef]:
    """Every head of a model, layer by layer."""
    return [HeadRef(layer, head) for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
