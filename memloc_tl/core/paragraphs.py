"""Paragraphs: fixed-length token windows split into a prefix and a continuation.

A paragraph in the paper (Stoehr et al. 2024, section 3) is a raw 100-token window: a 50-token
prefix ``x_0..x_49`` and a 50-token continuation ``x_50..x_99``. No BOS token is prepended.
This module builds such windows from texts, token tensors, ``datasets`` datasets or local
files, applies the paper's filters (appendix A.1), and counts corpus unigrams for the
rare-token analysis (section 6.3).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.core.backend import check_model
from memloc_tl.core.quiet import quiet_libraries
from memloc_tl.core.validation import check_positive_int

logger = logging.getLogger(__name__)

PREFIX_LEN = 50
CONTINUATION_LEN = 50

PAPER_KEYWORDS: tuple[str, ...] = (
    "TripAdvisor",
    "href",
    "license",
    "copyright",
    "software",
    "manuscript",
    "submission",
    "distribution",
    "disclaimed",
    "limited",
)
"""Keywords whose paragraphs the paper drops (appendix A.1)."""

FILE_FORMATS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}
"""Input files by suffix: rows of a table (a text column), or ``.txt``: one document per file."""
_PARAGRAPH_FORMATS = {s: f for s, f in FILE_FORMATS.items() if f != "parquet"}
"""What :meth:`Paragraphs.from_files` reads (a corpus scan also streams parquet)."""


def file_format(paths: Sequence[str | Path], formats: Mapping[str, str] = FILE_FORMATS) -> str:
    """The one format of ``paths`` (``"csv"``, ``"json"``, ``"parquet"`` or ``"text"``).

    Raises:
        ValueError: an unknown suffix, or files of two formats (checked before any work).
    """
    found = {formats.get(Path(p).suffix.lower(), "") for p in paths}
    if len(found) != 1 or "" in found:
        suffixes = ", ".join(sorted({Path(p).suffix or "(none)" for p in paths}))
        raise ValueError(
            f"input files must all be one of {', '.join(sorted(formats))} (all one kind; "
            f".txt: one document per file), got {suffixes}"
        )
    return found.pop()


def read_text_file(path: Path) -> str:
    """A ``.txt`` input file as one text, or an error naming it if it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"cannot read {path}: it is not UTF-8 text ({error}); re-save it as UTF-8"
        ) from error


def as_tokenizer(tokenizer_or_model: Any) -> Any:
    """Accept a Hugging Face tokenizer or a HookedTransformer (its ``.tokenizer``)."""
    tokenizer = getattr(tokenizer_or_model, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer_or_model, "cfg"):
        return tokenizer
    if not callable(getattr(tokenizer_or_model, "encode", None)):
        raise TypeError(
            "expected a Hugging Face tokenizer or a HookedTransformer with a tokenizer, got "
            f"{type(tokenizer_or_model).__name__}"
        )
    return tokenizer_or_model


def _model_vocab(tokenizer_or_model: Any) -> int | None:
    cfg = getattr(tokenizer_or_model, "cfg", None)
    return int(cfg.d_vocab) if cfg is not None else None


