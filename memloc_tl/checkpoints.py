"""Memorization over training: a series of checkpoints, when each paragraph became memorized,
and where it is localized at each step.

A :class:`CheckpointSeries` is an ordered list of training steps, each with a way to load the
model at that step: a hub model's revisions (Pythia's ``"step143000"``), local checkpoint
directories, or the organism's own checkpoints (``OrganismConfig.n_checkpoints``). Checkpoints
are loaded one at a time, and the previous one is released before the next is loaded, so a
series of any length needs the memory of one model.

:func:`scan_checkpoints` scans the same paragraphs at every step and gives a
:class:`MemorizationTimeline`: EM and NLL per paragraph per step, the first step at which each
paragraph reaches EM = continuation length, and the forgetting events (a memorized paragraph
that falls below full EM at a later step).

:func:`localize_over_checkpoints` runs one head-level analysis at every checkpoint (rare-token
attention, exact zero ablation, or any function of the model that gives
:class:`~memloc_tl.core.results.HeadScores`) and gives a :class:`HeadTimeline`: the scores per step,
the rank over steps of the last step's top head, and :meth:`HeadTimeline.answer`, the one-line
answer to "did the head that matters at the end exist before the paragraphs were memorized?".

Everything that can be checked before any model is loaded is checked first: an empty series,
steps out of order or repeated, a missing directory, directories of another architecture or with
another tokenizer than the first.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.analysis.patching import patching_sweep
from memloc_tl.analysis.rare_tokens import rare_token_attention
from memloc_tl.core.backend import HookedModel
from memloc_tl.core.files import CorruptFileError, atomic_write_text, read_json
from memloc_tl.core.heads import HeadRef
from memloc_tl.core.paragraphs import Paragraphs
from memloc_tl.core.rendering import render
from memloc_tl.core.results import Drawable, HeadScores
from memloc_tl.core.validation import check_config, check_fraction, check_positive_int
from memloc_tl.corpus import (
    SCAN_FILE,
    CorpusConfig,
    CorpusScanSummary,
    Document,
    Placement,
    barrier,
    read_corpus_scan,
    scan_corpus,
)
from memloc_tl.localization.localizers import METHODS, localize, needs_keep
from memloc_tl.memorization import scan_memorization
from memloc_tl.uncertainty import Order

if TYPE_CHECKING:
    pass

STEP_PATTERN = re.compile(r"step[-_]?(\d+)")
"""A training step in a revision or directory name: ``step143000``, ``step-000120``."""

ARCHITECTURE_KEYS = (
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "n_embd",
    "num_layers",
    "n_layer",
    "num_hidden_layers",
    "num_heads",
    "n_head",
    "num_attention_heads",
    "attention_types",
    "window_size",
    "intermediate_size",
)
"""The ``config.json`` fields that must agree across a series of checkpoint directories."""

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model")


@dataclass(frozen=True)
class Checkpoint:
    """One training step and how to load the model at it.

    Attributes:
        step: the training step.
        source: where it comes from (a directory, or ``name@revision``), for messages.
        load: loads the model (a new one at every call).
    """

    step: int
    source: str
    load: Callable[[], HookedModel]


def step_of(name: str) -> int:
    """The training step named in a revision or directory name (``"step143000"`` -> 143000)."""
    found = STEP_PATTERN.findall(Path(name).name)
    if not found:
        raise ValueError(
            f"no training step in {name!r} (expected e.g. 'step143000' or 'step-000120'); "
            "pass steps= explicitly"
        )
    return int(found[-1])


@dataclass(frozen=True)
class CheckpointSeries:
    """Checkpoints in training order (see the module docs).

    Attributes:
        name: what the series is of (a model name, an organism key).
        checkpoints: one per step, steps strictly increasing.
    """

    name: str
    checkpoints: tuple[Checkpoint, ...]

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ValueError(f"the checkpoint series {self.name!r} is empty: give one or more")
        steps = [c.step for c in self.checkpoints]
        for step in steps:
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"steps must be ints >= 0, got {step!r}")
        bad = [(a, b) for a, b in itertools.pairwise(steps) if b <= a]
        if bad:
            raise ValueError(
                f"checkpoint steps must increase strictly, got {steps} (step {bad[0][1]} after "
                f"{bad[0][0]}); order the checkpoints by training step"
            )

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(c.step for c in self.checkpoints)

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.checkpoints)

    @classmethod
    def from_directories(
        cls,
        paths: Sequence[str | Path],
        *,
        steps: Sequence[int] | None = None,
        name: str | None = None,
        device: str | torch.device | None = None,
    ) -> CheckpointSeries:
        """Local checkpoint directories (``transformers`` format), in training order.

        Args:
            paths: the directories.
            steps: their training steps (default: read from each name, e.g. ``step-000120``).
            name: the series' name (default: the first directory's parent).
            device: device of the loaded models.
        """
        from memloc_tl.models import load_model

        directories = [Path(p).expanduser() for p in paths]
        if not directories:
            raise ValueError("the checkpoint series is empty: give one or more directories")
        missing = [str(d) for d in directories if not (d / "config.json").is_file()]
        if missing:
            raise FileNotFoundError(
                f"not a checkpoint directory (no config.json): {', '.join(missing)}"
            )
        if steps is not None and len(steps) != len(directories):
            raise ValueError(f"{len(steps)} steps for {len(directories)} directories")
        numbers = list(steps) if steps is not None else [step_of(str(d)) for d in directories]
        _check_same_model(directories)

        def loader(directory: Path) -> Callable[[], HookedModel]:
            return lambda: load_model(directory, device=device)

        return cls(
            name=name or str(directories[0].parent),
            checkpoints=tuple(
                Checkpoint(step, str(d), loader(d))
                for step, d in zip(numbers, directories, strict=True)
            ),
        )

    @classmethod
    def from_revisions(
        cls,
        name: str,
        revisions: Sequence[str],
        *,
        steps: Sequence[int] | None = None,
        **load_kwargs: Any,
    ) -> CheckpointSeries:
        """Hub revisions of one model (Pythia: ``"step1000"``, ...), in training order.

        ``load_kwargs`` go to :func:`~memloc_tl.models.load_model` (device, dtype, ...).
        """
        from memloc_tl.models import load_model

        if not revisions:
            raise ValueError("the checkpoint series is empty: give one or more revisions")
        if steps is not None and len(steps) != len(revisions):
            raise ValueError(f"{len(steps)} steps for {len(revisions)} revisions")
        numbers = list(steps) if steps is not None else [step_of(r) for r in revisions]

        def loader(revision: str) -> Callable[[], HookedModel]:
            return lambda: load_model(name, revision=revision, **load_kwargs)

        return cls(
            name=name,
            checkpoints=tuple(
                Checkpoint(step, f"{name}@{r}", loader(r))
                for step, r in zip(numbers, revisions, strict=True)
            ),
        )


def _check_same_model(directories: list[Path]) -> None:
    """One architecture and one tokenizer across the directories, or a clear error."""

    def architecture(directory: Path) -> dict[str, Any]:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        return {k: config[k] for k in ARCHITECTURE_KEYS if k in config}

    def tokenizer(directory: Path) -> str | None:
        files = [directory / f for f in TOKENIZER_FILES if (directory / f).is_file()]
        if not files:
            return None
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
        return digest.hexdigest()

    first, first_tokenizer = architecture(directories[0]), tokenizer(directories[0])
    for directory in directories[1:]:
        other = architecture(directory)
        if other != first:
            differ = {k: (first.get(k), other.get(k)) for k in first.keys() | other.keys()}
            differ = {k: v for k, v in differ.items() if v[0] != v[1]}
            raise ValueError(
                f"{directory} is a checkpoint of another architecture than {directories[0]} "
                f"(first vs this: {differ}); a series holds checkpoints of one model"
            )
        theirs = tokenizer(directory)
        if first_tokenizer is not None and theirs is not None and theirs != first_tokenizer:
            raise ValueError(
                f"{directory} has another tokenizer than {directories[0]}; a series holds "
                "checkpoints of one model, whose paragraphs mean the same tokens at every step"
            )


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
    _check_inputs(series, paragraphs)
    ems, nlls = [], []
    for checkpoint in tqdm(series, desc="checkpoints", disable=not progress):
        model = _load_for(checkpoint, paragraphs)
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


def head_localizers() -> tuple[str, ...]:
    """The head-level localizers of :func:`~memloc_tl.localization.localizers.localize` that
    :func:`localize_over_checkpoints` runs by name (their scores rank largest first), those
    added with :func:`~memloc_tl.register_localizer` included."""
    return tuple(m for m in METHODS["heads"] if m != "random")


def weight_localizers() -> tuple[str, ...]:
    """The weights localizers :func:`mask_drift` runs (registered ones included; a learned mask
    is trained per call, a random one says nothing about the model)."""
    return tuple(m for m in METHODS["weights"] if m not in ("learned", "random"))


def analyses() -> dict[str, Order]:
    """The named head analyses and which end of their score ranks first: rare-token attention
    (the pooled mean Kendall tau of attention against frequency rank: most negative = attends
    most to rare tokens), the exact activation-patching sweep (the mean continuation-NLL
    increase when the head's output is patched in from ``source``, e.g. the final model's
    perturbed prefixes), and the head localizers of ``localize(level="heads")``
    (``"zero_ablation"``: the NLL increase when the head alone is zeroed; ``"activation"`` and
    ``"learned"`` need ``keep``; a registered localizer as it was registered)."""
    return {
        "rare_tokens": "smallest",
        "patching": "largest",
        **dict.fromkeys(head_localizers(), "largest"),
    }


@dataclass(frozen=True)
class HeadTimeline(Drawable):
    """One head-level score at every checkpoint of a series.

    Attributes:
        name: the series' name.
        analysis: what the score is.
        order: which end of the score ranks first (``"largest"`` or ``"smallest"``).
        steps: the training steps.
        scores: ``[n_steps, n_layers, n_heads]``.
        n_paragraphs: paragraphs each step's score was computed from.
        score: what one score is, as the analysis names it (e.g. ``"patch: mean dNLL"``).
    """

    name: str
    analysis: str
    order: Order
    steps: tuple[int, ...]
    scores: Float[Tensor, "n_steps n_layers n_heads"]
    n_paragraphs: int
    score: str = ""

    def at(self, step: int) -> HeadScores:
        """The scores at ``step`` (one of :attr:`steps`)."""
        if step not in self.steps:
            raise ValueError(f"no checkpoint at step {step}; the steps are {list(self.steps)}")
        return HeadScores(self.analysis, self.scores[self.steps.index(step)])

    def final_top(self) -> HeadRef:
        """The top head at the last step."""
        return self.at(self.steps[-1]).top(1, order=self.order)[0][0]

    def rank_over_steps(self, head: HeadRef | str | None = None) -> dict[int, int]:
        """``head``'s rank (1 = first) at every step; default the last step's top head."""
        head = self.final_top() if head is None else head
        return {step: self.at(step).rank(head, order=self.order) for step in self.steps}

    def first_step_ranked_first(self, head: HeadRef | str | None = None) -> int | None:
        """The first step from which ``head`` ranks first at every later step (``None``: it is
        not first at the last step)."""
        ranks = list(self.rank_over_steps(head).items())
        first = None
        for step, rank in reversed(ranks):
            if rank != 1:
                break
            first = step
        return first

    def answer(self, timeline: MemorizationTimeline) -> str:
        """Did the last step's top head rank first before the paragraphs became memorized?"""
        head = self.final_top()
        since = self.first_step_ranked_first(head)
        memorized = [s for s in timeline.first_memorized_step().values() if s is not None]
        n_heads = self.scores[0].numel()
        ranks = ", ".join(f"{step}: {rank}" for step, rank in self.rank_over_steps(head).items())
        line = (
            f"{head} is the top head by {self.analysis} at the last step (step {self.steps[-1]}, "
            f"n = {self.n_paragraphs} paragraphs); its rank of {n_heads} at each step: {ranks}. "
        )
        if not memorized:
            return line + "No paragraph of the timeline is memorized at any step."
        assert since is not None  # the last step's top head ranks first at the last step
        before = sum(step > since for step in memorized)
        return line + (
            f"It ranks first from step {since} on; {before} of the {len(memorized)} paragraphs "
            f"memorized at some step became memorized after that step (first memorized: steps "
            f"{min(memorized)} to {max(memorized)}): "
            + (
                "the head was in place before they were memorized."
                if before == len(memorized)
                else "the head was not in place before all of them were memorized."
            )
            + " (Point estimates at checkpoint resolution: a paragraph first memorized at the "
            "step the head first ranks first counts as not after it.)"
        )

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per step and head (step, head, score, rank)."""
        rows = []
        for step in self.steps:
            scores = self.at(step)
            for rank, (head, score) in enumerate(
                scores.top(scores.scores.numel(), order=self.order), 1
            ):
                rows.append({"step": step, "head": str(head), "score": score, "rank": rank})
        return pd.DataFrame(rows)

    def figure(self, k: int = 5) -> Any:
        """The score vs step of the last step's top ``k`` heads."""
        return render(self, k=k)

    def __repr__(self) -> str:
        return (
            f"HeadTimeline({self.analysis} over {len(self.steps)} steps of {self.name}: top at "
            f"the end {self.final_top()}, first from step {self.first_step_ranked_first()})"
        )


