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

from memloc_tl.corpus.documents import (
    FINGERPRINT_BLOCK,
    PARSER_MODULES,
    Document,
    DocumentStream,
    documents_from_dataset,
    documents_from_files,
    documents_from_texts,
    documents_from_token_file,
    file_fingerprint,
)
from memloc_tl.corpus.placement import Placement, barrier, init_distributed, local_device
from memloc_tl.corpus.scan import (
    COLUMNS,
    DTYPES,
    FREE_RUNNING,
    NEAR_FLIP,
    SCAN_FILE,
    CorpusConfig,
    CorpusScanSummary,
    Windows,
    dtypes,
    empty_table,
    free_running_scores,
    read_corpus_scan,
    scan_corpus,
)

__all__ = [
    "COLUMNS",
    "DTYPES",
    "FINGERPRINT_BLOCK",
    "FREE_RUNNING",
    "NEAR_FLIP",
    "PARSER_MODULES",
    "SCAN_FILE",
    "CorpusConfig",
    "CorpusScanSummary",
    "Document",
    "DocumentStream",
    "Placement",
    "Windows",
    "barrier",
    "documents_from_dataset",
    "documents_from_files",
    "documents_from_texts",
    "documents_from_token_file",
    "dtypes",
    "empty_table",
    "file_fingerprint",
    "free_running_scores",
    "init_distributed",
    "local_device",
    "read_corpus_scan",
    "scan_corpus",
]
