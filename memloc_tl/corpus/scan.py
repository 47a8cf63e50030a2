"""The corpus scan itself: windows cut from a stream of documents, scored in resumable
Parquet shards, one shard per ``docs_per_shard`` documents, assigned to processes by rank
(see :mod:`memloc_tl.corpus`)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.core.backend import HookedModel, weights_fingerprint
from memloc_tl.core.files import (
    CorruptFileError,
    atomic_write,
    atomic_write_text,
    read_json,
)
from memloc_tl.core.forward import greedy_continuations
from memloc_tl.core.paragraphs import (
    Paragraphs,
    window_starts,
)
from memloc_tl.core.precision import DTYPES as PRECISIONS
from memloc_tl.core.precision import Precision
from memloc_tl.core.validation import check_choice, check_config, check_positive_int
from memloc_tl.corpus.documents import Document
from memloc_tl.corpus.placement import Placement, barrier
from memloc_tl.memorization import scan_memorization

logger = logging.getLogger(__name__)

Windows = Literal["first", "all", "strided"]
SCAN_FILE = "scan.json"
COLUMNS = (
    "id",
    "document",
    "start",
    "exact_match",
    "nll",
    "teacher_forced_match",
    "memorized",
)
"""The columns of a corpus scan, in order (plus ``memorization_score`` with
``CorpusConfig(free_running=True)``)."""
FREE_RUNNING = "memorization_score"
"""Pythia's memorization score (Biderman et al. 2023): the share of continuation tokens that
free-running greedy decoding from the prefix reproduces."""
NEAR_FLIP = "near_flip"
"""With a reduced ``CorpusConfig.dtype``: the window had a decision margin near a flip and was
scored again in float32."""


@dataclass(frozen=True)
class CorpusConfig:
    """What a corpus scan cuts and scores (stored in ``scan.json``; a resume must match it).

    Attributes:
        prefix_len: prefix tokens (50 in the paper, 32 in Pythia's evaluation).
        continuation_len: continuation tokens (50, or 32).
        windows: ``"first"`` (one window per document), ``"all"`` (every non-overlapping
            window) or ``"strided"`` (windows starting every ``stride`` tokens).
        stride: the step of ``"strided"`` windows.
        docs_per_shard: documents per output shard (the unit of work and of resuming).
        limit: read at most this many documents (None: all).
        free_running: also compute Pythia's ``memorization_score`` (share of the continuation
            that greedy *generation* reproduces; generated only for windows with EM below the
            continuation length, the others score 1 without a second pass).
        dtype: ``"float32"`` (default), or ``"bfloat16"`` / ``"float16"``: the matrix products
            in that precision, and the windows near a flip scored again in float32, so the EM
            column equals float32's (:mod:`memloc_tl.core.precision`); adds the ``near_flip``
            column.
    """

    prefix_len: int = 50
    continuation_len: int = 50
    windows: Windows = "first"
    stride: int | None = None
    docs_per_shard: int = 1000
    limit: int | None = None
    free_running: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_choice(self.dtype, "dtype", tuple(PRECISIONS))
        check_positive_int(self.prefix_len, "prefix_len")
        check_positive_int(self.continuation_len, "continuation_len")
        check_choice(self.windows, "windows", ("first", "all", "strided"))
        check_positive_int(self.docs_per_shard, "docs_per_shard")
        if self.limit is not None:
            check_positive_int(self.limit, "limit")
        if (self.windows == "strided") != (self.stride is not None):
            raise ValueError("stride goes with windows='strided' (and only with it)")
        if self.stride is not None:
            check_positive_int(self.stride, "stride")
        if not isinstance(self.free_running, bool):
            raise TypeError(f"free_running must be a bool, got {self.free_running!r}")

    @property
    def length(self) -> int:
        return self.prefix_len + self.continuation_len

    @property
    def columns(self) -> tuple[str, ...]:
        """The table's columns, in order."""
        extra = (FREE_RUNNING,) * self.free_running + (NEAR_FLIP,) * (self.dtype != "float32")
        return (*COLUMNS, *extra)

    @property
    def precision(self) -> Precision | None:
        """The reduced precision of the scan (``None``: float32)."""
        return None if self.dtype == "float32" else Precision(self.dtype)


