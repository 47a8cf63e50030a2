"""Benchmark: the scan in bf16 / fp16 against float32, with and without ``verify="margin"``.

Run by hand: ``python benchmarks/precision.py [--tiny] [--layout gpt-neo-125m] [--device cuda]``.
In one run and on the same paragraphs, per reduced dtype:

- the float32 scan, the reduced scan with ``verify="none"`` and with ``verify="margin"`` (the
  windows near a flip scored again in float32), best of ``--repeats``;
- the speed-ups over float32, the EM agreement with float32 (share of windows with the same EM;
  ``verify="margin"`` must give 1.000), the share of windows near a flip (what the margin costs);
- the largest and the 99.9th-percentile |logit error| against float32 on the first batch, and
  the default margin as a multiple of twice the largest error (a margin is a difference of two
  logits, each off by at most the largest error: a multiple above 1 means no flip can hide);
- the largest error of the mean continuation NLL.

On a CPU without bf16/fp16 matrix units the reduced scans are no faster (the point there is
the agreement); on a GPU bf16 and fp16 are several times faster (issue goal: >= 3x).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from common import add_subject_args, describe, load_subject, synchronize

from memloc_tl import scan_memorization
from memloc_tl.core.forward import continuation_logits
from memloc_tl.core.precision import Precision
from memloc_tl.memorization import MemorizationScan


def best_of(fn: Callable[[], MemorizationScan], repeats: int) -> tuple[float, MemorizationScan]:
    times, results = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        results.append(fn())
        synchronize()
        times.append(time.perf_counter() - started)
    return min(times), results[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    add_subject_args(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    args = parser.parse_args()
    subject = load_subject(args)
    model, paragraphs = subject.model, subject.everything
    bs = args.batch_size
    print(describe(subject))
    print(f"{len(paragraphs)} paragraphs, batch {bs}, best of {args.repeats}")

    def scan(precision: Precision | None) -> Callable[[], MemorizationScan]:
        return lambda: scan_memorization(
            model, paragraphs, batch_size=bs, precision=precision, progress=False
        )

    scan(None)()  # warm up
    t_exact, exact = best_of(scan(None), args.repeats)
    print(f"float32 scan                    {t_exact:8.3f} s")
    first = paragraphs.tokens[:bs]
    with torch.no_grad():
        reference = continuation_logits(model, first, paragraphs.prefix_len)
    for name in args.dtypes:
        loose_precision = Precision(name, verify="none")
        t_loose, loose = best_of(scan(loose_precision), args.repeats)
        t_checked, checked = best_of(scan(Precision(name)), args.repeats)
        assert loose.near_flip is not None
        with torch.no_grad(), loose_precision.autocast(model.cfg.device or "cpu"):
            reduced = continuation_logits(model, first, paragraphs.prefix_len)
        error = (reduced - reference).abs().flatten()
        sample = error[torch.randperm(len(error))[:1_000_000]]
        largest = float(error.max())
        agree = (loose.exact_match == exact.exact_match).float().mean()
        agree_checked = (checked.exact_match == exact.exact_match).float().mean()
        nll = (loose.nll - exact.nll).abs().max()
        margin = loose_precision.threshold
        near = float(loose.near_flip.float().mean())
        percentile = float(sample.quantile(0.999))
        print(f"\n{name}")
        print(f"  scan, verify='none'           {t_loose:8.3f} s")
        print(f"  scan, verify='margin'         {t_checked:8.3f} s")
        print(f"{name} verify=none speed-up = {t_exact / t_loose:.2f}x  (goal on a GPU >= 3)")
        print(f"{name} verify=margin speed-up = {t_exact / t_checked:.2f}x")
        print(f"  EM agreement with float32: 'none' {agree:.4f}, 'margin' {agree_checked:.4f}")
        print(f"  windows near a flip (margin {margin:g}): {near:.3f}")
        print(
            f"  |logit error| max {largest:.4f}, 99.9th percentile {percentile:.4f}; "
            f"margin / (2 x max) = {margin / (2 * largest):.1f}"
        )
        print(f"  max |NLL error| (verify='none'): {float(nll):.2e}")


if __name__ == "__main__":
    main()
