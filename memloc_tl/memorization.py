"""Which paragraphs does the model reproduce? Exact-match length and continuation NLL.

Paper section 3.2: a paragraph is *memorized* when greedy decoding from its 50-token prefix
reproduces the 50-token continuation exactly (EM = 50); EM counts matching tokens up to the
first mismatch. The NLL is the mean negative log-likelihood of the continuation tokens.

Both come from one teacher-forced forward pass, with no generation: up to the first mismatch,
greedy decoding sees exactly the reference context, so the EM equals the leading run of
continuation positions where the teacher-forced argmax equals the reference token. The tests
prove this against real greedy generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.core.backend import (
    HookedModel,
)
from memloc_tl.core.forward import (
    DEFAULT_BATCH_SIZE,
    check_tokens,
    continuation_logits,
    exact_match_length,
    forward_rows,
    score_continuations,
    scores_from_logits,
)
from memloc_tl.core.paragraphs import Paragraphs, check_set
from memloc_tl.core.precision import Precision, decision_margins, near_flip
from memloc_tl.core.rendering import render
from memloc_tl.core.results import Drawable
from memloc_tl.core.unembedding import shared_unembedding
from memloc_tl.core.validation import check_positive_int

PAPER_BUCKETS: tuple[tuple[int, int], ...] = ((0, 10), (11, 29), (30, 49), (50, 50))
"""The paper's EM buckets (Fig. 2, 8): non-memorized, two partly memorized, memorized."""


@dataclass(frozen=True)
class MemorizationScan(Drawable):
    """Exact-match length and continuation NLL of every paragraph of a set.

    Attributes:
        paragraphs: the scanned paragraphs (row-aligned with every tensor below).
        exact_match: EM until the first mismatch, 0..continuation length.
        nll: mean NLL of the continuation tokens.
        token_nll: NLL of each continuation token.
        greedy_match: whether the teacher-forced argmax equals each continuation token.
        model_name: ``model.cfg.model_name`` of the scanned model.
        dtype: the precision of the matrix products (``"float32"``, ``"bfloat16"``, ...).
        near_flip: with a reduced ``dtype``: the windows with a decision margin below
            ``margin`` at a position that decides EM (see :mod:`memloc_tl.core.precision`).
        verified: whether those windows were scored again in float32 (their EM, NLL and
            matches are then float32's).
        margin: the flip margin in logits.
    """

    paragraphs: Paragraphs
    exact_match: Int[Tensor, " n_paragraphs"]
    nll: Float[Tensor, " n_paragraphs"]
    token_nll: Float[Tensor, "n_paragraphs continuation_pos"]
    greedy_match: Bool[Tensor, "n_paragraphs continuation_pos"]
    model_name: str = ""
    dtype: str = "float32"
    near_flip: Bool[Tensor, " n_paragraphs"] | None = None
    verified: bool = False
    margin: float = 0.0

    def __post_init__(self) -> None:
        n, c = len(self.paragraphs), self.paragraphs.continuation_len
        for name, shape in (
            ("exact_match", (n,)),
            ("nll", (n,)),
            ("token_nll", (n, c)),
            ("greedy_match", (n, c)),
            ("near_flip", (n,)),
        ):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")

    @property
    def continuation_len(self) -> int:
        return self.paragraphs.continuation_len

    def __len__(self) -> int:
        return len(self.paragraphs)

    def subset(self, index: Tensor) -> MemorizationScan:
        """The scan restricted to a boolean mask or positions."""
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        return MemorizationScan(
            paragraphs=self.paragraphs.select(index),
            exact_match=self.exact_match[index],
            nll=self.nll[index],
            token_nll=self.token_nll[index],
            greedy_match=self.greedy_match[index],
            model_name=self.model_name,
            dtype=self.dtype,
            near_flip=None if self.near_flip is None else self.near_flip[index],
            verified=self.verified,
            margin=self.margin,
        )

    def bucket(self, min_em: int, max_em: int) -> Paragraphs:
        """Paragraphs with ``min_em <= EM <= max_em``."""
        if min_em > max_em:
            raise ValueError(f"min_em={min_em} is above max_em={max_em}")
        return self.paragraphs.select((self.exact_match >= min_em) & (self.exact_match <= max_em))

    def memorized(self) -> Paragraphs:
        """Paragraphs whose whole continuation is reproduced (EM = continuation length)."""
        return self.bucket(self.continuation_len, self.continuation_len)

    def non_memorized(self, max_em: int = 10) -> Paragraphs:
        """Paragraphs with EM <= ``max_em`` (the paper's non-memorized set: 0..10)."""
        return self.bucket(0, max_em)

    def partly_memorized(self, min_em: int = 11) -> Paragraphs:
        """Paragraphs with ``min_em <= EM`` < continuation length (paper: 11..49)."""
        return self.bucket(min_em, self.continuation_len - 1)

    def buckets(self, edges: tuple[tuple[int, int], ...] = PAPER_BUCKETS) -> dict[str, Paragraphs]:
        """Paragraphs per EM bucket, keyed ``"0-10"``, ``"11-29"``, ``"30-49"``, ``"50"``."""
        return {(f"{lo}" if lo == hi else f"{lo}-{hi}"): self.bucket(lo, hi) for lo, hi in edges}

    def figure(self) -> Any:
        """Histogram of EM lengths (:func:`memloc_tl.viz.exact_match_figure`)."""
        return render(self)

    def to_frame(self) -> pd.DataFrame:
        """One row per paragraph: id, meta columns, EM, NLL, memorized flag."""
        frame = self.paragraphs.to_frame()
        frame["exact_match"] = self.exact_match.tolist()
        frame["nll"] = self.nll.tolist()
        frame["memorized"] = (self.exact_match == self.continuation_len).tolist()
        if self.near_flip is not None:
            frame["near_flip"] = self.near_flip.tolist()
        return frame

    def __repr__(self) -> str:
        n_mem = int((self.exact_match == self.continuation_len).sum())
        mean_em = float(self.exact_match.float().mean()) if len(self) else float("nan")
        precision = ""
        if self.near_flip is not None:
            what = "re-scored in float32" if self.verified else "not re-scored"
            precision = (
                f", {self.dtype}: {int(self.near_flip.sum())} near a flip (margin "
                f"{self.margin:g}), {what}"
            )
        return (
            f"MemorizationScan(model={self.model_name!r}, n={len(self)}, memorized={n_mem}, "
            f"mean_em={mean_em:.2f}{precision})"
        )