def localize_over_checkpoints(
    series: CheckpointSeries,
    paragraphs: Paragraphs,
    *,
    analysis: str | Callable[[HookedModel], HeadScores] = "rare_tokens",
    corpus_counts: Int[Tensor, " d_vocab"] | None = None,
    source: Paragraphs | None = None,
    keep: Paragraphs | None = None,
    order: Order | None = None,
    progress: bool = True,
) -> HeadTimeline:
    """Run one head analysis of ``paragraphs`` at every checkpoint (one model at a time).

    Args:
        series: the checkpoints.
        paragraphs: the paragraphs analyzed at every step (e.g. those memorized at the end).
        analysis: a name of :func:`analyses` (``"rare_tokens"``, ``"patching"``,
            ``"zero_ablation"``, ``"attribution"``, ...) or a function ``model -> HeadScores``
            (then give ``order``).
        corpus_counts: unigram counts, for ``"rare_tokens"``.
        source: for ``"patching"``: paragraphs row-aligned with ``paragraphs`` whose head
            outputs are patched in (e.g. the perturbed prefixes found on the final model, so
            that every step is patched with the same inputs).
        keep: for ``"activation"`` and ``"learned"``: paragraphs whose recall must not depend
            on the head (e.g. non-memorized ones).
        order: which end of a custom analysis' score ranks first.
        progress: show a progress bar over the checkpoints.
    """
    _check_inputs(series, paragraphs)
    if callable(analysis):
        if order not in ("largest", "smallest"):
            raise ValueError("a custom analysis needs order='largest' or order='smallest'")
        run, name, chosen = analysis, getattr(analysis, "__name__", "custom analysis"), order
    elif isinstance(analysis, str) and analysis in (named := analyses()):
        _check_named_inputs(analysis, paragraphs, corpus_counts, source, keep)
        run, name, chosen = (
            _named_analysis(analysis, paragraphs, corpus_counts, source, keep),
            analysis,
            named[analysis],
        )
    else:
        raise ValueError(
            f"analysis must be one of {sorted(analyses())} or a function model -> HeadScores, "
            f"got {analysis!r}"
        )
    scores, named = [], ""
    for checkpoint in tqdm(series, desc=f"{name} per checkpoint", disable=not progress):
        model = _load_for(checkpoint, paragraphs)
        result = run(model)
        if not isinstance(result, HeadScores):
            raise TypeError(f"the analysis must return HeadScores, got {type(result).__name__}")
        scores.append(result.scores.detach().float().cpu())
        named = result.name
        del model, result  # released before the next checkpoint is loaded
    shapes = {tuple(s.shape) for s in scores}
    if len(shapes) > 1:
        raise ValueError(f"the checkpoints have different head layouts: {sorted(shapes)}")
    return HeadTimeline(
        name=series.name,
        analysis=name,
        order=chosen,
        steps=series.steps,
        scores=torch.stack(scores),
        n_paragraphs=len(paragraphs),
        score=named,
    )


