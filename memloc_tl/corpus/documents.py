"""The documents of a corpus scan: streams that reopen their source at every pass.

A :class:`DocumentStream` yields :class:`Document` values (an id and token ids) from texts,
a Hugging Face dataset (also streaming), text files or pre-tokenized token files, with a
fingerprint of the source that a resumed scan compares with the scan it continues.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memloc_tl.core.paragraphs import (
    as_tokenizer,
    encode_texts,
    file_format,
    read_text_file,
)
from memloc_tl.core.validation import check_choice, check_positive_int


@dataclass(frozen=True)
class Document:
    """One document of a corpus: its id and its token ids (text already tokenized)."""

    id: str
    tokens: np.ndarray


@dataclass(frozen=True)
class DocumentStream:
    """Documents, and a fingerprint of where they come from (recorded by a corpus scan).

    Iterate it like any stream of :class:`Document`, as often as needed: every iteration reads
    the source again from its start (``read`` opens it), so a scan over a series of
    checkpoints reads the same documents at every step. ``fingerprint`` is what a resumed scan
    compares with the scan it continues: files by resolved path, size, modification time and
    a hash of their first and last blocks; datasets by name, configuration, split and their own
    fingerprint; token files by dtype, shape and a hash of their first and last blocks.
    """

    read: Callable[[], Iterable[Document]]
    fingerprint: dict[str, Any]

    def __iter__(self) -> Iterator[Document]:
        return iter(self.read())


FINGERPRINT_BLOCK = 1 << 20
"""Bytes hashed at the start and at the end of each input file (a fingerprint, not a checksum:
the per-shard input hashes of a scan cover every document)."""


def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Resolved path, size, modification time and SHA-256 of the first and last blocks."""
    path = Path(path).resolve()
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        digest.update(file.read(FINGERPRINT_BLOCK))
        if stat.st_size > FINGERPRINT_BLOCK:
            file.seek(max(FINGERPRINT_BLOCK, stat.st_size - FINGERPRINT_BLOCK))
            digest.update(file.read(FINGERPRINT_BLOCK))
    return {
        "path": str(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "head_tail_sha256": digest.hexdigest(),
    }


def _dataset_fingerprint(dataset: Any, split: str | None) -> dict[str, Any]:
    info = getattr(dataset, "info", None)
    return {
        "kind": "dataset",
        "name": getattr(info, "dataset_name", None) or getattr(info, "builder_name", None),
        "config": getattr(info, "config_name", None),
        "split": split if split is not None else str(getattr(dataset, "split", None)),
        "fingerprint": getattr(dataset, "_fingerprint", None),
    }


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
    hf_tokenizer = as_tokenizer(tokenizer)
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
        for doc_id, token_ids in zip(ids, encode_texts(hf_tokenizer, texts_now), strict=True):
            yield Document(doc_id, np.asarray(token_ids, dtype=np.int64))


def documents_from_dataset(
    dataset: Any,
    tokenizer: Any,
    *,
    split: str | None = None,
    text_column: str = "text",
    id_column: str | None = None,
) -> DocumentStream:
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
    return DocumentStream(
        lambda: documents_from_texts(
            dataset, tokenizer, text_column=text_column, id_column=id_column
        ),
        {**_dataset_fingerprint(dataset, split), "text_column": text_column},
    )


def documents_from_files(
    paths: Sequence[str | os.PathLike[str]],
    tokenizer: Any,
    *,
    text_column: str = "text",
    id_column: str | None = None,
) -> DocumentStream:
    """Documents of csv / json / jsonl / parquet files (streamed) or ``.txt`` files (one each)."""
    from datasets import load_dataset

    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("no input files: pass at least one")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"no such file: {missing[0]}")
    fingerprint = {
        "kind": "files",
        "files": [file_fingerprint(f) for f in files],
        "text_column": text_column,
        "id_column": id_column,
    }
    kind = file_format(files)
    if kind == "text":

        def texts() -> Iterator[dict[str, str]]:
            return ({"text": read_text_file(f), "id": f.name} for f in files)

        return DocumentStream(
            lambda: documents_from_texts(texts(), tokenizer, id_column="id"), fingerprint
        )
    empty = [str(f) for f in files if f.stat().st_size == 0]
    if empty:
        raise ValueError(f"{empty[0]} is empty: it holds no documents")
    stream: Any = load_dataset(
        kind, data_files=[str(f) for f in files], split="train", streaming=True
    )
    documents = documents_from_dataset(
        stream, tokenizer, text_column=text_column, id_column=id_column
    )
    return DocumentStream(lambda: _naming_files(documents, files), fingerprint)


PARSER_MODULES = ("pyarrow", "datasets", "fsspec", "pandas", "json")


def _naming_files(documents: Iterable[Document], files: Sequence[Path]) -> Iterator[Document]:
    """The documents; a file that cannot be parsed is an error naming the files."""
    names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    try:
        yield from documents
    except Exception as error:  # datasets' and pyarrow's parser errors, not memloc-tl's own
        if type(error).__module__.split(".")[0] not in PARSER_MODULES:
            raise
        raise ValueError(
            f"cannot read the documents of {names} ({type(error).__name__}: {error}); check "
            "that each file is valid csv / json lines / parquet"
        ) from error


def documents_from_token_file(
    path: str | os.PathLike[str], *, seq_len: int, dtype: str = "uint16"
) -> DocumentStream:
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
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(f"{path} is not a readable .npy array ({error})") from error
        if data.dtype.kind not in "iu":
            raise TypeError(
                f"{path} holds {data.dtype} values; token ids must be integers (uint16, uint32, "
                "int32 or int64): a float array would be truncated"
            )
        if data.ndim not in (1, 2):
            raise ValueError(
                f"{path} holds a {data.ndim}-D array of shape {data.shape}; token files are 1-D "
                "(a flat stream) or 2-D ([rows, seq_len])"
            )
        if data.ndim == 2 and data.shape[1] != seq_len:
            raise ValueError(
                f"{path} holds rows of {data.shape[1]} tokens, not seq_len={seq_len}: pass "
                f"seq_len={data.shape[1]} (--seq-len)"
            )
        if data.ndim == 1:
            if len(data) % seq_len:
                raise ValueError(
                    f"{path} holds {len(data)} tokens, not a multiple of seq_len={seq_len}: wrong "
                    "sequence length, or a truncated file?"
                )
            data = data.reshape(-1, seq_len)
        if data.size and int(data.min()) < 0:
            raise ValueError(f"{path} holds negative token ids (min {int(data.min())})")
        stored = str(data.dtype)
    else:
        flat = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.empty(0)
        if len(flat) % seq_len:
            raise ValueError(
                f"{path} holds {len(flat)} {dtype} tokens, not a multiple of seq_len={seq_len}: "
                "wrong dtype or sequence length?"
            )
        data = flat.reshape(-1, seq_len)
        stored = dtype
    if len(data) == 0:
        raise ValueError(f"{path} holds no tokens")
    fingerprint = {
        "kind": "tokens",
        **file_fingerprint(path),
        "dtype": stored,
        "shape": list(data.shape),
    }

    def rows() -> Iterator[Document]:
        return (
            Document(str(row), np.asarray(data[row], dtype=np.int64)) for row in range(len(data))
        )

    return DocumentStream(rows, fingerprint)
