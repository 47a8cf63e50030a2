"""Benchmark: gradient_norms vs one bare forward+backward of the same tokens.

Run by hand: ``python benchmarks/gradients.py [--tiny] [--paragraphs 32]``. On the organism's
memorized paragraphs it times, in one run,

- ``gradient_norms`` (batch-mean NLL gradient of the attributed matrices, reduced to
  max|grad|, L2 and mean|grad| per layer x component);
- a bare ``model(tokens)`` + continuation NLL + ``loss.backward()`` over the same batches;

and prints the ratio (goal: at most 1.3x). Also prints the memorized and non-memorized layer
shares of the max-|grad| map (the paper: memorized relatively larger in lower layers).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from common import add_subject_args, describe, load_subject, synchronize

from memloc_tl import scan_memorization
from memloc_tl.analysis import compare_gradient_norms, gradient_norms


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    add_subject_args(parser)
    parser.add_argument("--paragraphs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    subject = load_subject(args)
    model = subject.model
    paragraphs = subject.planted[: args.paragraphs]
    bs = args.batch_size

    def ours() -> None:
        gradient_norms(model, paragraphs, batch_size=bs, progress=False)

    def bare() -> None:
        for start in range(0, len(paragraphs), bs):
            tokens = paragraphs.tokens[start : start + bs].to(model.cfg.device)
            logprobs = model(tokens)[:, 49:99].log_softmax(-1)
            loss = -logprobs.gather(-1, tokens[:, 50:, None]).mean()
            loss.backward()
        model.zero_grad(set_to_none=True)

    ours()
    bare()
    t_ours = min(_timed(ours) for _ in range(args.repeats))
    t_bare = min(_timed(bare) for _ in range(args.repeats))
    print(describe(subject))
    print(f"{len(paragraphs)} paragraphs, batch {bs}")
    print(f"gradient_norms          {t_ours:8.3f} s")
    print(f"bare forward+backward   {t_bare:8.3f} s")
    print(f"ours / bare = {t_ours / t_bare:6.2f}x   (goal <= 1.3)")

    if subject.organism is None:
        return  # random weights: no memorized paragraphs to compare
    scan = scan_memorization(model, subject.everything, progress=False)
    comparison = compare_gradient_norms(
        model, scan.memorized(), scan.non_memorized(), progress=False
    )
    share = lambda t: [round(x, 3) for x in t.tolist()]  # noqa: E731
    print(f"layer share, memorized     {share(comparison.memorized.layer_share())}")
    print(f"layer share, non-memorized {share(comparison.non_memorized.layer_share())}")
    print(f"top max|grad| memorized: {comparison.memorized.top(3)}")


def _timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
