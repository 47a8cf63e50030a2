"""When each paragraph became memorized: the same paragraphs scanned at every checkpoint."""

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
from memloc_tl.memorization import scan_memorization


@dataclass(frozen=True)
class MemorizationTimeline(Drawable):
    """EM and NLL of the same paragraphs at every checkpoint of a series.

    Attributes:
        name: the series' name.
        steps: the training steps, increasing.
        ids: the paragraphs' ids.
        exact_match: EM per step and paragraph, ``[n_steps, n_paragraphs]``.
        nll: mean continuation NLL per step and paragraph, ``[n_steps, n_paragraphs]``.
        continuation_len: the EM of a memorized paragraph.
    """

    name: str
    steps: tuple[int, ...]
    ids: tuple[str, ...]
    exact_match: Int[Tensor, "n_steps n_paragraphs"]
    nll: Float[Tensor, "n_steps n_paragraphs"]
    continuation_len: int

    @property
    def memorized(self) -> Tensor:
        """``[n_steps, n_paragraphs]``: EM = continuation length."""
        return self.exact_match == self.continuation_len

    def first_memorized_step(self) -> dict[str, int | None]:
        """Per paragraph, the first step at which it is memorized (``None``: never)."""
        out: dict[str, int | None] = {}
        for j, paragraph in enumerate(self.ids):
            hits = self.memorized[:, j].nonzero().flatten()
            out[paragraph] = self.steps[int(hits[0])] if len(hits) else None
        return out

    def forgetting_events(self) -> list[tuple[str, int]]:
        """(paragraph, step) wherever a paragraph memorized at the previous step is not."""
        lost = self.memorized[:-1] & ~self.memorized[1:]
        return [(self.ids[int(j)], self.steps[int(i) + 1]) for i, j in lost.nonzero().tolist()]

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per step and paragraph (step, id, exact_match, nll, memorized)."""
        n_steps, n = self.exact_match.shape
        return pd.DataFrame(
            {
                "step": [s for s in self.steps for _ in range(n)],
                "id": list(self.ids) * n_steps,
                "exact_match": self.exact_match.flatten().tolist(),
                "nll": self.nll.flatten().tolist(),
                "memorized": self.memorized.flatten().tolist(),
            }
        )

    def figure(self) -> Any:
        """EM vs training step, one line per paragraph."""
        return render(self)

    def heatmap(self) -> Any:
        """Paragraphs x steps, EM as color, sorted by the step each became memorized."""
        return render(self, "heatmap")

    def __repr__(self) -> str:
        first = self.first_memorized_step()
        reached = sum(step is not None for step in first.values())
        return (
            f"MemorizationTimeline({self.name}: {len(self.ids)} paragraphs x {len(self.steps)} "
            f"steps {self.steps[0]}..{self.steps[-1]}; {reached} memorized at some step, "
            f"{len(self.forgetting_events())} forgetting events)"
        )


def scan_checkpoints(
    series: CheckpointSeries,
    paragraphs: Paragraphs,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> MemorizationTimeline:
    """Scan ``paragraphs`` at every checkpoint of ``series`` (one model in memory at a time).

    Args:
        series: the checkpoints.
        paragraphs: the paragraphs, tokenized with the series' tokenizer.
        batch_size: paragraphs per forward pass.
        progress: show a progress bar over the checkpoints.
    """
    check_inputs(series, paragraphs)
    ems, nlls = [], []
    for checkpoint in tqdm(series, desc="checkpoints", disable=not progress):
        model = load_for(checkpoint, paragraphs)
        scan = scan_memorization(model, paragraphs, batch_size=batch_size, progress=False)
        ems.append(scan.exact_match.cpu())
        nlls.append(scan.nll.float().cpu())
        del model, scan  # released before the next checkpoint is loaded
    return MemorizationTimeline(
        name=series.name,
        steps=series.steps,
        ids=tuple(paragraphs.ids),
        exact_match=torch.stack(ems),
        nll=torch.stack(nlls),
        continuation_len=paragraphs.continuation_len,
    )
