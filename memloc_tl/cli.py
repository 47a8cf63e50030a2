"""The ``memloc`` command: ``demo`` (offline), ``scan``, ``report`` and ``localize-benchmark``."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memloc_tl.core.files import atomic_write

if TYPE_CHECKING:  # torch and TransformerLens load only when a command runs, not for --help
    from memloc_tl.organism import Organism
    from memloc_tl.workbench import Workbench

DEFAULT_MODEL = "EleutherAI/gpt-neo-125M"  # memloc_tl.models.DEFAULT_MODEL (a test checks)

ORGANISM = "organism"

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, ImportError)
"""Errors that mean bad input or environment: one line on stderr and exit code 2 (without
``--debug``). Anything else is a bug: its traceback is shown with ``--debug``."""


class UsageError(Exception):
    """An invalid command line found after parsing (e.g. an unwritable --out)."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def positive_real(text: str) -> float:
    """argparse type: a finite number > 0 (a learning rate, say); NaN and infinity refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _can_write_into(directory: Path) -> str | None:
    """Why a file cannot be created in ``directory`` (None if it can): a real try, since
    permission bits say nothing for root or a read-only file system."""
    if not directory.is_dir():
        return f"cannot write into {directory}: it is not a directory"
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".memloc-probe-"):
            pass
    except OSError as error:
        return f"cannot write into {directory} ({error.strerror or error})"
    return None


def check_output_dir(path: Path, option: str = "--out-dir") -> Path:
    """Refuse an output directory that cannot be written into, before any work is done.

    The directory itself is created if missing (it was asked for); its parent must exist.
    """
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file; give a directory")
    target = path if path.is_dir() else path.parent
    if not target.exists():
        raise UsageError(f"{option} {path}: the folder {target} does not exist; create it first")
    problem = _can_write_into(target)
    if problem:
        raise UsageError(f"{option} {path}: {problem}; choose another place")
    return path


def check_output(path: Path, suffixes: Sequence[str], option: str = "--out") -> Path:
    """Refuse an output path that cannot be written, before any work is done.

    Its folder must exist: no directory the user did not ask for is created.
    """
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{option} must end in {' or '.join(suffixes)}, got {path.name}")
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name")
    parent = path.parent
    if not parent.exists():
        raise UsageError(f"{option} {path}: the folder {parent} does not exist; create it first")
    problem = _can_write_into(parent)
    if problem:
        raise UsageError(f"{option} {path}: {problem}; choose another place")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {path} exists and is not writable")
    return path


def check_cache_dir(path: Path | None) -> None:
    """A --cache-dir that can be created and written, checked before any work."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise UsageError(f"--cache-dir {path} is a file; give a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # a cache directory is made as needed, parents too
    problem = _can_write_into(existing)
    if problem:
        raise UsageError(f"--cache-dir {path}: {problem}; choose another place")


def _organism(args: argparse.Namespace) -> Organism:
    check_cache_dir(args.cache_dir)  # before torch loads
    from memloc_tl.organism import MANIFEST, OrganismConfig, build_organism, organism_dir

    config = OrganismConfig.tiny() if args.tiny else OrganismConfig()
    target = organism_dir(config, args.cache_dir)
    if getattr(args, "rebuild", False) or not (target / MANIFEST).is_file():
        size = (
            "about half a minute"
            if args.tiny
            else "about 5 minutes on 2 idle CPU cores; several times that while other work "
            "runs (28 minutes seen)"
        )
        print(
            f"first run: building the organism, which usually takes {size}. It is cached in "
            f"{target}, so later runs load it in seconds.",
            flush=True,
        )
    return build_organism(
        config,
        cache_dir=args.cache_dir,
        rebuild=getattr(args, "rebuild", False),
        device=args.device,
    )


