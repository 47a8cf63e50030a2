"""Benchmark: the batched head-patching sweep vs transformer_lens.patching's per-head function.

Run by hand: ``python benchmarks/patching.py [--tiny] [--paragraphs 32]``. On the organism, in
one run and on the same paragraphs, every head of every layer is patched from non-memorized
(source) into memorized (target) paragraphs at all positions, and scored by the mean NLL of the
target's continuation:

- ``memloc_tl.analysis.patching_sweep`` (per layer: cached residual, heads stacked in the batch);
- ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos`` (one full forward per head).

Prints both times, the ratio (goal: at least 3x), and the largest disagreement of the maps;
then attribution patching (``memloc_tl.attribution_patching``, one forward and backward for
every head): its time against both, and its correlation with the exact sweep.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_subject_args, describe, load_subject, synchronize
from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

from memloc_tl.analysis import attribution_patching, patching_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_subject_args(parser)
    parser.add_argument("--paragraphs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    subject = load_subject(args)
    model = subject.model
    n = min(args.paragraphs, len(subject.planted), len(subject.control))
    target, source = subject.planted[list(range(n))], subject.control[list(range(n))]
    tokens = target.tokens.to(model.cfg.device)

    def mean_nll(logits: torch.Tensor) -> torch.Tensor:
        logprobs = logits[:, 49:99].float().log_softmax(-1)
        return -logprobs.gather(-1, tokens[:, 50:, None]).mean()

    started = time.perf_counter()
    sweep = patching_sweep(model, target, source, batch_size=args.batch_size, progress=False)
    t_ours = time.perf_counter() - started

    started = time.perf_counter()
    with torch.no_grad():
        _, source_cache = model.run_with_cache(source.tokens.to(model.cfg.device))
        theirs = get_act_patch_attn_head_out_all_pos(model, tokens, source_cache, mean_nll)
        baseline = mean_nll(model(tokens))
    synchronize()
    t_theirs = time.perf_counter() - started

    ours = sweep.delta_nll.mean(-1) + baseline.cpu()
    print(describe(subject))
    print(f"{n} paragraphs, batch {args.batch_size} target paragraphs x all heads")
    print(f"patching_sweep                           {t_ours:8.3f} s")
    print(f"get_act_patch_attn_head_out_all_pos      {t_theirs:8.3f} s")
    print(f"theirs / ours = {t_theirs / t_ours:6.2f}x   (goal >= 3)")
    print(f"max |difference| of the mean-NLL maps: {(ours - theirs.cpu()).abs().max():.2e}")
    print(f"largest mean dNLL: {[(str(h), round(s, 4)) for h, s in sweep.top(3)]}")

    started = time.perf_counter()
    estimate = attribution_patching(model, target, source, progress=False)
    t_attribution = time.perf_counter() - started
    print(f"\nattribution_patching (linear estimate)   {t_attribution:8.3f} s")
    print(f"theirs / attribution = {t_theirs / t_attribution:6.2f}x")
    print(f"sweep / attribution = {t_ours / t_attribution:6.2f}x")
    print(f"correlation with the exact sweep: {estimate.correlation(sweep):.3f}")
    print(f"largest estimated dNLL: {[(str(h), round(s, 4)) for h, s in estimate.top(3)]}")


if __name__ == "__main__":
    main()
