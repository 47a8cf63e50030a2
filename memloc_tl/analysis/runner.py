"""One forward pass over a paragraph set, shared by several read-only analyzers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.core.backend import HookedModel
from memloc_tl.core.paragraphs import Paragraphs, check_set
from memloc_tl.core.validation import check_positive_int


class ForwardAnalyzer(Protocol):
    """An analyzer that reads activations through forward hooks and accumulates statistics."""

    last_layer: int
    """The last layer whose activations it reads; the forward pass stops after it."""

    def prepare(self, tokens: Tensor) -> None:
        """Called with each batch's tokens before its forward pass."""
        ...

    def hooks(self) -> list[tuple[str, Callable[..., None]]]:
        """Forward hooks ``(hook name, fn(activation, hook))`` for this batch."""
        ...


def run_analyzers(
    model: HookedModel,
    paragraphs: Paragraphs,
    analyzers: Sequence[ForwardAnalyzer],
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> None:
    """Run every analyzer over ``paragraphs`` in one pass per batch.

    Hooks live only inside a ``model.hooks(...)`` scope, removed on exit (also on error), and
    the pass stops after the last layer any analyzer reads. The model is not changed.
    """
    if not analyzers:
        raise ValueError("run_analyzers needs at least one analyzer")
    check_positive_int(batch_size, "batch_size")
    check_set(model, paragraphs, "paragraphs")
    stop = max(a.last_layer for a in analyzers) + 1
    device = model.cfg.device
    for start in tqdm(
        range(0, len(paragraphs), batch_size), desc="analyzing", disable=not progress
    ):
        tokens = paragraphs.tokens[start : start + batch_size].to(device)
        for analyzer in analyzers:
            analyzer.prepare(tokens)
        fwd_hooks: list[Any] = [hook for analyzer in analyzers for hook in analyzer.hooks()]
        with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
            model(tokens, stop_at_layer=stop)