def _shard_path(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:06d}.parquet"


def _marker_path(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:06d}.json"


def _verified(out: Path, shard: int) -> tuple[bytes, dict[str, Any]] | None:
    """The shard file's bytes and its marker, if the marker exists and matches the bytes (a
    resume skips the shard then)."""
    marker, data = _marker_path(out, shard), _shard_path(out, shard)
    if not marker.is_file() or not data.is_file():
        return None
    recorded = _marker(out, shard)
    if recorded is None:
        return None
    content = data.read_bytes()
    if hashlib.sha256(content).hexdigest() != recorded["sha256"]:
        return None
    return content, recorded


def _marker(out: Path, shard: int) -> dict[str, Any] | None:
    """A shard's marker if it is a readable one (a damaged marker means: score it again)."""
    try:
        recorded = read_json(_marker_path(out, shard), fix="")
    except (CorruptFileError, OSError):
        return None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        return None
    return recorded


def _input_sha256(documents: Sequence[Document]) -> str:
    """A hash of a shard's input: every document's id and token ids, in order."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.id.encode("utf-8", "surrogatepass") + b"\0")
        tokens = np.ascontiguousarray(document.tokens, dtype=np.int64)
        digest.update(len(tokens).to_bytes(8, "little") + tokens.tobytes())
    return digest.hexdigest()


def _windows(document: Document, config: CorpusConfig) -> list[int]:
    return list(window_starts(len(document.tokens), config.length, config.windows, config.stride))


def _score_shard(
    model: HookedModel,
    documents: list[Document],
    config: CorpusConfig,
    batch_size: int,
) -> pd.DataFrame:
    rows: list[tuple[str, str, int]] = []
    windows: list[np.ndarray] = []
    for document in documents:
        for k, start in enumerate(_windows(document, config)):
            window_id = document.id if config.windows == "first" else f"{document.id}:{k}"
            rows.append((window_id, document.id, start))
            windows.append(document.tokens[start : start + config.length])
    if not windows:  # no document long enough: an empty shard with the columns' dtypes
        return empty_table(config)
    tokens = torch.from_numpy(np.stack(windows)).long()
    paragraphs = Paragraphs.from_tokens(
        tokens, prefix_len=config.prefix_len, vocab_size=model.cfg.d_vocab
    )
    scan = scan_memorization(
        model, paragraphs, batch_size=batch_size, precision=config.precision, progress=False
    )
    frame = pd.DataFrame(rows, columns=pd.Index(["id", "document", "start"]))
    frame["exact_match"] = scan.exact_match.numpy()
    frame["nll"] = scan.nll.numpy()
    frame["teacher_forced_match"] = scan.greedy_match.float().mean(-1).numpy()
    frame["memorized"] = frame["exact_match"] == config.continuation_len
    if scan.near_flip is not None:
        frame[NEAR_FLIP] = scan.near_flip.numpy()
    if config.free_running:
        frame[FREE_RUNNING] = free_running_scores(
            model, tokens, scan.exact_match, config.prefix_len, batch_size
        ).numpy()
    return frame.loc[:, list(config.columns)].astype(dtypes(config))


def free_running_scores(
    model: HookedModel,
    tokens: Tensor,
    exact_match: Tensor,
    prefix_len: int,
    batch_size: int,
) -> Tensor:
    """Pythia's memorization score: the share of the continuation greedy decoding reproduces.

    Up to the first mismatch decoding sees the true text, so a window with EM equal to the
    continuation length scores 1 without generating; only the others are decoded.
    """
    continuation = tokens[:, prefix_len:]
    scores = torch.ones(len(tokens), dtype=torch.float32)
    rows = (exact_match < continuation.shape[1]).nonzero().flatten()
    if len(rows):
        generated = greedy_continuations(
            model, tokens[rows, :prefix_len], continuation.shape[1], batch_size=batch_size
        )
        scores[rows] = (generated == continuation[rows]).float().mean(-1)
    return scores


DTYPES = {
    "id": "object",
    "document": "object",
    "start": "int64",
    "exact_match": "int64",
    "nll": "float32",
    "teacher_forced_match": "float32",
    "memorized": "bool",
    FREE_RUNNING: "float32",
    NEAR_FLIP: "bool",
}
"""The dtype of each column; an empty shard and an empty scan have them too."""


def dtypes(config: CorpusConfig) -> dict[str, str]:
    """The dtype of each of ``config``'s columns."""
    return {name: DTYPES[name] for name in config.columns}