def run_demo(args: argparse.Namespace) -> int:
    from memloc_tl.memorization import summarize
    from memloc_tl.organism import acceptance as organism_acceptance
    from memloc_tl.workbench import organism_workbench

    out = None if args.report is None else check_output(args.report, (".html", ".htm"), "--report")
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
    acceptance = organism_acceptance(scans, config)  # measured now, not read from the cache
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
    if config.n_checkpoints > 0:
        _print_training(organism, scans, args.batch_size)
    if out is not None:
        name = "organism-tiny" if args.tiny else "organism"
        return _write_report(args, organism_workbench(organism, name), out)
    tiny = " --tiny" if args.tiny else ""
    print(
        f"\nnext: memloc report{tiny} --out report.html  (the whole pipeline as one offline page)"
    )
    return 0


def _print_training(organism: Organism, scans: dict[str, Any], batch_size: int) -> None:
    """The demo's over-training lines: per set, how many paragraphs are memorized at each
    checkpoint; then the rare-token head of the finally memorized ones over the steps."""
    from memloc_tl.checkpoints import training_dynamics
    from memloc_tl.core.paragraphs import Paragraphs

    sets = {name: scan for name, scan in scans.items() if not name.startswith("held-out")}
    memorized = Paragraphs.concat(*(scan.memorized() for scan in sets.values()))
    others = Paragraphs.concat(
        *(scan.bucket(0, scan.continuation_len - 1) for scan in sets.values())
    )
    series = organism.checkpoints
    if not len(memorized):
        return
    dynamics = training_dynamics(
        series,
        memorized,
        organism.corpus_counts,
        others=others if len(others) else None,
        progress=False,
    )
    timeline = dynamics.timeline
    steps = " / ".join(map(str, timeline.steps))
    print(f"\nover training ({len(series)} checkpoints): paragraphs memorized at steps {steps}")
    column = {paragraph: j for j, paragraph in enumerate(timeline.ids)}
    for name, scan in sets.items():
        rows = [column[paragraph] for paragraph in scan.paragraphs.ids]
        counts = timeline.memorized[:, rows].sum(-1).tolist()
        print(f"  {name:<12} {len(rows):>3} paragraphs: " + " / ".join(map(str, counts)))
    for line in dynamics.findings():
        print(textwrap.fill(line, width=100, initial_indent="  ", subsequent_indent="    "))


def _write_report(args: argparse.Namespace, bench: Workbench, out: Path) -> int:
    from memloc_tl.report import ReportConfig, memorization_report

    organism = bench.organism
    kept = organism is not None and organism.config.n_checkpoints > 0
    report = memorization_report(
        bench.model,
        bench.paragraphs,
        corpus_counts=None if bench.counts_from_paragraphs else bench.corpus_counts,
        general=bench.general,
        checkpoints=organism.checkpoints if organism is not None and kept else None,
        config=ReportConfig(
            n_paragraphs=args.paragraphs,
            edit_lr=bench.edit_lr if args.edit_lr is None else args.edit_lr,
            edit_steps=args.edit_steps,
            seed=args.seed,
            batch_size=args.batch_size,
            inj=args.inj,
            title=f"memloc-tl report: {bench.model.cfg.model_name}",
        ),
        progress=True,
    )
    report.write_html(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opens offline)")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from memloc_tl.workbench import load_workbench

    out = check_output(args.report, (".html", ".htm"))
    name = args.model
    if name == ORGANISM and args.tiny:
        name = "organism-tiny"
    bench = load_workbench(
        name,
        data=args.data,
        text_column=args.text_column,
        windows=args.windows,
        cache_dir=args.cache_dir,
        device=args.device,
    )
    return _write_report(args, bench, out)


