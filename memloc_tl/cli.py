"""The ``memloc`` command: ``memloc demo`` (offline) and ``memloc scan``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from memloc_tl.memorization import scan_memorization, summarize
from memloc_tl.models import DEFAULT_MODEL, load_model
from memloc_tl.organism import Organism, OrganismConfig, build_organism
from memloc_tl.paragraphs import Paragraphs

ORGANISM = "organism"


def _organism(args: argparse.Namespace) -> Organism:
    config = OrganismConfig.tiny() if args.tiny else OrganismConfig()
    return build_organism(
        config,
        cache_dir=args.cache_dir,
        rebuild=getattr(args, "rebuild", False),
        device=args.device,
    )


def run_demo(args: argparse.Namespace) -> int:
    organism = _organism(args)
    config = organism.config
    print(f"memloc-tl demo: the offline GPT-Neo organism ({organism.path})")
    print(
        f"  {config.n_layers} layers x {config.n_heads} heads, d_model {config.d_model}, "
        f"vocab {config.vocab_size}, trained {config.epochs} epochs on CPython's docs; "
        f"built in {organism.report.get('train_seconds', '?')} s"
    )
    print("  'xN' = times the paragraph is in each epoch's training data\n")
    scans = organism.scans(batch_size=args.batch_size)
    print(summarize(scans).to_string(index=False, float_format="{:.2f}".format))
    acceptance = organism.report["acceptance"]
    verdict = "passed" if acceptance["passed"] else "MISSED"
    print(
        f"\nacceptance {verdict}: {acceptance['top_tier_memorized_share']:.0%} of the most "
        f"repeated paragraphs memorized (need {config.min_top_tier_memorized:.0%}), control "
        f"mean EM {acceptance['control_mean_em']:.2f} (need <= {config.max_control_mean_em})"
    )
    top = scans[next(iter(scans))]
    memorized = top.memorized()
    if len(memorized):
        example = memorized.to_frame(organism.tokenizer).iloc[0]
        prefix, continuation = example["prefix"], example["continuation"]
        print("\na memorized paragraph (prefix | greedy continuation reproduced exactly):")
        print("  " + " ".join(prefix.split())[-160:] + " | " + " ".join(continuation.split())[:160])
    return 0


def run_scan(args: argparse.Namespace) -> int:
    if args.model == ORGANISM:
        model = _organism(args).model
    else:
        model = load_model(args.model, device=args.device)
    paragraphs = Paragraphs.from_files(
        args.data,
        model,
        text_column=args.text_column,
        id_column=args.id_column,
        windows=args.windows,
        on_short="skip",
    )
    if not len(paragraphs):
        print(f"no text in {args.data} is long enough for one 100-token paragraph", file=sys.stderr)
        return 1
    scan = scan_memorization(model, paragraphs, batch_size=args.batch_size, progress=True)
    frame = scan.to_frame()
    out = Path(args.out)
    if out.suffix.lower() == ".json":
        frame.to_json(out, orient="records", indent=1)
    elif out.suffix.lower() == ".csv":
        frame.to_csv(out, index=False)
    else:
        print(f"--out must end in .csv or .json, got {out.name}", file=sys.stderr)
        return 2
    print(
        f"scanned {len(scan)} paragraphs ({paragraphs.n_too_short} texts too short): "
        f"{len(scan.memorized())} memorized (EM = {scan.continuation_len}); wrote {out}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memloc",
        description="Localize paragraph memorization in GPT-Neo on TransformerLens.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def organism_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--tiny", action="store_true", help="the small test organism (fast)")
        sub.add_argument("--cache-dir", type=Path, default=None, help="organism cache directory")
        sub.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
        sub.add_argument("--batch-size", type=int, default=32)

    demo = commands.add_parser("demo", help="offline: build or load the organism and scan it")
    organism_options(demo)
    demo.add_argument("--rebuild", action="store_true", help="build again even if cached")
    demo.set_defaults(run=run_demo)

    scan = commands.add_parser("scan", help="scan a file of texts for memorized paragraphs")
    scan.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub name, checkpoint directory, or '{ORGANISM}' (default {DEFAULT_MODEL})",
    )
    scan.add_argument("--data", required=True, type=Path, help="csv, json, jsonl or txt file")
    scan.add_argument("--out", required=True, type=Path, help="results, .csv or .json")
    scan.add_argument("--text-column", default="text")
    scan.add_argument("--id-column", default=None)
    scan.add_argument("--windows", choices=["first", "all"], default="first")
    organism_options(scan)
    scan.set_defaults(run=run_scan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