def _check_inputs(series: Any, paragraphs: Any) -> None:
    """A series and non-empty paragraphs, or a clear error (before any checkpoint loads)."""
    if not isinstance(series, CheckpointSeries):
        raise TypeError(f"series must be a CheckpointSeries, got {type(series).__name__}")
    if not isinstance(paragraphs, Paragraphs):
        raise TypeError(f"paragraphs must be Paragraphs, got {type(paragraphs).__name__}")
    if len(paragraphs) == 0:
        raise ValueError("paragraphs holds no paragraphs")


def check_fits(series: CheckpointSeries, paragraphs: Paragraphs) -> None:
    """Load the first checkpoint and check that ``paragraphs`` were tokenized for it, so that a
    study which reaches the series only after minutes of other work fails at once instead."""
    _check_inputs(series, paragraphs)
    model = _load_for(series.checkpoints[0], paragraphs)
    del model


def _load_for(checkpoint: Checkpoint, paragraphs: Paragraphs) -> HookedModel:
    """Load ``checkpoint`` and check that ``paragraphs`` were tokenized for it."""
    model = checkpoint.load()
    try:
        paragraphs.check_model(model)
    except ValueError as error:
        raise ValueError(
            f"checkpoint at step {checkpoint.step} ({checkpoint.source}): {error}"
        ) from None
    return model