def empty_table(config: CorpusConfig | None = None) -> pd.DataFrame:
    """A corpus-scan table with no rows and every column's dtype."""
    columns = (config or CorpusConfig()).columns
    return pd.DataFrame({name: pd.Series(dtype=DTYPES[name]) for name in columns})


def _write_shard(out: Path, shard: int, frame: pd.DataFrame, documents: int, inputs: str) -> None:
    content = frame.to_parquet(index=False)  # hashed as written: the file is not read back
    assert content is not None
    atomic_write(_shard_path(out, shard), lambda path: path.write_bytes(content))
    marker = {
        "shard": shard,
        "rows": len(frame),
        "documents": documents,
        "sha256": hashlib.sha256(content).hexdigest(),
        "input_sha256": inputs,
    }
    atomic_write_text(_marker_path(out, shard), json.dumps(marker))


def _check_scan_file(out: Path, description: dict[str, Any], resume: bool, rank: int) -> None:
    """Rank 0 writes scan.json; a resume (or another rank) must find the same description."""
    path = out / SCAN_FILE
    if path.is_file():
        found = read_json(path, fix="remove the output directory and scan again")
        if found != description:
            differ = (
                sorted(k for k in {*found, *description} if found.get(k) != description.get(k))
                if isinstance(found, dict)
                else ["everything"]
            )
            details = "; ".join(
                f"{key}: the scan there has {found.get(key) if isinstance(found, dict) else found}"
                f", this one {description.get(key)}"
                for key in differ
            )
            raise ValueError(
                f"{out} holds a scan of another {' and '.join(differ)} ({details}); resuming "
                "would mix the two in one table: use another --out-dir, or resume with the "
                "same model, input and settings"
            )
        if not resume and rank == 0:
            raise FileExistsError(
                f"{out} already holds a scan: pass resume=True (--resume) to finish it, or "
                "choose another output directory"
            )
    elif rank == 0:
        atomic_write_text(path, json.dumps(description, indent=1))


def _check_shard_input(out: Path, shard: int, marker: dict[str, Any], inputs: str) -> None:
    """A finished shard is skipped only if it was scored from the very same documents."""
    found = marker.get("input_sha256")
    if found != inputs:
        raise ValueError(
            f"{_shard_path(out, shard).name} in {out} was scored from other documents than this "
            f"stream's shard {shard} (input hash {found} there, {inputs} here): another corpus, "
            "or the same one changed or reordered; scan into another --out-dir"
        )


@dataclass(frozen=True)
class CorpusScanSummary:
    """What one process did: shards scored, skipped (already finished), windows, seconds."""

    rank: int
    world_size: int
    shards_scored: int
    shards_skipped: int
    windows: int
    documents: int
    n_shards: int
    seconds: float


