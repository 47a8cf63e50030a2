"""The series itself: training steps and how to load the model at each, checked before any loads."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memloc_tl.core.backend import HookedModel
from memloc_tl.core.paragraphs import Paragraphs

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


def check_inputs(series: Any, paragraphs: Any) -> None:
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
    check_inputs(series, paragraphs)
    model = load_for(series.checkpoints[0], paragraphs)
    del model


def load_for(checkpoint: Checkpoint, paragraphs: Paragraphs) -> HookedModel:
    """Load ``checkpoint`` and check that ``paragraphs`` were tokenized for it."""
    model = checkpoint.load()
    try:
        paragraphs.check_model(model)
    except ValueError as error:
        raise ValueError(
            f"checkpoint at step {checkpoint.step} ({checkpoint.source}): {error}"
        ) from None
    return model
