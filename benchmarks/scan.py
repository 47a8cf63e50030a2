"""Benchmark: the teacher-forced scan vs KV-cached greedy generation vs one bare forward.

Run by hand: ``python benchmarks/scan.py [--tiny] [--repeats 3]``. On the organism it times, in
one run and on the same paragraphs,

- ``scan_memorization`` (EM + NLL from one teacher-forced pass per batch);
- greedy generation of 50 tokens per paragraph with the KV cache, then EM (the reference code);
- one bare forward pass of the same tokens (``model(tokens)``, full logits);

and prints the ratios. Goals (issue 2): scan >= 3x faster than generation, <= 1.2x a forward.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from memloc_tl import OrganismConfig, build_organism, greedy_continuations, scan_memorization
from memloc_tl.paragraphs import Paragraphs


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="use the tiny organism")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    organism = build_organism(OrganismConfig.tiny() if args.tiny else OrganismConfig())
    model = organism.model
    paragraphs = Paragraphs.concat(organism.planted, organism.control, organism.heldout)
    tokens = paragraphs.tokens.to(model.cfg.device)
    bs = args.batch_size

    def scan() -> object:
        return scan_memorization(model, paragraphs, batch_size=bs, progress=False)

    def generate() -> object:
        generated = greedy_continuations(model, paragraphs.prefix, 50, batch_size=bs)
        return (generated == paragraphs.continuation).long().cumprod(-1).sum(-1)

    def forward() -> None:
        with torch.no_grad():
            for start in range(0, len(tokens), bs):
                model(tokens[start : start + bs])

    scan()  # warm up
    t_scan = best_of(scan, args.repeats)
    t_forward = best_of(forward, args.repeats)
    t_generate = best_of(generate, max(1, args.repeats // 2))
    print(
        f"device {model.cfg.device}, {len(paragraphs)} paragraphs, batch {bs}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"scan              {t_scan:8.3f} s")
    print(f"bare forward      {t_forward:8.3f} s")
    print(f"greedy generation {t_generate:8.3f} s")
    print(f"generation / scan = {t_generate / t_scan:6.2f}x   (goal >= 3)")
    print(f"scan / forward    = {t_scan / t_forward:6.2f}x   (goal <= 1.2)")
    em_scan = scan_memorization(model, paragraphs, progress=False).exact_match
    print(f"EM agrees with generation on {int((em_scan == generate()).sum())}/{len(paragraphs)}")


if __name__ == "__main__":
    main()