def scan_memorization(
    model: HookedModel,
    paragraphs: Paragraphs,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    precision: Precision | None = None,
    progress: bool = True,
) -> MemorizationScan:
    """Measure every paragraph's exact-match length and continuation NLL (paper section 3.2).

    One teacher-forced forward pass per batch; no ``[N, pos, d_vocab]`` tensor outlives its
    batch. The model is not changed.

    Args:
        model: the model.
        paragraphs: the paragraphs, tokenized for this model.
        batch_size: paragraphs per forward pass; on a CPU at most
            :data:`~memloc_tl.core.forward.CPU_FORWARD_TOKENS` tokens' worth (32 windows of
            100) and :data:`~memloc_tl.core.forward.CPU_ACTIVATION_BYTES` of the largest
            activation (27 windows of 100 on GPT-Neo 125M), since larger forwards run slower
            per window there.
        precision: score in reduced precision (``Precision(torch.bfloat16)``): the windows
            near a flip are counted, and with ``verify="margin"`` (its default) scored again in
            float32, so that the EM column equals float32's (see :mod:`memloc_tl.core.precision`).
            Default: the model's own dtype, no check.
        progress: show a progress bar.

    Raises:
        ValueError: paragraphs tokenized for another model, or a bad batch size.
    """
    check_set(model, paragraphs, "paragraphs", allow_empty=True)
    check_positive_int(batch_size, "batch_size")
    check_tokens(model, paragraphs.tokens, paragraphs.prefix_len)
    if precision is not None and not isinstance(precision, Precision):
        raise TypeError(
            f"precision must be a Precision (e.g. Precision(torch.bfloat16)), got "
            f"{type(precision).__name__}"
        )
    reduced = precision is not None and precision.reduced
    matches, nlls, flips = [], [], []
    prefix_len = paragraphs.prefix_len
    rows = forward_rows(model, batch_size, paragraphs.seq_len)
    with torch.no_grad(), shared_unembedding():
        for start in tqdm(range(0, len(paragraphs), rows), desc="scanning", disable=not progress):
            batch = paragraphs.tokens[start : start + rows]
            if precision is not None and reduced:
                with precision.autocast(model.cfg.device or "cpu"):
                    logits = continuation_logits(model, batch, prefix_len)
                target = batch[:, prefix_len:].to(logits.device)
                greedy_match, token_nll = scores_from_logits(logits, target)
                margins = decision_margins(logits, target)
                em = exact_match_length(greedy_match)
                flips.append(near_flip(margins, em, precision.threshold).cpu())
                del logits, margins
            else:
                greedy_match, token_nll = score_continuations(model, batch, prefix_len)
            matches.append(greedy_match.cpu())
            nlls.append(token_nll.cpu())
    c = paragraphs.continuation_len
    greedy_match = torch.cat(matches) if matches else torch.empty(0, c, dtype=torch.bool)
    token_nll = torch.cat(nlls) if nlls else torch.empty(0, c)
    flagged = (torch.cat(flips) if flips else torch.zeros(0, dtype=torch.bool)) if reduced else None
    verified = precision is not None and reduced and precision.verify == "margin"
    if verified and flagged is not None and bool(flagged.any()):
        again = flagged.nonzero().flatten()
        with torch.no_grad(), shared_unembedding():
            for start in range(0, len(again), rows):
                chosen = again[start : start + rows]
                match, nll = score_continuations(model, paragraphs.tokens[chosen], prefix_len)
                greedy_match[chosen], token_nll[chosen] = match.cpu(), nll.cpu().float()
    return MemorizationScan(
        paragraphs=paragraphs,
        exact_match=exact_match_length(greedy_match),
        nll=token_nll.mean(dim=-1),
        token_nll=token_nll,
        greedy_match=greedy_match,
        model_name=str(model.cfg.model_name),
        dtype="float32" if precision is None else precision.name,
        near_flip=flagged,
        verified=verified,
        margin=0.0 if precision is None else precision.threshold,
    )


def summarize(scans: dict[str, MemorizationScan]) -> pd.DataFrame:
    """One row per named scan: size, memorized count, mean and max EM, mean NLL."""
    rows: list[dict[str, Any]] = []
    for name, scan in scans.items():
        em = scan.exact_match.float()
        rows.append(
            {
                "set": name,
                "n": len(scan),
                "memorized": int((scan.exact_match == scan.continuation_len).sum()),
                "mean_em": float(em.mean()) if len(scan) else float("nan"),
                "max_em": int(scan.exact_match.max()) if len(scan) else 0,
                "mean_nll": float(scan.nll.mean()) if len(scan) else float("nan"),
            }
        )
    return pd.DataFrame(rows)