def _check_named_inputs(
    analysis: str,
    paragraphs: Paragraphs,
    corpus_counts: Tensor | None,
    source: Paragraphs | None,
    keep: Paragraphs | None,
) -> None:
    """What a named analysis needs, checked before any checkpoint loads."""
    if analysis == "rare_tokens" and corpus_counts is None:
        raise ValueError("analysis='rare_tokens' needs corpus_counts (corpus unigram counts)")
    if analysis == "patching":
        if not isinstance(source, Paragraphs):
            raise ValueError(
                "analysis='patching' needs source: paragraphs row-aligned with paragraphs whose "
                "head outputs are patched in (e.g. perturb_prefixes(final_model, ...).perturbed)"
            )
        if source.tokens.shape != paragraphs.tokens.shape or (
            source.prefix_len != paragraphs.prefix_len
        ):
            raise ValueError(
                f"source must be row-aligned with paragraphs: tokens {tuple(source.tokens.shape)}"
                f" (prefix {source.prefix_len}) vs {tuple(paragraphs.tokens.shape)} (prefix "
                f"{paragraphs.prefix_len})"
            )
    elif source is not None:
        raise ValueError(f"source goes with analysis='patching', not {analysis!r}")
    if needs_keep(analysis):
        if not isinstance(keep, Paragraphs) or not len(keep):
            raise ValueError(
                f"analysis={analysis!r} needs keep: paragraphs whose recall must not depend on "
                "the head (e.g. non-memorized ones)"
            )
    elif keep is not None:
        reading = [m for m in head_localizers() if needs_keep(m)]
        raise ValueError(f"keep goes with analysis in {reading}, not {analysis!r}")


