"""Reproduce the paper's GPT-Neo 125M analyses with memloc-tl, end to end, and compare numbers.

Where the weights and data are at hand (a GPU is advised; see docs/reproduce-gpt-neo-125m.md)::

    python scripts/reproduce_gpt_neo_125m.py --out-dir repro/ \\
        --memorized mem_strings.csv --candidates NeelNanda/pile-10k

- ``--model``: a hub name or a local checkpoint directory (default EleutherAI/gpt-neo-125M).
- ``--memorized``: a csv/json/jsonl/parquet/txt file of paragraphs the model is believed to have
  memorized, e.g. the paper's released ``mem_strings.csv`` (text column ``paragraph``); each
  text's first 100 tokens are one paragraph.
- ``--candidates``: more text, a file or a ``datasets`` name (streamed; e.g. a Pile sample):
  each document's first 100 tokens, filtered as in the paper's appendix A.1. Most are
  non-memorized; the scan sorts them.

It scans every paragraph, writes the scan (``scan.parquet``), the paper's EM buckets and the
comparison with the paper's numbers (``comparison.csv``, printed), and the full report
(``report.html``: rare-token heads, perturbation, patching, gradients, sparse unlearning,
deletion), each with the paper's number beside ours. Token rarity is counted over every text read.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from memloc_tl import Paragraphs, load_model
from memloc_tl.cli import positive_int
from memloc_tl.core.backend import HookedModel
from memloc_tl.core.paragraphs import tokenizer_fingerprint
from memloc_tl.corpus import documents_from_dataset, documents_from_files, local_device
from memloc_tl.report import ReportConfig, memorization_report

LENGTH = 100  # a 50-token prefix and a 50-token continuation

# Paper (Stoehr et al. 2024) numbers for GPT-Neo 125M, with the definition each one uses.
PAPER = {
    "memorized paragraphs (EM = 50)": 442,
    "partly memorized (EM 30-49)": 141,
    "partly memorized (EM 11-29)": 436,
    "non-memorized (EM 0-10)": 12422,
    "median continuation NLL of the released MPs": 0.4265,
    "mean EM drop per perturbed prefix token, MPs": 12.19,
    "mean EM drop per perturbed prefix token, NMPs (vs own greedy continuation)": 33.12,
    "rare-token head (pooled Kendall tau about -0.97)": "L1H2",
    "memorized EM after unlearning, top-0.1% contrastive-gradient mask": 26.75,
    "memorized EM after unlearning, random 0.1% mask": 49.80,
}


def read_paragraphs(
    source: str, model: HookedModel, text_column: str, limit: int | None, label: str
) -> tuple[Paragraphs, Tensor]:
    """Each document's first 100 tokens as a paragraph, and every token read (for rarity).

    ``source`` is a local file (csv, json, jsonl, parquet, txt) or a ``datasets`` name
    (streamed); at most ``limit`` documents are read; shorter documents are skipped.
    """
    if Path(source).exists():
        documents = documents_from_files([source], model, text_column=text_column)
    else:
        from datasets import load_dataset

        stream = load_dataset(source, split="train", streaming=True)
        documents = documents_from_dataset(stream, model, text_column=text_column)
    rows, ids, read = [], [], []
    for document in itertools.islice(documents, limit):
        read.append(torch.as_tensor(document.tokens, dtype=torch.long))
        if len(document.tokens) >= LENGTH:
            rows.append(read[-1][:LENGTH])
            ids.append(f"{label}-{document.id}")
    if not rows:
        raise ValueError(f"{source}: no document of at least {LENGTH} tokens")
    paragraphs = Paragraphs.from_tokens(
        torch.stack(rows),
        ids=ids,
        meta={"source": [label] * len(rows)},
        vocab_size=model.cfg.d_vocab,
        vocab_fingerprint=tokenizer_fingerprint(model),
    )
    return paragraphs, torch.cat(read)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="EleutherAI/gpt-neo-125M", help="hub name or directory")
    parser.add_argument("--memorized", required=True, help="file of believed-memorized texts")
    parser.add_argument("--memorized-column", default="paragraph", help="its text column")
    parser.add_argument("--candidates", required=True, help="file or datasets name of more text")
    parser.add_argument("--candidates-column", default="text", help="its text column")
    parser.add_argument(
        "--limit", type=positive_int, default=20000, help="candidate documents to read"
    )
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument(
        "--paragraphs", type=positive_int, default=50, help="MPs and NMPs per analysis"
    )
    parser.add_argument("--edit-lr", type=float, default=1e-5, help="the paper's 1e-5")
    parser.add_argument("--edit-steps", type=positive_int, default=10)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not Path(args.memorized).is_file():
        parser.error(f"--memorized {args.memorized}: no such file")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        parser.error(f"--out-dir {args.out_dir} is a file")

    started = time.perf_counter()
    device = local_device(args.device)
    model = load_model(args.model, device=device)
    believed, believed_tokens = read_paragraphs(
        args.memorized, model, args.memorized_column, None, "memorized"
    )
    candidates, candidate_tokens = read_paragraphs(
        args.candidates, model, args.candidates_column, args.limit, "candidate"
    )
    candidates = candidates.drop_keywords(model).keep_unique()  # paper A.1
    everything = Paragraphs.concat(believed, candidates)
    print(f"{len(believed)} paragraphs from --memorized, {len(candidates)} candidates")

    counts = torch.bincount(
        torch.cat([believed_tokens, candidate_tokens]), minlength=model.cfg.d_vocab
    )
    report = memorization_report(
        model,
        everything,
        corpus_counts=counts,
        config=ReportConfig(
            n_paragraphs=args.paragraphs,
            edit_lr=args.edit_lr,
            edit_steps=args.edit_steps,
            seed=args.seed,
            title=f"memloc-tl: {args.model}",
            batch_size=args.batch_size,
        ),
    )
    scan = report.scan  # the report scans every paragraph: its scan is the one written
    buckets = {name: len(part) for name, part in scan.buckets().items()}
    from_file = torch.tensor([s == "memorized" for s in everything.meta["source"]])
    nll = scan.nll[from_file & (scan.exact_match == scan.continuation_len)]
    ours: dict[str, object] = {
        "memorized paragraphs (EM = 50)": buckets["50"],
        "partly memorized (EM 30-49)": buckets["30-49"],
        "partly memorized (EM 11-29)": buckets["11-29"],
        "non-memorized (EM 0-10)": buckets["0-10"],
        "median continuation NLL of the released MPs": (
            float(nll.median()) if len(nll) else float("nan")
        ),
    }
    drops = {k: r.mean_drop_per_token() for k, r in report.perturbation.items()}
    ours["mean EM drop per perturbed prefix token, MPs"] = drops["memorized"]
    ours["mean EM drop per perturbed prefix token, NMPs (vs own greedy continuation)"] = drops[
        "non-memorized"
    ]
    (head, tau), *_ = report.rare.top(1)
    ours["rare-token head (pooled Kendall tau about -0.97)"] = f"{head} ({tau:.2f})"
    edited = report.edits.query("set == 'edited' and metric == 'mean_em'").set_index("mask")
    ours["memorized EM after unlearning, top-0.1% contrastive-gradient mask"] = float(
        edited.loc["gradient", "after"]
    )
    ours["memorized EM after unlearning, random 0.1% mask"] = float(edited.loc["random", "after"])
    note = "scan counts cover the texts given, not the paper's 13,450 Pile paragraphs"
    comparison = pd.DataFrame(
        {
            "quantity": list(PAPER),
            "paper": [PAPER[k] for k in PAPER],
            "here": [ours[k] for k in PAPER],
        }
    )
    # written only now that every number exists
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report.write_html(args.out_dir / "report.html")
    scan.to_frame().to_parquet(args.out_dir / "scan.parquet")
    comparison.to_csv(args.out_dir / "comparison.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_colwidth", 80):
        print(comparison.to_string(index=False))
    print(f"({note})")
    print(f"wrote {args.out_dir}/report.html, scan.parquet, comparison.csv")
    print(f"done in {time.perf_counter() - started:.0f} s on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