def run_scan(args: argparse.Namespace) -> int:
    from memloc_tl.core.paragraphs import Paragraphs
    from memloc_tl.core.precision import Precision
    from memloc_tl.memorization import scan_memorization

    corpus = (args.dataset, args.token_file, args.checkpoints, args.revisions)
    if args.out_dir is not None or any(x is not None for x in corpus):
        return run_corpus_scan(args)
    if args.data is None or args.out is None:
        raise UsageError("scan needs --data and --out (or --out-dir for a corpus scan)")
    if len(args.data) != 1:
        raise UsageError("--data takes one file without --out-dir (a corpus scan takes several)")
    if args.windows == "strided" or (args.prefix_len, args.continuation_len) != (50, 50):
        raise UsageError("--windows strided and other lengths need --out-dir (a corpus scan)")
    args.data = args.data[0]
    out = check_output(args.out, (".csv", ".json"))
    if not Path(args.data).is_file():
        raise UsageError(f"--data {args.data}: no such file")
    model = _scan_model(args)
    paragraphs = Paragraphs.from_files(
        args.data,
        model,
        text_column=args.text_column,
        id_column=args.id_column,
        windows=args.windows,
        on_short="skip",
    )
    if not len(paragraphs):
        raise UsageError(f"no text in {args.data} is long enough for one 100-token paragraph")
    precision = None if args.dtype == "float32" else Precision(args.dtype)
    scan = scan_memorization(
        model, paragraphs, batch_size=args.batch_size, precision=precision, progress=True
    )
    _write_table(scan.to_frame(), out)
    print(
        f"scanned {len(scan)} paragraphs ({paragraphs.n_too_short} texts too short): "
        f"{len(scan.memorized())} memorized (EM = {scan.continuation_len}); wrote {out}"
    )
    return 0


def _scan_model(args: argparse.Namespace) -> Any:
    from memloc_tl.models import load_model

    if args.model == ORGANISM:
        return _organism(args).model
    return load_model(args.model, device=args.device)


def run_corpus_scan(args: argparse.Namespace) -> int:
    """``memloc scan --out-dir``: streamed, sharded, resumable; every torchrun rank runs it."""
    from memloc_tl import corpus
    from memloc_tl.core.paragraphs import file_format

    sources = [x for x in (args.data, args.dataset, args.token_file) if x is not None]
    if len(sources) != 1:
        raise UsageError("a corpus scan reads exactly one of --data, --dataset, --token-file")
    if args.out_dir is None:
        raise UsageError(
            "--dataset, --token-file, --checkpoints and --revisions scan a corpus: pass --out-dir"
        )
    if args.checkpoints is not None and args.revisions is not None:
        raise UsageError("give --checkpoints or --revisions, not both")
    if args.checkpoints == [] and args.model != ORGANISM:
        raise UsageError(
            f"--checkpoints without directories means the organism's own: with --model "
            f"{args.model} name the checkpoint directories"
        )
    if args.revisions is not None and (args.model == ORGANISM or Path(args.model).is_dir()):
        raise UsageError("--revisions are a hub model's: give --model a hub name")
    out = None if args.out is None else check_output(args.out, (".csv", ".json", ".parquet"))
    check_output_dir(args.out_dir)
    missing = [
        p for p in [*(args.data or []), args.token_file] if p is not None and not p.is_file()
    ]
    if missing:
        raise UsageError(f"{missing[0]}: no such file")
    not_checkpoints = [p for p in args.checkpoints or [] if not (p / "config.json").is_file()]
    if not_checkpoints:
        raise UsageError(f"--checkpoints {not_checkpoints[0]}: not a checkpoint directory")
    if args.data is not None:
        try:
            file_format(args.data)
        except ValueError as error:
            raise UsageError(f"--data: {error}") from error
    try:
        config = corpus.CorpusConfig(
            prefix_len=args.prefix_len,
            continuation_len=args.continuation_len,
            windows=args.windows,
            stride=args.stride,
            docs_per_shard=args.docs_per_shard,
            limit=args.limit,
            free_running=args.free_running,
            dtype=args.dtype,
        )
    except ValueError as error:
        raise UsageError(str(error)) from error

    try:
        args.device = str(corpus.local_device(args.device))
    except ValueError as error:
        raise UsageError(str(error)) from error
    placement = corpus.init_distributed(args.device)
    series, tokenizer = _series(args)
    # over a series, only the tokenizer is needed here (one model at a time while scanning)
    model = _scan_model(args) if series is None else tokenizer
    if args.token_file is not None:
        documents = corpus.documents_from_token_file(
            args.token_file, seq_len=args.seq_len, dtype=args.token_dtype
        )
    elif args.dataset is not None:
        from datasets import load_dataset

        stream = load_dataset(args.dataset, split=args.split, streaming=True)
        documents = corpus.documents_from_dataset(
            stream, model, text_column=args.text_column, id_column=args.id_column
        )
    else:
        assert args.data is not None  # exactly one source, checked above
        documents = corpus.documents_from_files(
            args.data, model, text_column=args.text_column, id_column=args.id_column
        )
    options = {"config": config, "resume": args.resume, "batch_size": args.batch_size}
    if series is not None:
        return _scan_series(args, series, documents, options, out, placement.rank)
    summary = corpus.scan_corpus(model, documents, args.out_dir, **options, progress=True)
    print(_summary_line(summary))
    if placement.rank == 0:
        table = corpus.read_corpus_scan(args.out_dir)
        memorized = int(table["memorized"].sum())
        print(f"{len(table)} windows, {memorized} memorized; shards in {args.out_dir}")
        if out is not None:
            _write_table(table, out)
            print(f"wrote {out}")
    return 0


