"""How far a localizer's top weights move from one checkpoint to the next."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.checkpoints.series import (
    CheckpointSeries,
    check_inputs,
    load_for,
)
from memloc_tl.core.paragraphs import Paragraphs
from memloc_tl.core.rendering import render
from memloc_tl.core.results import Drawable
from memloc_tl.core.validation import check_fraction
from memloc_tl.localization.localizers import METHODS, localize


def weight_localizers() -> tuple[str, ...]:
    """The weights localizers :func:`mask_drift` runs (registered ones included; a learned mask
    is trained per call, a random one says nothing about the model)."""
    return tuple(m for m in METHODS["weights"] if m not in ("learned", "random"))


@dataclass(frozen=True)
class MaskDrift(Drawable):
    """How much a localizer's top weights move between consecutive checkpoints.

    Attributes:
        name: the series' name.
        method: the weights localizer (e.g. ``"gradient"``, the paper's criterion).
        fraction: the share of the weights in each step's mask (0.001: the top 0.1%).
        steps: the training steps.
        sizes: weights in each step's mask, ``[n_steps]``.
        shared: weights in both of two consecutive masks, ``[n_steps - 1]``.
        n_paragraphs: paragraphs localized at every step.
    """

    name: str
    method: str
    fraction: float
    steps: tuple[int, ...]
    sizes: Int[Tensor, " n_steps"]
    shared: Int[Tensor, " n_pairs"]
    n_paragraphs: int

    @property
    def jaccard(self) -> Float[Tensor, " n_pairs"]:
        """|A and B| / |A or B| of each consecutive pair of masks."""
        union = self.sizes[:-1] + self.sizes[1:] - self.shared
        return self.shared.double() / union.clamp_min(1).double()

    def to_frame(self) -> pd.DataFrame:
        """One row per consecutive pair: step, next_step, size, next_size, shared, jaccard."""
        return pd.DataFrame(
            {
                "step": list(self.steps[:-1]),
                "next_step": list(self.steps[1:]),
                "size": self.sizes[:-1].tolist(),
                "next_size": self.sizes[1:].tolist(),
                "shared": self.shared.tolist(),
                "jaccard": self.jaccard.tolist(),
            }
        )

    def figure(self) -> Any:
        """Jaccard overlap of consecutive masks vs the later step."""
        return render(self)


def mask_drift(
    series: CheckpointSeries,
    paragraphs: Paragraphs,
    *,
    method: str = "gradient",
    fraction: float = 0.001,
    progress: bool = True,
) -> MaskDrift:
    """The top ``fraction`` of the weights by ``method`` at every checkpoint, and the overlap of
    consecutive ones (one model and two masks in memory at a time)."""
    check_inputs(series, paragraphs)
    if method not in (known := weight_localizers()):
        raise ValueError(f"method must be one of {list(known)}, got {method!r}")
    check_fraction(fraction, "fraction")
    sizes, shared = [], []
    previous: Tensor | None = None
    for checkpoint in tqdm(series, desc=f"{method} masks per checkpoint", disable=not progress):
        model = load_for(checkpoint, paragraphs)
        found = localize(model, paragraphs, method=method)  # type: ignore[arg-type]
        mask = found.param_mask(fraction)
        flat = torch.cat([mask.boolean(name).flatten().cpu() for name in sorted(mask.names)])
        del model, found, mask  # released before the next checkpoint is loaded
        sizes.append(int(flat.sum()))
        if previous is not None:
            if previous.shape != flat.shape:
                raise ValueError(
                    f"checkpoint at step {checkpoint.step} has {len(flat)} attributed weights, "
                    f"the one before {len(previous)}: a series holds checkpoints of one model"
                )
            shared.append(int((previous & flat).sum()))
        previous = flat
    return MaskDrift(
        name=series.name,
        method=method,
        fraction=fraction,
        steps=series.steps,
        sizes=torch.tensor(sizes),
        shared=torch.tensor(shared, dtype=torch.int64),
        n_paragraphs=len(paragraphs),
    )
