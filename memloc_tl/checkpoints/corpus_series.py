"""A corpus scanned at every checkpoint, one resumable shard directory per step."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from memloc_tl.checkpoints.series import (
    CheckpointSeries,
)
from memloc_tl.checkpoints.timeline import (
    MemorizationTimeline,
)
from memloc_tl.core.files import CorruptFileError, atomic_write_text, read_json
from memloc_tl.core.validation import check_config, check_positive_int
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