def _summary_line(summary: Any) -> str:
    return (
        f"rank {summary.rank}/{summary.world_size}: scored {summary.shards_scored} shards "
        f"({summary.windows} windows), skipped {summary.shards_skipped} finished ones, of "
        f"{summary.n_shards} ({summary.documents} documents read) in {summary.seconds:.2f} s"
    )


def _series(args: argparse.Namespace) -> tuple[Any, Any]:
    """The checkpoint series of ``--checkpoints`` / ``--revisions`` and the tokenizer its
    documents are read with (``(None, None)``: neither option)."""
    from memloc_tl.checkpoints import CheckpointSeries

    try:
        if args.checkpoints == []:
            organism = _organism(args)
            return organism.checkpoints, organism.tokenizer
        if args.revisions is not None:
            series = CheckpointSeries.from_revisions(args.model, args.revisions, device=args.device)
        elif args.checkpoints is not None:
            series = CheckpointSeries.from_directories(args.checkpoints, device=args.device)
        else:
            return None, None
    except ValueError as error:
        raise UsageError(str(error)) from error
    # the last checkpoint's tokenizer (the series has one); its model is released at once
    return series, series.checkpoints[-1].load().tokenizer


def _scan_series(
    args: argparse.Namespace,
    series: Any,
    documents: Any,
    options: dict[str, Any],
    out: Path | None,
    rank: int,
) -> int:
    """``memloc scan --out-dir --checkpoints/--revisions``: one shard set per step."""
    from memloc_tl.checkpoints import corpus_timeline, read_corpus_series, scan_corpus_checkpoints

    summaries = scan_corpus_checkpoints(series, documents, args.out_dir, **options, progress=True)
    for step, summary in zip(series.steps, summaries, strict=True):
        print(f"step {step}: {_summary_line(summary)}")
    if rank == 0:
        timeline = corpus_timeline(args.out_dir)
        memorized = timeline.memorized.sum(-1).tolist()
        print(
            f"{len(timeline.ids)} windows at {len(series)} steps; memorized per step: "
            + ", ".join(f"{step}: {n}" for step, n in zip(series.steps, memorized, strict=True))
            + f"; shards in {args.out_dir}/step-*"
        )
        if out is not None:
            _write_table(read_corpus_series(args.out_dir), out)
            print(f"wrote {out}")
    return 0


def _write_table(frame: Any, out: Path) -> None:
    """A table as .csv, .json (records) or .parquet, by the suffix, written atomically."""
    writers = {
        ".csv": lambda tmp: frame.to_csv(tmp, index=False),
        ".json": lambda tmp: frame.to_json(tmp, orient="records", indent=1),
        ".parquet": lambda tmp: frame.to_parquet(tmp, index=False),
    }
    atomic_write(out, writers[out.suffix.lower()])