def _named_analysis(
    analysis: str,
    paragraphs: Paragraphs,
    corpus_counts: Tensor | None,
    source: Paragraphs | None,
    keep: Paragraphs | None,
) -> Callable[[HookedModel], HeadScores]:
    if analysis == "rare_tokens":
        assert corpus_counts is not None
        return lambda model: (
            rare_token_attention(model, paragraphs, corpus_counts, progress=False).pooled_tau_mean
        )
    if analysis == "patching":
        return lambda model: (
            patching_sweep(model, paragraphs, source, progress=False).mean_delta_nll
        )
    return lambda model: localize(
        model,
        paragraphs,
        method=analysis,  # type: ignore[arg-type]  # one of head_localizers(), checked
        level="heads",
        keep=keep,
    ).head_scores()


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
    _check_inputs(series, paragraphs)
    if method not in (known := weight_localizers()):
        raise ValueError(f"method must be one of {list(known)}, got {method!r}")
    check_fraction(fraction, "fraction")
    sizes, shared = [], []
    previous: Tensor | None = None
    for checkpoint in tqdm(series, desc=f"{method} masks per checkpoint", disable=not progress):
        model = _load_for(checkpoint, paragraphs)
        found = localize(model, paragraphs, method=method)  # type: ignore[arg-type]
        mask = found.param_mask(fraction)
        flat = torch.cat([mask.masks[name].flatten().cpu() for name in sorted(mask.masks)])
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


SERIES_FILE = "series.json"
"""What a corpus scan over a series scanned: the series' name, steps and sources."""


def step_directory(out_dir: str | Path, step: int) -> Path:
    """Where :func:`scan_corpus_checkpoints` puts the shards of ``step``."""
    return Path(out_dir) / f"step-{step:06d}"


