"""Memorization scans at corpus scale: streamed windows, resumable Parquet shards, many processes.

:func:`scan_corpus` reads documents one at a time (a Hugging Face dataset, also streaming, text
files, or pre-tokenized token files), cuts prefix + continuation windows, scores them with one
teacher-forced pass (EM until the first mismatch, continuation NLL, and the share of
continuation tokens the model predicts greedily), and writes one Parquet shard per
``docs_per_shard`` documents. The corpus is never held in memory.

- **Shards are assigned by rank**: shard ``k`` (documents ``k*D .. (k+1)*D - 1``) belongs to
  rank ``k % world_size``. Launched under ``torchrun`` (one process per GPU, any number of
  nodes; gloo on the CPU), every rank reads the stream and scores only its own shards.
- **Every shard is written atomically** with its marker ``shard-K.json`` (rows, SHA-256) written
  last; ``resume=True`` skips shards whose marker and file agree, so a killed rank or node loses
  at most the shard it was on.
- :func:`read_corpus_scan` merges the shards in stream order into one table, refusing a scan with
  a missing shard; it equals the single-process scan row for row.

The launching and communication are torch.distributed's (``torchrun``); this module only reads
the rank and world size it sets up, and synchronizes at the start and the end.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from memloc_tl.backend import HookedModel
from memloc_tl.files import (
    CorruptFileError,
    atomic_write,
    atomic_write_text,
    read_json,
)
from memloc_tl.memorization import scan_memorization
from memloc_tl.paragraphs import Paragraphs, _as_tokenizer, _encode, window_starts
from memloc_tl.validation import check_choice, check_positive_int

logger = logging.getLogger(__name__)

Windows = Literal["first", "all", "strided"]
SCAN_FILE = "scan.json"
COLUMNS = (
    "id",
    "document",
    "start",
    "exact_match",
    "nll",
    "memorization_score",
    "memorized",
)
"""The columns of a corpus scan, in order."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus: its id and its token ids (text already tokenized)."""

    id: str
    tokens: np.ndarray


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
    """

    prefix_len: int = 50
    continuation_len: int = 50
    windows: Windows = "first"
    stride: int | None = None
    docs_per_shard: int = 1000
    limit: int | None = None

    def __post_init__(self) -> None:
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

    @property
    def length(self) -> int:
        return self.prefix_len + self.continuation_len


# ----------------------------------------------------------------------------- sources
def documents_from_texts(
    texts: Iterable[str | dict[str, Any]],
    tokenizer: Any,
    *,
    text_column: str = "text",
    id_column: str | None = None,
    batch: int = 64,
) -> Iterator[Document]:
    """Tokenize texts (or rows with a text column) lazily, ``batch`` at a time, no BOS.

    Works with any iterable: a list, a ``datasets.Dataset`` or a streaming ``IterableDataset``.
    Document ids come from ``id_column`` (``"auto"``: a column ``id`` where rows have one), else
    the position in the stream.
    """
    hf_tokenizer = _as_tokenizer(tokenizer)
    rows = iter(texts)
    index = 0
    while chunk := list(itertools.islice(rows, batch)):
        ids, texts_now = [], []
        for row in chunk:
            if isinstance(row, dict):
                if text_column not in row:
                    raise ValueError(
                        f"the rows have no column {text_column!r} (columns: {sorted(row)}); "
                        "pass text_column=..."
                    )
                text = row[text_column]
                column = ("id" if "id" in row else None) if id_column == "auto" else id_column
                ids.append(str(row[column]) if column is not None else str(index))
            else:
                text = row
                ids.append(str(index))
            if not isinstance(text, str):
                raise TypeError(f"document {ids[-1]!r} is {type(text).__name__}, not str")
            texts_now.append(text)
            index += 1
        for doc_id, token_ids in zip(ids, _encode(hf_tokenizer, texts_now), strict=True):
            yield Document(doc_id, np.asarray(token_ids, dtype=np.int64))


def documents_from_dataset(
    dataset: Any,
    tokenizer: Any,
    *,
    split: str | None = None,
    text_column: str = "text",
    id_column: str | None = None,
) -> Iterator[Document]:
    """Documents of a ``datasets`` Dataset, IterableDataset or DatasetDict (with ``split``)."""
    if hasattr(dataset, "keys") and not hasattr(dataset, "column_names"):  # a DatasetDict
        splits = list(dataset.keys())
        if split is None:
            if len(splits) != 1:
                raise ValueError(f"the dataset has the splits {splits}: pass split=...")
            split = splits[0]
        if split not in splits:
            raise ValueError(f"the dataset has no split {split!r} (splits: {splits})")
        dataset = dataset[split]
    columns = list(getattr(dataset, "column_names", None) or [])
    if columns and text_column not in columns:
        raise ValueError(
            f"the dataset has no column {text_column!r} (columns: {columns}); pass text_column=..."
        )
    return documents_from_texts(dataset, tokenizer, text_column=text_column, id_column=id_column)


def documents_from_files(
    paths: Sequence[str | os.PathLike[str]],
    tokenizer: Any,
    *,
    text_column: str = "text",
    id_column: str | None = None,
) -> Iterator[Document]:
    """Documents of csv / json / jsonl / parquet files (streamed) or ``.txt`` files (one each)."""
    from datasets import load_dataset

    files = [Path(p) for p in paths]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"no such file: {missing[0]}")
    if all(f.suffix.lower() in (".txt", ".text") for f in files):
        texts = ({"text": f.read_text(encoding="utf-8"), "id": f.name} for f in files)
        return documents_from_texts(texts, tokenizer, id_column="id")
    kinds = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    formats = {kinds.get(f.suffix.lower(), "") for f in files}
    if len(formats) != 1 or "" in formats:
        raise ValueError(
            f"files must all be one of {sorted(kinds)} (or all .txt), got "
            f"{sorted({f.suffix for f in files})}"
        )
    stream: Any = load_dataset(
        formats.pop(), data_files=[str(f) for f in files], split="train", streaming=True
    )
    return documents_from_dataset(stream, tokenizer, text_column=text_column, id_column=id_column)


def documents_from_token_file(
    path: str | os.PathLike[str], *, seq_len: int, dtype: str = "uint16"
) -> Iterator[Document]:
    """Rows of a flat token file (numpy memmap), ``seq_len`` tokens each: Pythia's Pile layout.

    A ``.npy`` file carries its own dtype and shape (``[rows, seq_len]``); any other file is read
    as raw ``dtype`` (``uint16`` or ``uint32``) values. Nothing is read before it is needed.
    """
    check_choice(dtype, "dtype", ("uint16", "uint32"))
    check_positive_int(seq_len, "seq_len")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such token file: {path}")
    if path.suffix == ".npy":
        data = np.load(path, mmap_mode="r")
        if data.ndim == 1:
            data = data[: len(data) // seq_len * seq_len].reshape(-1, seq_len)
    else:
        flat = np.memmap(path, dtype=dtype, mode="r")
        if len(flat) % seq_len:
            raise ValueError(
                f"{path} holds {len(flat)} {dtype} tokens, not a multiple of seq_len={seq_len}: "
                "wrong dtype or sequence length?"
            )
        data = flat.reshape(-1, seq_len)
    for row in range(len(data)):
        yield Document(str(row), np.asarray(data[row], dtype=np.int64))


# ----------------------------------------------------------------------------- the scan
@dataclass(frozen=True)
class Placement:
    """Which process this is: ``rank`` of ``world_size`` (torchrun's RANK and WORLD_SIZE)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Placement:
        """From torch.distributed if initialized, else from torchrun's environment, else 0 of 1."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    def owns(self, shard: int) -> bool:
        return shard % self.world_size == self.rank


def local_device(device: str | torch.device | None = None) -> torch.device:
    """The device for this process: ``device``, else its own GPU (torchrun's LOCAL_RANK), else CPU.

    A CUDA device without an index gets the process's LOCAL_RANK, so ``--device cuda`` puts each
    of several ranks on its own GPU.

    Raises:
        ValueError: the rank's GPU does not exist (more processes per node than GPUs).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None and not torch.cuda.is_available():
        return torch.device("cpu")
    resolved = torch.device("cuda" if device is None else device)
    if resolved.type != "cuda":
        return resolved
    index = local_rank if resolved.index is None else resolved.index
    resolved = torch.device("cuda", index)
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= available:
        raise ValueError(
            f"this process (LOCAL_RANK {local_rank}) wants {resolved}, but this machine has "
            f"{available} GPU(s); launch at most {max(available, 1)} process(es) per node "
            "(torchrun --nproc_per_node), or scan on the CPU (device='cpu', `--device cpu`)"
        )
    return resolved


def init_distributed(device: str | torch.device | None = None) -> Placement:
    """Join torchrun's process group if launched by torchrun: nccl on a GPU, gloo on the CPU.

    Args:
        device: the device this process scans on (see :func:`local_device`); it decides the
            backend, so a CPU scan on a GPU machine uses gloo.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        resolved = local_device(device)
        if resolved.type != "cuda":
            torch.distributed.init_process_group(backend="gloo")
        else:
            torch.cuda.set_device(resolved)
            # naming the rank's GPU spares nccl guessing it from the rank
            torch.distributed.init_process_group(backend="nccl", device_id=resolved)
    return Placement.current()


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _shard_path(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:06d}.parquet"


def _marker_path(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:06d}.json"


def _verified(out: Path, shard: int) -> bytes | None:
    """The shard file's bytes if its marker exists and matches them (a resume skips it then)."""
    marker, data = _marker_path(out, shard), _shard_path(out, shard)
    if not marker.is_file() or not data.is_file():
        return None
    try:
        expected = read_json(marker, fix="")["sha256"]
    except (CorruptFileError, KeyError):
        return None
    content = data.read_bytes()
    return content if hashlib.sha256(content).hexdigest() == expected else None


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
    tokens = torch.from_numpy(np.stack(windows)) if windows else torch.empty(0, config.length)
    paragraphs = Paragraphs.from_tokens(
        tokens.long(), prefix_len=config.prefix_len, vocab_size=model.cfg.d_vocab
    )
    scan = scan_memorization(model, paragraphs, batch_size=batch_size, progress=False)
    frame = pd.DataFrame(rows, columns=pd.Index(["id", "document", "start"]))
    frame["exact_match"] = scan.exact_match.numpy()
    frame["nll"] = scan.nll.numpy()
    frame["memorization_score"] = scan.greedy_match.float().mean(-1).numpy()
    frame["memorized"] = frame["exact_match"] == config.continuation_len
    return frame.loc[:, list(COLUMNS)]


def _write_shard(out: Path, shard: int, frame: pd.DataFrame, documents: int) -> None:
    content = frame.to_parquet(index=False)  # hashed as written: the file is not read back
    assert content is not None
    atomic_write(_shard_path(out, shard), lambda path: path.write_bytes(content))
    marker = {
        "shard": shard,
        "rows": len(frame),
        "documents": documents,
        "sha256": hashlib.sha256(content).hexdigest(),
    }
    atomic_write_text(_marker_path(out, shard), json.dumps(marker))


def _check_scan_file(out: Path, description: dict[str, Any], resume: bool, rank: int) -> None:
    """Rank 0 writes scan.json; a resume (or another rank) must find the same description."""
    path = out / SCAN_FILE
    if path.is_file():
        found = read_json(path, fix="remove the output directory and scan again")
        if found != description:
            raise ValueError(
                f"{out} holds a scan with other settings ({found}); use another --out-dir, "
                "or the same settings to resume"
            )
        if not resume and rank == 0:
            raise FileExistsError(
                f"{out} already holds a scan: pass resume=True (--resume) to finish it, or "
                "choose another output directory"
            )
    elif rank == 0:
        atomic_write_text(path, json.dumps(description, indent=1))


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
        batch_size: windows per forward pass.
        progress: a progress bar per process (documents read).

    Returns:
        This process's summary.
    """
    config = config or CorpusConfig()
    check_positive_int(batch_size, "batch_size")
    if config.length > model.cfg.n_ctx:
        raise ValueError(
            f"windows of {config.length} tokens exceed the model's context of {model.cfg.n_ctx}"
        )
    placement = Placement.current()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    description = {"config": asdict(config), "model": str(model.cfg.model_name)}
    if placement.rank == 0:  # first: it writes scan.json, which the others then check
        _check_scan_file(out, description, resume, rank=0)
    _barrier()
    if placement.rank != 0:
        _check_scan_file(out, description, resume, placement.rank)
    started = time.perf_counter()
    scored = skipped = windows = n_documents = 0
    stream = itertools.islice(documents, config.limit)
    bar = tqdm(desc=f"scan (rank {placement.rank})", unit="doc", disable=not progress)
    shard = 0
    while True:
        batch = list(itertools.islice(stream, config.docs_per_shard))
        if not batch:
            break
        n_documents += len(batch)
        bar.update(len(batch))
        if placement.owns(shard):
            if resume and _verified(out, shard) is not None:
                skipped += 1
            else:
                frame = _score_shard(model, batch, config, batch_size)
                _write_shard(out, shard, frame, len(batch))
                scored += 1
                windows += len(frame)
        shard += 1
    bar.close()
    if placement.rank == 0:  # the stream's length, for the merge to check completeness
        atomic_write_text(
            out / "complete.json", json.dumps({"n_shards": shard, "documents": n_documents})
        )
    seconds = time.perf_counter() - started  # before the final wait for the other ranks
    _barrier()
    summary = CorpusScanSummary(
        placement.rank, placement.world_size, scored, skipped, windows, n_documents, shard, seconds
    )
    logger.info("corpus scan: %s", summary)
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
    n_shards = int(read_json(complete, fix=fix)["n_shards"])
    shards = [_verified(out, k) for k in range(n_shards)]  # each file read once
    unfinished = [k for k, content in enumerate(shards) if content is None]
    if unfinished:
        raise ValueError(
            f"{len(unfinished)} of {n_shards} shards are missing or damaged (first: "
            f"{_shard_path(out, unfinished[0]).name}); {fix}"
        )
    if n_shards == 0:
        return pd.DataFrame(columns=list(COLUMNS))
    tables = [pd.read_parquet(io.BytesIO(content)) for content in shards if content is not None]
    return pd.concat(tables, ignore_index=True)