def run_localize_benchmark(args: argparse.Namespace) -> int:
    from memloc_tl.localization import (
        METHODS,
        BenchmarkConfig,
        DeletionConfig,
        InjectionConfig,
        InjectionDamageWarning,
        InjectionFailedWarning,
        LearnedMaskConfig,
        LocalizeConfig,
    )
    from memloc_tl.localization.benchmark import BASELINES, organism_benchmark

    out: Path | None = None if args.out is None else check_output(args.out, (".csv",))
    methods = None if args.methods is None else args.methods.split(",")
    baselines = [b for b in BASELINES if args.level == "weights" or b != "oracle"]
    known = [*METHODS[args.level], *(b for b in baselines if b not in METHODS[args.level])]
    if methods is not None and not set(methods) <= set(known):
        unknown = sorted(set(methods) - set(known))
        raise UsageError(
            f"--methods: unknown for --level {args.level}: {', '.join(unknown)}; choose from "
            f"{', '.join(known)}"
        )
    organism = _organism(args)
    config = (
        InjectionConfig(fraction=args.fraction, max_steps=args.max_steps)
        if args.benchmark == "inj"
        else DeletionConfig(fraction=args.delete_fraction)
    )
    benchmark = BenchmarkConfig(
        methods=None if methods is None else tuple(methods),
        seeds=tuple(range(args.seeds)),
        localize=LocalizeConfig(learned=LearnedMaskConfig(steps=args.learned_steps)),
    )
    with warnings.catch_warnings():
        # the lines below say the same, with every seed's numbers side by side
        warnings.simplefilter("ignore", InjectionFailedWarning)
        warnings.simplefilter("ignore", InjectionDamageWarning)
        result = organism_benchmark(
            organism,
            kind=args.benchmark,
            level=args.level,
            n_paragraphs=args.paragraphs,
            config=config,
            benchmark=benchmark,
        )
    if args.benchmark == "inj":
        injections = result.injections  # type: ignore[union-attr]
        shown = [
            "seed", "steps", "succeeded", "damaging", "em_before", "em_after",
            "memorized_em_drop", "perplexity_ratio", "abs_w_before", "abs_w_after",
        ]  # fmt: skip
        print("injections (full table: --out's .injections.csv)")
        print(injections[[c for c in shown if c in injections.columns]].to_string(index=False))
        failed = result.failed_seeds  # type: ignore[union-attr]
        damaging = result.damaging_seeds  # type: ignore[union-attr]
        if failed:
            print(
                f"WARNING: the injection of seed(s) {failed} did not succeed (no EM = 50 within "
                f"{args.max_steps} steps; em_after above): their localizer scores are left out "
                "of the summary below (failed_runs); raise --max-steps, or use a level with "
                "more units (--level weights)",
                file=sys.stderr,
            )
        if damaging:
            assert isinstance(config, InjectionConfig)
            print(
                f"WARNING: the injection of seed(s) {damaging} damaged the model (memorized "
                f"mean EM fell by more than {config.max_em_drop:g} tokens or general perplexity "
                f"grew more than {config.max_perplexity_ratio:g}x: "
                "memorized_em_drop, perplexity_ratio above): its localizers are scored on a model "
                "that no longer behaves like the original (damaging_runs below)",
                file=sys.stderr,
            )
    print(result.summary().to_string(index=False, float_format="{:.3f}".format))
    if out is not None:
        atomic_write(out, lambda tmp: result.to_frame().to_csv(tmp, index=False))
        print(f"wrote {out}")
        if args.benchmark == "inj":
            table = out.with_suffix(".injections.csv")
            injections = result.injections  # type: ignore[union-attr]
            atomic_write(table, lambda tmp: injections.to_csv(tmp, index=False))
            print(f"wrote {table}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memloc",
        description="Localize paragraph memorization in GPT-Neo on TransformerLens.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show other libraries' progress bars and info messages (transformers, datasets)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def organism_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--tiny", action="store_true", help="the small test organism (fast)")
        sub.add_argument("--cache-dir", type=Path, default=None, help="organism cache directory")
        sub.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
        sub.add_argument(
            "--batch-size",
            type=positive_int,
            default=32,
            help="paragraphs per forward pass (on a CPU at most 3200 tokens and 32 MiB a tensor)",
        )

    def report_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--paragraphs", type=positive_int, default=8, help="paragraphs per set")
        sub.add_argument(
            "--edit-lr",
            type=positive_real,
            default=None,
            help="unlearning learning rate (default 3e-2 for an organism, 1e-5 otherwise)",
        )
        sub.add_argument(
            "--edit-steps", type=positive_int, default=10, help="unlearning: optimizer steps"
        )
        sub.add_argument("--seed", type=int, default=0, help="seed of every random choice")
        sub.add_argument(
            "--inj",
            action="store_true",
            help="add section 8: plant a paragraph in a known head and check the head "
            "localizers find it (slow on large models)",
        )

    demo = commands.add_parser("demo", help="offline: build or load the organism and scan it")
    organism_options(demo)
    demo.add_argument("--rebuild", action="store_true", help="build again even if cached")
    demo.add_argument(
        "--report", type=Path, default=None, help="also write the full HTML report here"
    )
    report_options(demo)
    demo.set_defaults(run=run_demo)

    scan = commands.add_parser(
        "scan",
        help="scan texts for memorized paragraphs (a file, or a whole corpus with --out-dir)",
        description="Scan texts for memorized paragraphs. With --out-dir: a corpus scan that "
        "streams its input, writes resumable Parquet shards and runs under torchrun "
        "(torchrun --nproc_per_node N -m memloc_tl scan ... --out-dir DIR).",
    )
    scan.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub name, checkpoint directory, or '{ORGANISM}' (default {DEFAULT_MODEL})",
    )
    scan.add_argument(
        "--data",
        nargs="+",
        type=Path,
        default=None,
        help="csv, json, jsonl (one text per row, in --text-column), parquet (corpus scan) or "
        ".txt files (one text per file, its id the file name), all of one kind",
    )
    scan.add_argument(
        "--out", type=Path, default=None, help="the table: .csv or .json (.parquet with --out-dir)"
    )
    scan.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="corpus scan: Parquet shards and their markers here (resumable, torchrun-ready)",
    )
    scan.add_argument(
        "--dataset", default=None, help="corpus scan: a datasets name or directory (streamed)"
    )
    scan.add_argument("--split", default=None, help="corpus scan: the dataset's split")
    scan.add_argument(
        "--token-file", type=Path, default=None, help="corpus scan: pre-tokenized .npy or raw file"
    )
    scan.add_argument(
        "--seq-len", type=positive_int, default=2049, help="token file: tokens per row (Pile: 2049)"
    )
    scan.add_argument(
        "--token-dtype", choices=["uint16", "uint32"], default="uint16", help="raw token file dtype"
    )
    scan.add_argument("--prefix-len", type=positive_int, default=50, help="prefix tokens")
    scan.add_argument("--continuation-len", type=positive_int, default=50, help="continuation")
    scan.add_argument("--stride", type=positive_int, default=None, help="--windows strided: step")
    scan.add_argument("--limit", type=positive_int, default=None, help="read at most N documents")
    scan.add_argument(
        "--docs-per-shard", type=positive_int, default=1000, help="documents per output shard"
    )
    scan.add_argument("--resume", action="store_true", help="finish an interrupted --out-dir scan")
    scan.add_argument(
        "--checkpoints",
        nargs="*",
        type=Path,
        default=None,
        help="corpus scan over training: checkpoint directories in training order (their steps "
        "read from names like step-000120), one shard set per step under --out-dir; with "
        f"--model {ORGANISM} and no directories, the organism's own checkpoints",
    )
    scan.add_argument(
        "--revisions",
        nargs="+",
        default=None,
        help="corpus scan over training: hub revisions of --model in training order "
        "(Pythia: step1000 step2000 ...)",
    )
    scan.add_argument(
        "--free-running",
        action="store_true",
        help="corpus scan: add Pythia's memorization_score (share of the continuation that "
        "greedy generation reproduces; generates for every window not fully memorized)",
    )
    scan.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="precision of the matrix products; bfloat16/float16 score the windows near a "
        "flip again in float32, so EM equals float32's (adds a near_flip column)",
    )
    scan.add_argument("--text-column", default="text", help="column holding the texts")
    scan.add_argument(
        "--id-column",
        default="auto",
        help="column of paragraph ids (default: 'id' when the file has one, else the row number)",
    )
    scan.add_argument(
        "--windows",
        choices=["first", "all", "strided"],
        default="first",
        help="each text's first window, every non-overlapping one, or one every --stride tokens",
    )
    organism_options(scan)
    scan.set_defaults(run=run_scan)

    report = commands.add_parser(
        "report", help="the whole pipeline as one self-contained HTML page (offline)"
    )
    report.add_argument(
        "--model",
        default=ORGANISM,
        help=f"'{ORGANISM}' (default), a hub name or a checkpoint directory",
    )
    report.add_argument(
        "--data",
        type=Path,
        default=None,
        help="texts (needed unless organism): csv, json, jsonl (one text per row) or a .txt "
        "file (one text)",
    )
    report.add_argument("--out", dest="report", required=True, type=Path, help="the .html file")
    report.add_argument("--text-column", default="text", help="column holding the texts")
    report.add_argument(
        "--windows",
        choices=["first", "all"],
        default="all",
        help="each text's first 100-token window, or every non-overlapping one",
    )
    organism_options(report)
    report_options(report)
    report.set_defaults(run=run_report)

    bench = commands.add_parser(
        "localize-benchmark",
        help="is a localization real? INJ (planted ground truth) or DEL on the organism",
    )
    bench.add_argument("--benchmark", choices=["inj", "del"], default="inj")
    bench.add_argument(
        "--level",
        choices=["weights", "neurons", "heads"],
        default="weights",
        help="where to inject (INJ) or what to zero (DEL); on the default organism one head or "
        "16 neurons do not hold an unseen paragraph within 400 steps, 1%% of the weights do",
    )
    bench.add_argument(
        "--methods", default=None, help="comma-separated localizers (default: all of the level)"
    )
    bench.add_argument(
        "--seeds", type=positive_int, default=1, help="INJ: injections (one per seed)"
    )
    bench.add_argument(
        "--paragraphs",
        type=positive_int,
        default=2,
        help="INJ: paragraphs per injection; DEL: targets",
    )
    bench.add_argument(
        "--fraction", type=fraction, default=0.01, help="INJ weights: share injected per paragraph"
    )
    bench.add_argument("--max-steps", type=positive_int, default=400, help="INJ: step budget")
    bench.add_argument(
        "--delete-fraction", type=fraction, default=0.001, help="DEL: share of units zeroed"
    )
    bench.add_argument(
        "--learned-steps", type=positive_int, default=150, help="learned mask: steps"
    )
    bench.add_argument("--out", type=Path, default=None, help="per-run results, .csv")
    organism_options(bench)
    bench.set_defaults(run=run_localize_benchmark)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. Expected errors (bad input, missing files, no network) are one line on
    stderr with exit code 2; ``--debug`` shows the traceback of any error instead."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["MEMLOC_VERBOSE"] = "1"
    # memloc-tl's own messages at INFO; other libraries' only from WARNING unless --verbose
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("memloc_tl").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.verbose:
        logging.getLogger().setLevel(logging.INFO)
    prog = f"memloc {args.command}"
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, *EXPECTED_ERRORS) as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except Exception as error:
        if args.debug:
            raise
        print(
            f"{prog}: unexpected {type(error).__name__}: {error} (a bug: rerun with --debug for "
            "the traceback and report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