def scan_corpus_checkpoints(
    series: CheckpointSeries,
    documents: Iterable[Document],
    out_dir: str | Path,
    *,
    config: CorpusConfig | None = None,
    resume: bool = False,
    batch_size: int = 32,
    progress: bool = True,
) -> list[CorpusScanSummary]:
    """The corpus scan of :func:`~memloc_tl.corpus.scan_corpus` at every checkpoint.

    Each step's shards go to their own directory (:func:`step_directory`), with the corpus
    scan's guarantees: atomic shards, ``resume=True`` skips the shards a killed run finished
    (at every step), and under ``torchrun`` every rank reads the stream at every step and scores
    only its own shards. ``out_dir/series.json`` records the series, and a resume with another
    series is refused. One checkpoint model is in memory at a time.

    Args:
        series: the checkpoints.
        documents: the stream, read once per checkpoint, so it must be re-iterable: a list,
            or the ``DocumentStream`` of ``documents_from_files``, ``..._from_dataset`` or
            ``..._from_token_file`` (not ``documents_from_texts``, a generator). A stream that
            gives another number of documents at a later step is an error.
        out_dir: the output directory (created).
        config: windows, lengths, shard size and limit (the same at every step).
        resume: finish an interrupted scan of the same series and input.
        batch_size: windows per forward pass.
        progress: progress bars.

    Returns:
        This process's summary at each step. :func:`corpus_timeline` gives the timeline.
    """
    if not isinstance(series, CheckpointSeries):
        raise TypeError(f"series must be a CheckpointSeries, got {type(series).__name__}")
    if isinstance(documents, Iterator):
        raise TypeError(
            "documents must be re-iterable: a corpus scan over a series reads them once per "
            "checkpoint, and an iterator is spent after the first; pass a documents_from_* "
            "stream or a list"
        )
    config = check_config(config, CorpusConfig)
    check_positive_int(batch_size, "batch_size")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    description = {
        "name": series.name,
        "steps": list(series.steps),
        "sources": [c.source for c in series],
    }
    if Placement.current().rank == 0:
        _check_series_file(out, description, resume)
    barrier()  # the others start once series.json is checked or written
    summaries = []
    for checkpoint in tqdm(series, desc="checkpoints", disable=not progress):
        model = checkpoint.load()
        summaries.append(
            scan_corpus(
                model,
                documents,
                step_directory(out, checkpoint.step),
                config=config,
                resume=resume,
                batch_size=batch_size,
                progress=progress,
            )
        )
        del model  # released before the next checkpoint is loaded
        if summaries[-1].documents != summaries[0].documents:
            raise ValueError(
                f"the stream gave {summaries[-1].documents} documents at step {checkpoint.step} "
                f"but {summaries[0].documents} at step {series.steps[0]}: it is not re-iterable "
                "(a generator inside?) or changed; every step must scan the same documents"
            )
    return summaries


def _check_series_file(out: Path, description: dict[str, Any], resume: bool) -> None:
    path = out / SERIES_FILE
    if not path.is_file():
        atomic_write_text(path, json.dumps(description, indent=1))
        return
    found = read_json(path, fix="remove the output directory and scan again")
    if found != description:
        raise ValueError(
            f"{out} holds a scan of another series ({found}); this one is {description}. "
            "Resuming would mix two series in one timeline: use another output directory"
        )
    if not resume:
        raise FileExistsError(
            f"{out} already holds a scan of this series: pass resume=True (--resume) to finish "
            "it, or choose another output directory"
        )


def read_corpus_series(out_dir: str | Path) -> pd.DataFrame:
    """Every step's corpus-scan table, one after the other, with a ``step`` column first.

    Raises:
        ValueError: no series was scanned there, or a step is not finished (resume the scan).
    """
    out = Path(out_dir)
    path = out / SERIES_FILE
    if not path.is_file():
        raise ValueError(
            f"{out} holds no corpus scan over a series (no {SERIES_FILE}); "
            "scan_corpus_checkpoints writes one"
        )
    described = read_json(path, fix="remove the output directory and scan again")
    steps = described.get("steps") if isinstance(described, dict) else None
    if not isinstance(steps, list) or not all(isinstance(s, int) for s in steps):
        raise CorruptFileError(f"{path} does not list the steps; scan again")
    tables = []
    for step in steps:
        directory = step_directory(out, step)
        try:
            table = read_corpus_scan(directory)
        except ValueError as error:
            raise ValueError(f"step {step}: {error}") from None
        table.insert(0, "step", step)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def corpus_timeline(out_dir: str | Path) -> MemorizationTimeline:
    """The :class:`MemorizationTimeline` of a finished :func:`scan_corpus_checkpoints` (one
    paragraph per window)."""
    out = Path(out_dir)
    table = read_corpus_series(out)
    described = read_json(out / SERIES_FILE, fix="remove the output directory and scan again")
    steps = tuple(described["steps"])
    per_step = [table[table["step"] == step] for step in steps]
    ids = per_step[0]["id"].tolist()
    for step, rows in zip(steps, per_step, strict=True):
        if rows["id"].tolist() != ids:
            raise ValueError(
                f"step {step} scanned other windows than step {steps[0]}: the steps of {out} "
                "were not scanned from one input"
            )
    shape = (len(steps), len(ids))
    first_step = json.loads((step_directory(out, steps[0]) / SCAN_FILE).read_text("utf-8"))
    return MemorizationTimeline(
        name=str(described.get("name", out)),
        steps=steps,
        ids=tuple(ids),
        # the table holds the steps one after the other, each with the same windows (checked)
        exact_match=torch.tensor(table["exact_match"].to_numpy(dtype="int64")).view(shape),
        nll=torch.tensor(table["nll"].to_numpy(dtype="float32")).view(shape),
        continuation_len=int(first_step["config"]["continuation_len"]),
    )