def tokenizer_fingerprint(tokenizer_or_model: Any) -> str:
    """A short hash of a tokenizer's vocabulary, to tell whether two tokenizers agree."""
    vocab = as_tokenizer(tokenizer_or_model).get_vocab()
    blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def window_starts(
    n_tokens: int, length: int, windows: str = "first", stride: int | None = None
) -> range:
    """Start offsets of the windows of ``length`` tokens cut from a text of ``n_tokens``.

    ``"first"``: one window at 0; ``"all"``: every non-overlapping window; ``"strided"``: a
    window every ``stride`` tokens (overlapping when ``stride < length``). None fits a text
    shorter than one window.
    """
    last = n_tokens - length  # the last possible start
    if last < 0:
        return range(0)
    if windows == "first":
        return range(1)
    step = length if windows == "all" else stride
    if step is None or step < 1:
        raise ValueError(f"windows='strided' needs a stride >= 1, got {stride!r}")
    return range(0, last + 1, step)


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, in one call of a Hugging Face tokenizer, no special tokens."""
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


@dataclass(frozen=True)
class Paragraphs:
    """A set of fixed-length token windows, each a prefix followed by a continuation.

    Attributes:
        tokens: the windows, int64 on the CPU.
        ids: one unique id per paragraph.
        prefix_len: prefix length; the continuation is the rest (50 + 50 in the paper).
        meta: per-paragraph columns (each a tuple of ``len(ids)`` values), e.g. repetitions.
        vocab_fingerprint: :func:`tokenizer_fingerprint` of the tokenizer that made the tokens,
            checked against the model's tokenizer by the analyses; ``None`` when unknown.
        n_too_short: texts skipped because they were shorter than one window.
    """

    tokens: Int[Tensor, "n_paragraphs pos"]
    ids: tuple[str, ...]
    prefix_len: int = PREFIX_LEN
    meta: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    vocab_fingerprint: str | None = None
    n_too_short: int = 0

    def __post_init__(self) -> None:
        tokens = self.tokens
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(
                f"tokens must be an integer tensor of token ids, got dtype {tokens.dtype}; "
                "convert with tokens.long()"
            )
        if tokens.ndim != 2:
            raise ValueError(
                f"tokens must have shape [n_paragraphs, pos], got {tuple(tokens.shape)}; "
                "a single paragraph needs tokens[None]"
            )
        if not 0 < self.prefix_len < tokens.shape[1]:
            raise ValueError(
                f"prefix_len={self.prefix_len} must leave a non-empty prefix and continuation "
                f"in windows of {tokens.shape[1]} tokens"
            )
        if tokens.numel() and int(tokens.min()) < 0:
            raise ValueError(f"token ids must be >= 0, found {int(tokens.min())}")
        ids = tuple(str(i) for i in self.ids)
        if len(ids) != tokens.shape[0]:
            raise ValueError(f"got {len(ids)} ids for {tokens.shape[0]} paragraphs")
        if len(set(ids)) != len(ids):
            raise ValueError("paragraph ids must be unique")
        meta = {str(k): tuple(v) for k, v in self.meta.items()}
        for name, column in meta.items():
            if len(column) != len(ids):
                raise ValueError(
                    f"meta column {name!r} has {len(column)} values for {len(ids)} paragraphs"
                )
        object.__setattr__(self, "tokens", tokens.detach().to("cpu", torch.int64).contiguous())
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "meta", meta)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_tokens(
        cls,
        tokens: Tensor | Sequence[Sequence[int]],
        *,
        prefix_len: int = PREFIX_LEN,
        ids: Sequence[str | int] | None = None,
        meta: Mapping[str, Sequence[Any]] | None = None,
        vocab_size: int | None = None,
        vocab_fingerprint: str | None = None,
    ) -> Paragraphs:
        """Wrap a ``[n_paragraphs, pos]`` tensor of token ids.

        Args:
            tokens: integer token ids, one window per row.
            prefix_len: prefix length (50 in the paper).
            ids: paragraph ids; default ``"0"``, ``"1"``, ...
            meta: per-paragraph columns.
            vocab_size: when given, every id must be below it.
            vocab_fingerprint: see the class docstring.
        """
        if not isinstance(tokens, Tensor):
            tokens = torch.tensor(tokens)
        ids = [str(i) for i in range(tokens.shape[0])] if ids is None else list(ids)
        result = cls(
            tokens=tokens,
            ids=tuple(str(i) for i in ids),
            prefix_len=prefix_len,
            meta={k: tuple(v) for k, v in (meta or {}).items()},
            vocab_fingerprint=vocab_fingerprint,
        )
        if vocab_size is not None:
            result.check_vocab(vocab_size)
        return result

    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str],
        tokenizer: Any,
        *,
        prefix_len: int = PREFIX_LEN,
        continuation_len: int = CONTINUATION_LEN,
        ids: Sequence[str | int] | None = None,
        windows: Literal["first", "all"] = "first",
        on_short: Literal["raise", "skip"] = "raise",
    ) -> Paragraphs:
        """Tokenize texts (no BOS) and cut fixed-length windows.

        Args:
            texts: the texts.
            tokenizer: a Hugging Face tokenizer, or a HookedTransformer (its tokenizer, and its
                vocabulary size is checked).
            prefix_len: prefix length.
            continuation_len: continuation length.
            ids: one id per text; default the text's index. With ``windows="all"`` each window
                gets ``"{id}:{k}"``.
            windows: ``"first"`` keeps each text's first window; ``"all"`` cuts every
                non-overlapping window.
            on_short: a text shorter than one window raises (``"raise"``) or is skipped and
                counted in ``n_too_short`` (``"skip"``).
        """
        if windows not in ("first", "all"):
            raise ValueError(f"windows must be 'first' or 'all', got {windows!r}")
        if on_short not in ("raise", "skip"):
            raise ValueError(f"on_short must be 'raise' or 'skip', got {on_short!r}")
        if isinstance(texts, str):
            raise TypeError("texts must be a collection of strings, not one string: use [text]")
        texts = list(texts)
        if not texts:
            raise ValueError("no texts given: pass at least one text")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                name = ids[index] if ids is not None and index < len(ids) else index
                raise TypeError(
                    f"text {str(name)!r} is {type(text).__name__}, not str (an empty cell in a "
                    "table reads as None or NaN: drop or fill it first)"
                )
        if prefix_len < 1 or continuation_len < 1:
            raise ValueError(
                f"prefix_len and continuation_len must be >= 1, got {prefix_len}, "
                f"{continuation_len}"
            )
        if ids is not None and len(ids) != len(texts):
            raise ValueError(f"got {len(ids)} ids for {len(texts)} texts")
        text_ids = [str(i) for i in (ids if ids is not None else range(len(texts)))]
        hf_tokenizer = as_tokenizer(tokenizer)
        length = prefix_len + continuation_len
        rows: list[list[int]] = []
        row_ids: list[str] = []
        too_short: list[tuple[str, int]] = []
        for text_id, token_ids in zip(text_ids, encode_texts(hf_tokenizer, texts), strict=True):
            if len(token_ids) < length:
                too_short.append((text_id, len(token_ids)))
                continue
            for k, start in enumerate(window_starts(len(token_ids), length, windows)):
                rows.append(token_ids[start : start + length])
                row_ids.append(text_id if windows == "first" else f"{text_id}:{k}")
        if too_short and on_short == "raise":
            text_id, n = too_short[0]
            raise ValueError(
                f"{len(too_short)} of {len(texts)} texts are shorter than one window of "
                f"{length} tokens (text {text_id!r} has {n}); pass on_short='skip' to drop them"
            )
        if too_short:
            logger.warning(
                "skipped %d of %d texts shorter than %d tokens", len(too_short), len(texts), length
            )
        tokens = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), length)
        result = cls(
            tokens=tokens,
            ids=tuple(row_ids),
            prefix_len=prefix_len,
            vocab_fingerprint=tokenizer_fingerprint(hf_tokenizer),
            n_too_short=len(too_short),
        )
        vocab = _model_vocab(tokenizer)
        if vocab is not None:
            result.check_vocab(vocab)
        return result

    @classmethod
    def from_dataset(
        cls,
        dataset: Any,
        tokenizer: Any,
        *,
        text_column: str = "text",
        id_column: str | None = None,
        **kwargs: Any,
    ) -> Paragraphs:
        """Windows from a ``datasets.Dataset`` column of texts; ``kwargs`` as in ``from_texts``.

        ``id_column="auto"`` uses a column named ``id`` when there is one, else the row index.
        """
        columns = list(getattr(dataset, "column_names", []) or [])
        if id_column == "auto":
            id_column = "id" if "id" in columns else None
        if text_column not in columns:
            raise ValueError(
                f"the dataset has no column {text_column!r} (columns: {columns}); "
                "pass text_column=..."
            )
        if id_column is not None and id_column not in columns:
            raise ValueError(f"the dataset has no id column {id_column!r} (columns: {columns})")
        ids = [str(i) for i in dataset[id_column]] if id_column is not None else None
        return cls.from_texts(dataset[text_column], tokenizer, ids=ids, **kwargs)

    @classmethod
    def from_files(
        cls,
        paths: str | Path | Sequence[str | Path],
        tokenizer: Any,
        *,
        text_column: str = "text",
        id_column: str | None = None,
        **kwargs: Any,
    ) -> Paragraphs:
        """Windows from local csv, json or jsonl files (read with ``datasets``) or text files.

        A ``.txt`` file is one text (one document per file, its id the file name), as in a
        corpus scan: for one text per line, use a ``.jsonl`` or ``.csv`` with a text column.
        """
        from datasets import load_dataset

        files = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        if not files:
            raise ValueError("no files given")
        kind = file_format(files, _PARAGRAPH_FORMATS)
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"no such file: {missing}")
        empty = [str(f) for f in files if f.stat().st_size == 0]
        if empty:
            raise ValueError(f"empty file: {empty}; every file needs at least one text")
        if kind == "text":  # one document per file, as in a corpus scan; id: the file name
            texts = [read_text_file(file) for file in files]
            return cls.from_texts(texts, tokenizer, ids=[f.name for f in files], **kwargs)
        try:
            with quiet_libraries():  # no "Generating train split" bar
                dataset = load_dataset(kind, data_files=[str(f) for f in files], split="train")
        except Exception as error:  # datasets wraps parse errors in its own types
            if isinstance(error, (MemoryError, RecursionError)):
                raise
            cause = error.__cause__ or error
            names = ", ".join(str(f) for f in files)
            raise ValueError(
                f"cannot read {names} as {kind}: "
                f"{type(cause).__name__}: {cause}; check the file's format and encoding (UTF-8)"
            ) from error
        try:  # datasets may decode lazily: a file that is not UTF-8 can fail only here
            return cls.from_dataset(
                dataset, tokenizer, text_column=text_column, id_column=id_column, **kwargs
            )
        except UnicodeDecodeError as error:
            names = ", ".join(str(f) for f in files)
            raise ValueError(
                f"cannot read {names}: it is not UTF-8 text ({error}); re-save it as UTF-8"
            ) from error

    @classmethod
    def concat(cls, *parts: Paragraphs) -> Paragraphs:
        """Join paragraph sets with the same window layout.

        Meta columns are united; a column missing from one part is ``None`` for its rows.
        """
        if not parts:
            raise ValueError("concat needs at least one Paragraphs")
        first = parts[0]
        for part in parts[1:]:
            if part.tokens.shape[1] != first.tokens.shape[1] or part.prefix_len != first.prefix_len:
                raise ValueError("cannot concat paragraphs with different window layouts")
        fingerprints = {p.vocab_fingerprint for p in parts} - {None}
        if len(fingerprints) > 1:
            raise ValueError("cannot concat paragraphs made by different tokenizers")
        return cls(
            tokens=torch.cat([p.tokens for p in parts]),
            ids=tuple(i for p in parts for i in p.ids),
            prefix_len=first.prefix_len,
            meta={
                k: tuple(v for p in parts for v in p.meta.get(k, (None,) * len(p)))
                for k in dict.fromkeys(k for p in parts for k in p.meta)
            },
            vocab_fingerprint=fingerprints.pop() if fingerprints else None,
        )

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def continuation_len(self) -> int:
        return self.seq_len - self.prefix_len

    @property
    def prefix(self) -> Int[Tensor, "n_paragraphs prefix_pos"]:
        return self.tokens[:, : self.prefix_len]

    @property
    def continuation(self) -> Int[Tensor, "n_paragraphs continuation_pos"]:
        return self.tokens[:, self.prefix_len :]

    def select(self, index: Tensor | Sequence[int] | slice) -> Paragraphs:
        """The paragraphs at ``index``: positions, a slice, or a boolean mask."""
        if isinstance(index, slice):
            positions = list(range(len(self)))[index]
        else:
            index = torch.as_tensor(index)
            if index.dtype == torch.bool:
                if index.shape != (len(self),):
                    raise ValueError(
                        f"a boolean mask needs shape ({len(self)},), got {tuple(index.shape)}"
                    )
                index = index.nonzero().flatten()
            positions = [int(i) for i in index.flatten()]
        return Paragraphs(
            tokens=self.tokens[positions],
            ids=tuple(self.ids[i] for i in positions),
            prefix_len=self.prefix_len,
            meta={k: tuple(v[i] for i in positions) for k, v in self.meta.items()},
            vocab_fingerprint=self.vocab_fingerprint,
        )

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> Paragraphs:
        if isinstance(index, int):
            return self.select([index])
        return self.select(index)

    def with_meta(self, **columns: Sequence[Any]) -> Paragraphs:
        """A copy with meta columns added or replaced."""
        return Paragraphs(
            tokens=self.tokens,
            ids=self.ids,
            prefix_len=self.prefix_len,
            meta={**self.meta, **{k: tuple(v) for k, v in columns.items()}},
            vocab_fingerprint=self.vocab_fingerprint,
        )

    def with_continuation(self, continuation: Tensor) -> Paragraphs:
        """A copy with the same prefixes and another continuation (e.g. the model's own)."""
        if continuation.shape != self.continuation.shape:
            raise ValueError(
                f"continuation must have shape {tuple(self.continuation.shape)}, "
                f"got {tuple(continuation.shape)}"
            )
        return Paragraphs(
            tokens=torch.cat([self.prefix, continuation.to("cpu", torch.int64)], dim=1),
            ids=self.ids,
            prefix_len=self.prefix_len,
            meta=self.meta,
            vocab_fingerprint=self.vocab_fingerprint,
        )

    # ------------------------------------------------------------------ checks and filters
    def check_vocab(self, d_vocab: int) -> None:
        """Raise ``ValueError`` if any token id is outside a vocabulary of ``d_vocab`` ids."""
        if len(self) and int(self.tokens.max()) >= d_vocab:
            row = int((self.tokens >= d_vocab).any(dim=1).nonzero()[0])
            raise ValueError(
                f"paragraph {self.ids[row]!r} has token id {int(self.tokens[row].max())}, outside "
                f"the model's vocabulary of {d_vocab}: the paragraphs were tokenized for another "
                "model"
            )

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` if these paragraphs were not tokenized for ``model``.

        Also the check every analyzer shares that ``model`` is one memloc-tl can analyze (a
        ``TypeError`` for anything else, see :func:`memloc_tl.core.backend.check_model`).
        """
        check_model(model)
        self.check_vocab(int(model.cfg.d_vocab))
        n_ctx = getattr(model.cfg, "n_ctx", None)
        if isinstance(n_ctx, int) and self.tokens.shape[1] > n_ctx:
            raise ValueError(
                f"paragraphs of {self.tokens.shape[1]} tokens exceed the model's context of "
                f"{n_ctx}: cut shorter windows (prefix_len/continuation_len)"
            )
        tokenizer = getattr(model, "tokenizer", None)
        if self.vocab_fingerprint is not None and tokenizer is not None:
            expected = tokenizer_fingerprint(tokenizer)
            if expected != self.vocab_fingerprint:
                raise ValueError(
                    "these paragraphs were tokenized with a different tokenizer than the "
                    f"model's (fingerprint {self.vocab_fingerprint} vs {expected}); build them "
                    "with Paragraphs.from_texts(texts, model)"
                )

    def keep_unique(self, min_fraction: float = 0.5) -> Paragraphs:
        """Keep paragraphs with more than ``min_fraction`` unique tokens (paper A.1).

        The inequality is strict, as in the reference code: 50 of 100 unique is dropped.
        """
        if not 0.0 <= min_fraction < 1.0:
            raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction}")
        n_unique = torch.tensor([len(set(row.tolist())) for row in self.tokens])
        return self.select(n_unique > min_fraction * self.seq_len)

    def drop_keywords(
        self,
        tokenizer: Any,
        keywords: Sequence[str] = PAPER_KEYWORDS,
        *,
        mode: Literal["token_set", "text"] = "token_set",
    ) -> Paragraphs:
        """Drop paragraphs that contain any variant of the keywords (paper A.1).

        Args:
            tokenizer: the paragraphs' tokenizer (or a HookedTransformer).
            keywords: the keywords; default the paper's ten.
            mode: ``"token_set"`` (the reference code): each keyword in six variants
                ({as is, UPPER, Capitalized} x {no leading space, leading space}) is tokenized,
                and a paragraph is dropped when the set of a variant's tokens is a subset of
                the paragraph's token set (a bag-of-tokens test). ``"text"``: dropped when the
                decoded paragraph contains a variant as a case-insensitive substring.
        """
        if mode not in ("token_set", "text"):
            raise ValueError(f"mode must be 'token_set' or 'text', got {mode!r}")
        hf_tokenizer = as_tokenizer(tokenizer)
        if mode == "text":
            lowered = [k.lower() for k in keywords]
            texts = hf_tokenizer.batch_decode(self.tokens.tolist())
            keep = [not any(k in t.lower() for k in lowered) for t in texts]
            return self.select(torch.tensor(keep, dtype=torch.bool))
        variants = {
            f"{space}{form}"
            for keyword in keywords
            for form in (keyword, keyword.upper(), keyword.capitalize())
            for space in ("", " ")
        }
        variant_sets = [set(ids) for ids in encode_texts(hf_tokenizer, sorted(variants)) if ids]
        keep = []
        for row in self.tokens:
            present = set(row.tolist())
            keep.append(not any(v <= present for v in variant_sets))
        return self.select(torch.tensor(keep, dtype=torch.bool))

    # ------------------------------------------------------------------ output
    def texts(self, tokenizer: Any) -> list[str]:
        """The decoded paragraphs."""
        return as_tokenizer(tokenizer).batch_decode(self.tokens.tolist())

    def to_frame(self, tokenizer: Any = None) -> pd.DataFrame:
        """One row per paragraph: id, meta columns, and the decoded prefix and continuation."""
        frame = pd.DataFrame({"id": list(self.ids), **{k: list(v) for k, v in self.meta.items()}})
        if tokenizer is not None:
            hf_tokenizer = as_tokenizer(tokenizer)
            frame["prefix"] = hf_tokenizer.batch_decode(self.prefix.tolist())
            frame["continuation"] = hf_tokenizer.batch_decode(self.continuation.tolist())
        return frame

    def __repr__(self) -> str:
        meta = f", meta={sorted(self.meta)}" if self.meta else ""
        return (
            f"Paragraphs(n={len(self)}, prefix={self.prefix_len}, "
            f"continuation={self.continuation_len}{meta})"
        )


def corpus_token_counts(
    source: Iterable[str] | Paragraphs | Any,
    tokenizer: Any = None,
    *,
    d_vocab: int | None = None,
    text_column: str = "text",
    batch_size: int = 1000,
    progress: bool = False,
) -> Int[Tensor, " d_vocab"]:
    """Unigram token counts over a text collection, a ``datasets.Dataset`` or ``Paragraphs``.

    Texts are streamed in batches, so a large dataset is never tokenized all at once. The
    counts are what the rare-token analysis (paper section 6.3) ranks prefix tokens by.

    Args:
        source: an iterable of strings, a ``datasets.Dataset`` (its ``text_column``), or
            ``Paragraphs`` (all their tokens are counted; no tokenizer needed).
        tokenizer: the tokenizer (or HookedTransformer) for text sources.
        d_vocab: length of the result; default the tokenizer's or model's vocabulary size.
        text_column: the dataset column that holds the texts.
        batch_size: texts tokenized at once.
        progress: show a progress bar.

    Returns:
        int64 counts, one per token id.
    """
    check_positive_int(batch_size, "batch_size")
    if isinstance(source, Paragraphs):
        if len(source) == 0:
            raise ValueError("no paragraphs to count tokens of: pass a non-empty set")
        size = d_vocab if d_vocab is not None else int(source.tokens.max()) + 1
        source.check_vocab(size)
        return torch.bincount(source.tokens.flatten(), minlength=size)
    if tokenizer is None:
        raise TypeError("counting tokens of texts needs a tokenizer (or a HookedTransformer)")
    hf_tokenizer = as_tokenizer(tokenizer)
    if d_vocab is None:
        d_vocab = _model_vocab(tokenizer) or len(hf_tokenizer)
    if isinstance(source, str):
        raise TypeError("source must be a collection of strings, not one string: use [text]")
    columns = getattr(source, "column_names", None)
    if columns is not None:
        if text_column not in columns:
            raise ValueError(f"the dataset has no column {text_column!r} (columns: {columns})")
        rows: Any = source  # a Dataset or IterableDataset: stream it row by row
        source = (row[text_column] for row in rows)
    counts = torch.zeros(d_vocab, dtype=torch.int64)
    batch: list[str] = []

    def flush() -> None:
        ids = [i for row in encode_texts(hf_tokenizer, batch) for i in row]
        if ids:
            flat = torch.tensor(ids, dtype=torch.int64)
            if int(flat.max()) >= d_vocab:
                raise ValueError(
                    f"token id {int(flat.max())} is outside d_vocab={d_vocab}: the tokenizer does "
                    "not match"
                )
            counts.add_(torch.bincount(flat, minlength=d_vocab))
        batch.clear()

    for text in tqdm(source, desc="counting tokens", disable=not progress, unit="text"):
        batch.append(text)
        if len(batch) >= batch_size:
            flush()
    flush()
    if int(counts.sum()) == 0:
        raise ValueError(
            "no tokens were counted: the source holds no text (every token would look rare)"
        )
    return counts


def check_set(model: Any, paragraphs: Any, name: str, *, allow_empty: bool = False) -> Paragraphs:
    """``paragraphs`` is a non-empty :class:`Paragraphs` made for ``model``'s tokenizer."""
    if not isinstance(paragraphs, Paragraphs):
        raise TypeError(
            f"{name} must be Paragraphs, got {type(paragraphs).__name__}: wrap token tensors "
            "with Paragraphs.from_tokens(tokens), texts with Paragraphs.from_texts(texts, model)"
        )
    if not allow_empty and len(paragraphs) == 0:
        raise ValueError(
            f"{name} is empty: pass at least one paragraph (a filter such as "
            "scan.memorized() can select none; check len() first)"
        )
    paragraphs.check_model(model)
    return paragraphs
