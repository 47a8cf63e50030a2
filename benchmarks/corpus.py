"""Benchmark: corpus-scan throughput, teacher-forced vs Hugging Face generate, 1 vs 2 processes.

Run by hand: ``python benchmarks/corpus.py [--tiny] [--layout gpt-neo-125m] [--device cuda]
[--windows 256] [--batch-size 8,32,128,512] [--prefix-len 32 --continuation-len 32]``. In one
run, on the same windows, at each batch size:

- ``memloc_tl.corpus.scan_corpus`` (one teacher-forced pass per batch, Parquet shards);
- ``transformers``' ``generate`` with ``continuation_len`` greedy steps per batch, as Pythia's
  memorization evaluation does (the model loaded from the same checkpoint);
- the limit: the arithmetic a scan cannot avoid, a bare forward of the blocks and the
  unembedding of the continuation positions (no scoring, no files), in the forwards the scan
  makes (on a CPU at most ``CPU_FORWARD_TOKENS`` tokens each); scan and limit take the best of
  ``--repeats``, interleaved;
- with ``--compare-attention``, the scan again with TransformerLens's own attention forward
  instead of the lean one (``memloc_tl.core.attention``), interleaved with the others;
- (CPU, organism layout) the same scan under ``torchrun`` with 1 and with 2 processes (gloo).

Prints windows per second and the ratios. Goals: never slower than ``generate`` at any batch
from 8 to 512 on the CPU, >= 3x at batch <= 32, within 1.15x of the limit at every batch;
>= 1.8x from 1 to 2 processes (which needs at least two free cores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    add_subject_args,
    attainable_rate,
    describe,
    load_subject,
    scan_flops,
    synchronize,
)

from memloc_tl.core import attention
from memloc_tl.core.backend import HookedModel, final_residual
from memloc_tl.core.forward import forward_rows
from memloc_tl.core.unembedding import shared_unembedding, unembed
from memloc_tl.corpus import CorpusConfig, Document, read_corpus_scan, scan_corpus


def hf_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model: Any = AutoModelForCausalLM.from_pretrained(path)
    return model.to(device).eval()


def generate_seconds(model: Any, windows: torch.Tensor, config: CorpusConfig, batch: int) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(windows), batch):
            prefix = windows[first : first + batch, : config.prefix_len].to(model.device)
            model.generate(
                prefix,
                attention_mask=torch.ones_like(prefix),
                max_new_tokens=config.continuation_len,
                min_new_tokens=config.continuation_len,
                do_sample=False,
                pad_token_id=0,
            )
    synchronize()
    return time.perf_counter() - started


def limit_seconds(
    model: HookedModel, windows: torch.Tensor, config: CorpusConfig, batch: int
) -> float:
    """A bare forward of the blocks and the continuation positions' unembedding, per batch,
    in the forwards a scan makes of it (on a CPU at most ``CPU_FORWARD_TOKENS`` tokens), through
    the scan's own forward and unembedding (one copy of ``W_U`` per call, as in a scan)."""
    p = config.prefix_len
    rows = forward_rows(model, batch, config.length)
    started = time.perf_counter()
    with torch.no_grad(), shared_unembedding():  # the scan's own unembedding: no W_U copies
        for first in range(0, len(windows), rows):
            residual = final_residual(model, windows[first : first + rows].to(model.cfg.device))
            unembed(model, model.ln_final(residual[:, p - 1 : -1]))
    synchronize()
    return time.perf_counter() - started


def scan_seconds(
    model: HookedModel, documents: list[Document], out: Path, config: CorpusConfig, batch: int
) -> float:
    started = time.perf_counter()
    scan_corpus(model, documents, out, config=config, batch_size=batch, progress=False)
    synchronize()
    seconds = time.perf_counter() - started
    assert len(read_corpus_scan(out)) == len(documents)
    return seconds


def plain_attention_seconds(
    model: HookedModel, documents: list[Document], out: Path, config: CorpusConfig, batch: int
) -> float:
    """:func:`scan_seconds` with TransformerLens's own attention forward (not the lean one)."""
    attention.ENABLED = False
    try:
        return scan_seconds(model, documents, out, config, batch)
    finally:
        attention.ENABLED = True