@dataclass(frozen=True)
class TrainingDynamics(Drawable):
    """When paragraphs became memorized, and how the top heads evolved: what the report's
    "over training" section and ``memloc demo`` show (:func:`training_dynamics`).

    Attributes:
        timeline: EM and NLL of every paragraph at every step.
        heads: head analyses of the memorized paragraphs at every step (rare-token
            attention; patching too when a source was given).
    """

    timeline: MemorizationTimeline
    heads: tuple[HeadTimeline, ...]

    def findings(self) -> list[str]:
        """One line on when the paragraphs became memorized, then one per head analysis."""
        first = self.timeline.first_memorized_step()
        reached = [step for step in first.values() if step is not None]
        n = len(first)
        if not reached:
            lines = [
                f"None of the {n} paragraphs is memorized at any of the "
                f"{len(self.timeline.steps)} checkpoints."
            ]
        else:
            counts = ", ".join(
                f"step {step}: {sum(s == step for s in reached)}" for step in sorted(set(reached))
            )
            forgotten = self.timeline.forgetting_events()
            lines = [
                f"{len(reached)} of {n} paragraphs are memorized at some checkpoint (steps "
                f"{', '.join(map(str, self.timeline.steps))}); first memorized at {counts}; "
                + (
                    f"{len(forgotten)} forgetting events (first: {forgotten[0][0]} at step "
                    f"{forgotten[0][1]})."
                    if forgotten
                    else "none is forgotten once memorized."
                )
            ]
        return lines + [heads.answer(self.timeline) for heads in self.heads]

    def to_frame(self) -> pd.DataFrame:
        """The timeline in long format (step, id, exact_match, nll, memorized)."""
        return self.timeline.to_frame()

    def figure(self) -> Any:
        """Paragraphs x steps, EM as color (the timeline's heatmap)."""
        return self.timeline.heatmap()

    def __repr__(self) -> str:
        analyses = ", ".join(h.analysis for h in self.heads)
        return f"TrainingDynamics({self.timeline!r}; heads by {analyses})"


def training_dynamics(
    series: CheckpointSeries,
    memorized: Paragraphs,
    corpus_counts: Int[Tensor, " d_vocab"],
    *,
    others: Paragraphs | None = None,
    source: Paragraphs | None = None,
    progress: bool = True,
) -> TrainingDynamics:
    """The timeline of ``memorized`` (and ``others``), and the rare-token heads (and, with
    ``source``, the patching sweep) of ``memorized``, at every step.

    Args:
        series: the checkpoints.
        memorized: the paragraphs whose heads are followed (e.g. those the final model
            memorized).
        corpus_counts: unigram counts for the rare-token analysis.
        others: more paragraphs for the timeline (e.g. non-memorized ones).
        source: paragraphs row-aligned with ``memorized`` to patch from (e.g.
            ``perturb_prefixes(final_model, memorized).perturbed``): then the patching sweep
            from them runs at every step too, with the same inputs at every step.
        progress: progress bars.
    """
    _check_inputs(series, memorized)
    if source is not None:
        _check_named_inputs("patching", memorized, corpus_counts, source, None)
    followed = memorized if others is None else Paragraphs.concat(memorized, others)
    timeline = scan_checkpoints(series, followed, progress=progress)
    heads = [
        localize_over_checkpoints(series, memorized, corpus_counts=corpus_counts, progress=progress)
    ]
    if source is not None:
        heads.append(
            localize_over_checkpoints(
                series, memorized, analysis="patching", source=source, progress=progress
            )
        )
    return TrainingDynamics(timeline, tuple(heads))
