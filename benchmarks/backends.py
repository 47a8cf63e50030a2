"""Benchmark: the same analyses on a HookedTransformer and on a TransformerBridge, same run.

Run by hand: ``python benchmarks/backends.py [--tiny] [--layout gpt-neo-125m] [--device cuda]``.
Times the scan, the patching sweep over every head and the per-layer gradient norms on each
backend this TransformerLens offers (3.9+: both; 4: the bridge only), on the same paragraphs,
and prints the bridge's time over the HookedTransformer's (goal <= 1.2x on GPT-Neo 125M's
layout). On both, the sweep's variants run only the blocks from the patched layer on, and the
scan unembeds only the continuation positions (``memloc_tl.core.backend.final_residual``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from common import add_subject_args, describe, load_subject, synchronize

from memloc_tl import gradient_norms, patching_sweep, scan_memorization
from memloc_tl.core.backend import tl_major


def timed(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: lazy hooks, allocator
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    synchronize()
    return (time.perf_counter() - started) / repeats


def measure(args: argparse.Namespace) -> tuple[dict[str, float], int]:
    """Seconds per analysis on the backend ``args.backend``, and the paragraph count."""
    subject = load_subject(args)
    model = subject.model
    n = min(args.paragraphs, len(subject.planted), len(subject.control))
    target, source = subject.planted[list(range(n))], subject.control[list(range(n))]
    print(describe(subject))
    runs: dict[str, Callable[[], object]] = {
        "scan": lambda: scan_memorization(model, target, progress=False),
        "sweep": lambda: patching_sweep(model, target, source, batch_size=4, progress=False),
        "gradients": lambda: gradient_norms(model, target, progress=False),
    }
    return {name: timed(run, args.repeats) for name, run in runs.items()}, n


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    add_subject_args(parser)
    parser.add_argument("--paragraphs", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    backends = ["bridge"] if tl_major() >= 4 else ["hooked", "bridge"]
    times: dict[str, dict[str, float]] = {}
    n = 0
    for backend in backends:
        args.backend = backend
        times[backend], n = measure(args)
    print(f"{n} paragraphs, mean of {args.repeats} runs after a warm-up")
    for analysis in times[backends[0]]:
        row = "  ".join(f"{b} {times[b][analysis]:8.3f} s" for b in backends)
        print(f"{analysis:10s} {row}")
    if "hooked" in times:
        for analysis, seconds in times["bridge"].items():
            ratio = seconds / times["hooked"][analysis]
            print(f"bridge / HookedTransformer, {analysis} = {ratio:.2f}x   (goal <= 1.2)")


if __name__ == "__main__":
    main()