def torchrun_seconds(args: argparse.Namespace, data: Path, out: Path, processes: int) -> float:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "-m", "memloc_tl", "scan", "--model", "organism", "--device", "cpu",
        "--data", str(data), "--out-dir", str(out), "--windows", "all",
        "--docs-per-shard", "8", "--batch-size", str(args.batch_size[0]),
    ]  # fmt: skip
    if args.tiny:
        command.insert(command.index("--device"), "--tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    # the ranks' own scan times (model loading excluded); the slowest rank decides
    times = [float(m) for m in re.findall(r"in ([0-9.]+) s$", done.stdout, re.M)]
    assert len(times) == processes, done.stdout
    return max(times)


def batch_sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    add_subject_args(parser)
    parser.add_argument("--windows", type=int, default=128, help="windows to scan")
    parser.add_argument(
        "--batch-size", type=batch_sizes, default=[32], help="one, or several: 8,32,128,512"
    )
    parser.add_argument("--prefix-len", type=int, default=50)
    parser.add_argument("--continuation-len", type=int, default=50)
    parser.add_argument("--no-torchrun", action="store_true", help="skip the 1 vs 2 processes")
    parser.add_argument("--repeats", type=int, default=2, help="best of, for scan and limit")
    parser.add_argument(
        "--compare-attention",
        action="store_true",
        help="also time the scan with TransformerLens's own attention forward "
        "(memloc_tl.core.attention.ENABLED = False)",
    )
    args = parser.parse_args()
    subject = load_subject(args)
    model = subject.model
    config = CorpusConfig(
        prefix_len=args.prefix_len,
        continuation_len=args.continuation_len,
        windows="first",
        docs_per_shard=max(64, *args.batch_size),  # so that a shard holds a whole batch
    )
    pool = subject.everything.tokens[:, : config.length]
    windows = pool.repeat((args.windows + len(pool) - 1) // len(pool), 1)[: args.windows]
    documents = [Document(str(i), row.numpy()) for i, row in enumerate(windows)]
    print(describe(subject))
    print(f"{len(windows)} windows of {config.prefix_len} + {config.continuation_len} tokens")
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory)
        scan_corpus(model, documents[:8], out / "warm", config=config, progress=False)
        model_path = subject.organism.path if subject.organism is not None else None
        if model_path is None:  # a layout: save the random model's weights
            from common import build_layout

            model_path = build_layout(args.layout, out / "hf", model.tokenizer)
        reference = hf_model(model_path)
        peak, rate = attainable_rate(model.cfg.device)
        flops = scan_flops(model.cfg, len(windows), config.length, config.continuation_len)
        print(f"scan arithmetic {flops / 1e9:.1f} GFLOP; {rate} (the attainable rate assumed)")
        for batch in args.batch_size:
            t_scan, t_limit, t_plain = float("inf"), float("inf"), float("inf")
            for repeat in range(args.repeats):  # interleaved, so that load hits all alike
                scanned = out / f"scan-{batch}-{repeat}"
                t_scan = min(t_scan, scan_seconds(model, documents, scanned, config, batch))
                t_limit = min(t_limit, limit_seconds(model, windows, config, batch))
                if args.compare_attention:
                    t_plain = min(
                        t_plain,
                        plain_attention_seconds(
                            model, documents, out / f"plain-{batch}-{repeat}", config, batch
                        ),
                    )
            t_generate = generate_seconds(reference, windows, config, batch)
            n = len(windows)
            print(
                f"batch {batch:4d} ({forward_rows(model, batch, config.length)} rows per "
                f"forward): scan_corpus {n / t_scan:9.1f} windows/s, generate "
                f"{n / t_generate:9.1f}, the limit (bare forward + continuation unembedding) "
                f"{n / t_limit:9.1f}"
            )
            print(f"batch {batch} scan vs generate = {t_generate / t_scan:.2f}x")
            print(f"batch {batch} scan / limit = {t_scan / t_limit:.2f}x   (goal <= 1.15)")
            print(f"batch {batch} scan share of the matmul rate = {flops / t_scan / peak:.2f}x")
            if args.compare_attention:
                print(
                    f"batch {batch} scan, TransformerLens's attention forward / the lean one = "
                    f"{t_plain / t_scan:.2f}x   ({n / t_plain:9.1f} windows/s)"
                )
        if args.no_torchrun or args.layout != "organism":
            return
        tokenizer = model.tokenizer
        assert tokenizer is not None, "the organism has its tokenizer"
        texts = [tokenizer.decode(row) for row in windows]
        data = out / "corpus.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        one = torchrun_seconds(args, data, out / "one", 1)
        two = torchrun_seconds(args, data, out / "two", 2)
        print(f"torchrun, 1 process               {one:10.2f} s (scan only, slowest rank)")
        print(f"torchrun, 2 processes             {two:10.2f} s")
        print(f"2 processes vs 1 = {one / two:.2f}x")


if __name__ == "__main__":
    main()
