"""Benchmark: the teacher-forced scan vs KV-cached greedy generation vs one bare forward.

Run by hand: ``python benchmarks/scan.py [--tiny] [--repeats 3]``. On the organism it times, in
one run and on the same paragraphs,

- ``scan_memorization`` (EM + NLL from one teacher-forced pass per batch);
- greedy generation of 50 tokens per paragraph with the KV cache, then EM (the reference code);
- one bare forward pass of the same tokens (``model(tokens)``, full logits);

and prints the ratios. Goals (issue 2): scan >= 3x faster than generation, <= 1.2x a forward.
Beside them, the limit: the scan's arithmetic (every block at every position, the unembedding
at the continuation positions) divided by its time, as a share of the FLOP/s of a dense
2048 x 2048 fp32 matmul timed on the same device in the same run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from common import (
    add_subject_args,
    attainable_rate,
    describe,
    load_subject,
    scan_flops,
    synchronize,
)

from memloc_tl import greedy_continuations, scan_memorization
from memloc_tl.core import activations, unembedding
from memloc_tl.core import forward as kernel


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    add_subject_args(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also time the scan with TransformerLens's own unembedding (a copy of W_U per "
        "forward: memloc_tl.core.unembedding.ENABLED = False), with TransformerLens's own "
        "gelu_new (memloc_tl.core.activations.CHUNKED = False), with every position's logits "
        "at once (no memloc_tl.core.forward.scoring_chunk), and with all three, interleaved "
        "with the scan as is",
    )
    args = parser.parse_args()
    subject = load_subject(args)
    model, paragraphs = subject.model, subject.everything
    tokens = paragraphs.tokens.to(model.cfg.device)
    bs = args.batch_size

    def scan() -> object:
        return scan_memorization(model, paragraphs, batch_size=bs, progress=False)

    def generate() -> torch.Tensor:
        generated = greedy_continuations(model, paragraphs.prefix, 50, batch_size=bs)
        return (generated == paragraphs.continuation).long().cumprod(-1).sum(-1)

    def forward() -> None:
        with torch.no_grad():
            for start in range(0, len(tokens), bs):
                model(tokens[start : start + bs])

    def without(*switches: tuple[object, str, object]) -> Callable[[], object]:
        def run() -> object:
            saved = [getattr(owner, name) for owner, name, _ in switches]
            for owner, name, value in switches:
                setattr(owner, name, value)
            try:
                return scan()
            finally:
                for (owner, name, _), value in zip(switches, saved, strict=True):
                    setattr(owner, name, value)

        return run

    shared = (unembedding, "ENABLED", False)
    chunked = (activations, "CHUNKED", False)
    whole = (kernel, "scoring_chunk", lambda *args: None)
    variants = {
        "TransformerLens's unembedding (a W_U copy per forward)": without(shared),
        "TransformerLens's gelu_new (whole tensors)": without(chunked),
        "every position's logits at once": without(whole),
        "all three of the above (the code of 2026-12-04 morning)": without(shared, chunked, whole),
    }
    scan()  # warm up
    times: dict[str, list[float]] = {name: [] for name in ["as is", *variants]}
    for _ in range(args.repeats):  # interleaved, best of each
        times["as is"].append(best_of(scan, 1))
        for name, run in variants.items() if args.compare else ():
            times[name].append(best_of(run, 1))
    t_scan = min(times["as is"])
    t_forward = best_of(forward, args.repeats)
    t_generate = best_of(generate, max(1, args.repeats // 2))
    print(describe(subject))
    print(f"{len(paragraphs)} paragraphs, batch {bs}")
    print(f"scan              {t_scan:8.3f} s")
    print(f"bare forward      {t_forward:8.3f} s")
    print(f"greedy generation {t_generate:8.3f} s")
    print(f"generation / scan = {t_generate / t_scan:6.2f}x   (goal >= 3)")
    print(f"scan / forward    = {t_scan / t_forward:6.2f}x   (goal <= 1.2)")
    for name, measured in times.items():
        if name != "as is" and measured:
            print(f"scan with {name}: {min(measured):8.3f} s, {min(measured) / t_scan:5.2f}x")
    em_scan = scan_memorization(model, paragraphs, progress=False).exact_match
    print(f"EM agrees with generation on {int((em_scan == generate()).sum())}/{len(paragraphs)}")
    # the limit: the scan's unavoidable arithmetic at the dense-matmul rate of this device
    flops = scan_flops(model.cfg, len(paragraphs), paragraphs.seq_len, paragraphs.continuation_len)
    peak, rate = attainable_rate(model.cfg.device)
    print(
        f"scan arithmetic {flops / 1e9:.1f} GFLOP; achieved {flops / t_scan / 1e9:.1f} GFLOP/s; "
        f"{rate}"
    )
    print(f"scan share of the matmul rate = {flops / t_scan / peak:.2f}x  (1.00 = at the limit)")


if __name__ == "__main__":
    main()