def scan_corpus(
    model: HookedModel,
    documents: Iterable[Document],
    out_dir: str | os.PathLike[str],
    *,
    config: CorpusConfig | None = None,
    resume: bool = False,
    batch_size: int = 32,
    progress: bool = True,
) -> CorpusScanSummary:
    """Scan a stream of documents into Parquet shards under ``out_dir`` (see the module docs).

    Call it in every process of a torchrun launch (after :func:`init_distributed`) or in one
    process; then :func:`read_corpus_scan` gives the table.

    Args:
        model: the model (not changed).
        documents: the stream (``documents_from_dataset``, ``..._from_files``,
            ``..._from_token_file``, ``..._from_texts``); every process must see the same one.
        out_dir: the output directory (created).
        config: windows, lengths, shard size and limit.
        resume: skip shards finished by an earlier run with the same settings; without it an
            existing scan in ``out_dir`` is an error.
        batch_size: windows per forward pass (on a CPU at most 3,200 tokens' worth and 32 MiB
            of the largest activation, see :func:`memloc_tl.memorization.scan_memorization`).
        progress: a progress bar per process (documents read).

    Returns:
        This process's summary.
    """
    config = check_config(config, CorpusConfig)
    check_positive_int(batch_size, "batch_size")
    if config.length > model.cfg.n_ctx:
        raise ValueError(
            f"windows of {config.length} tokens exceed the model's context of {model.cfg.n_ctx}"
        )
    placement = Placement.current()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    description = {
        "config": asdict(config),
        "model": {"name": str(model.cfg.model_name), "weights_sha256": weights_fingerprint(model)},
        "input": getattr(documents, "fingerprint", None),
    }
    if placement.rank == 0:  # first: it writes scan.json, which the others then check
        _check_scan_file(out, description, resume, rank=0)
    barrier()
    if placement.rank != 0:
        _check_scan_file(out, description, resume, placement.rank)
    started = time.perf_counter()
    scored = skipped = windows = n_documents = 0
    stream = itertools.islice(documents, config.limit)
    bar = tqdm(desc=f"scan (rank {placement.rank})", unit="doc", disable=not progress)
    shard = 0
    seen: dict[str, int] = {}  # document id -> its position in the stream
    try:
        while True:
            batch = list(itertools.islice(stream, config.docs_per_shard))
            if not batch:
                break
            for position, document in enumerate(batch, start=n_documents):
                first = seen.setdefault(document.id, position)
                if first != position:
                    raise ValueError(
                        f"documents {first} and {position} of the stream share the id "
                        f"{document.id!r}: window ids would collide in the table; give every "
                        "document its own id (id_column, --id-column) or none (ids by position)"
                    )
            n_documents += len(batch)
            bar.update(len(batch))
            if placement.owns(shard):
                inputs = _input_sha256(batch)
                finished = _verified(out, shard) if resume else None
                if finished is not None:
                    _check_shard_input(out, shard, finished[1], inputs)
                    skipped += 1
                else:
                    frame = _score_shard(model, batch, config, batch_size)
                    _write_shard(out, shard, frame, len(batch), inputs)
                    scored += 1
                    windows += len(frame)
            shard += 1
    finally:
        bar.close()  # before any error is printed, so it does not share the bar's line
    if placement.rank == 0:  # the stream's length, for the merge to check completeness
        atomic_write_text(
            out / "complete.json", json.dumps({"n_shards": shard, "documents": n_documents})
        )
    seconds = time.perf_counter() - started  # before the final wait for the other ranks
    barrier()
    summary = CorpusScanSummary(
        placement.rank, placement.world_size, scored, skipped, windows, n_documents, shard, seconds
    )
    logger.debug("corpus scan: %s", summary)
    return summary


def read_corpus_scan(out_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The whole scan as one table, in stream order (shard by shard).

    Raises:
        ValueError: the scan is not complete (a shard is missing or does not match its marker):
            run it again with resume to finish it.
    """
    out = Path(out_dir)
    fix = "run the scan again with --resume to finish it"
    complete = out / "complete.json"
    if not complete.is_file():
        raise ValueError(f"{out} holds no finished scan (no complete.json); {fix}")
    finished = read_json(complete, fix=fix)
    if not isinstance(finished, dict) or not isinstance(finished.get("n_shards"), int):
        raise CorruptFileError(f"{complete} does not say how many shards there are; {fix}")
    n_shards = finished["n_shards"]
    shards = [_verified(out, k) for k in range(n_shards)]  # each file read once
    unfinished = [k for k, finished in enumerate(shards) if finished is None]
    if unfinished:
        raise ValueError(
            f"{len(unfinished)} of {n_shards} shards are missing or damaged (first: "
            f"{_shard_path(out, unfinished[0]).name}); {fix}"
        )
    described = read_json(out / SCAN_FILE, fix=fix) if (out / SCAN_FILE).is_file() else {}
    config = CorpusConfig(**described.get("config", {})) if isinstance(described, dict) else None
    tables = [pd.read_parquet(io.BytesIO(done[0])) for done in shards if done is not None]
    tables = [table for table in tables if len(table)]
    if not tables:
        return empty_table(config)
    return pd.concat(tables, ignore_index=True).astype(dtypes(config or CorpusConfig()))
