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

``--sources pmp`` patches from perturbed copies of the targets instead (the paper's PMPs: on
the organism ``perturb_prefixes``' most damaging single-token change; on a layout (GPT-Neo
125M's, GPT-2 small's), whose random weights memorize nothing, one token changed at a seeded
position in 40..49), where the sweep recomputes only from the first changed position on
(causal reuse); it also times the sweep with that reuse switched off, in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator

import torch
from common import (
    Subject,
    add_subject_args,
    attainable_rate,
    block_flops,
    describe,
    load_subject,
    synchronize,
    unembed_flops,
)
from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

import memloc_tl.analysis.patching as patching_module
from memloc_tl import Paragraphs, PerturbConfig, perturb_prefixes, scan_memorization
from memloc_tl.analysis import attribution_patching, patching_sweep
from memloc_tl.analysis.patching import first_difference


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    add_subject_args(parser)
    parser.add_argument("--paragraphs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sources", choices=["control", "pmp"], default="control")
    parser.add_argument("--seed", type=int, default=0, help="--sources pmp on a layout")
    args = parser.parse_args()
    subject = load_subject(args)
    model = subject.model
    n = min(args.paragraphs, len(subject.planted), len(subject.control))
    target, source = subject.planted[list(range(n))], subject.control[list(range(n))]
    if args.sources == "pmp":
        target, source = perturbed_sources(subject, n, args.seed)
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
    print(f"{n} paragraphs ({args.sources} sources), batch {args.batch_size} targets x all heads")
    if args.sources == "pmp":
        first = [
            first_difference(t[None], s[None], 50)
            for t, s in zip(tokens, source.tokens, strict=True)
        ]
        print(f"first changed position per paragraph: mean {sum(first) / len(first):.1f}")
        started = time.perf_counter()
        with without_causal_reuse():
            plain = patching_sweep(
                model, target, source, batch_size=args.batch_size, progress=False
            )
        t_plain = time.perf_counter() - started
        print(f"patching_sweep, no causal reuse          {t_plain:8.3f} s")
        print(f"no reuse / reuse = {t_plain / t_ours:6.2f}x")
        difference = (plain.delta_nll - sweep.delta_nll).abs().max()
        print(f"max |difference| reuse vs no reuse: {difference:.2e}")
    print(f"patching_sweep                           {t_ours:8.3f} s")
    print(f"get_act_patch_attn_head_out_all_pos      {t_theirs:8.3f} s")
    print(f"theirs / ours = {t_theirs / t_ours:6.2f}x   (goal >= 3)")
    print(f"max |difference| of the mean-NLL maps: {(ours - theirs.cpu()).abs().max():.2e}")
    # the limit: the arithmetic no exact sweep avoids, at the dense-matmul rate of this device
    firsts = [
        first_difference(t[None], s[None], 50) if args.sources == "pmp" else 0
        for t, s in zip(tokens, source.tokens.to(tokens.device), strict=True)
    ]
    flops = sweep_flops(model.cfg, firsts, target.seq_len, target.continuation_len)
    peak, rate = attainable_rate(model.cfg.device)
    print(
        f"sweep arithmetic {flops / 1e9:.1f} GFLOP (each head's variant from its layer on, from "
        f"the first changed position); {rate}"
    )
    print(f"sweep time / time of its arithmetic = {t_ours * peak / flops:.2f}x  (1.00 = limit)")
    bound = loop_flops(model.cfg, n, target.seq_len) / flops
    print(
        f"the loop's arithmetic / the sweep's = {bound:.2f}x: what computing less gives where "
        f"both run their arithmetic equally fast (measured theirs / ours = "
        f"{t_theirs / t_ours:.2f}x)"
    )
    print(f"largest mean dNLL: {[(str(h), round(s, 4)) for h, s in sweep.top(3)]}")

    started = time.perf_counter()
    estimate = attribution_patching(model, target, source, progress=False)
    t_attribution = time.perf_counter() - started
    print(f"\nattribution_patching (linear estimate)   {t_attribution:8.3f} s")
    print(f"theirs / attribution = {t_theirs / t_attribution:6.2f}x")
    print(f"sweep / attribution = {t_ours / t_attribution:6.2f}x")
    print(f"correlation with the exact sweep: {estimate.correlation(sweep):.3f}")
    print(f"largest estimated dNLL: {[(str(h), round(s, 4)) for h, s in estimate.top(3)]}")


def sweep_flops(cfg: object, firsts: list[int], seq: int, continuation: int) -> float:
    """FLOPs no exact sweep avoids: per paragraph, one unpatched run, and for every head of
    layer ``l`` the blocks ``l..`` at the positions from the paragraph's first changed one
    (keys over the whole window) and the unembedding of the continuation."""
    layers, heads = cfg.n_layers, cfg.n_heads  # type: ignore[attr-defined]
    total = 0.0
    for first in firsts:
        total += layers * block_flops(cfg, seq, seq) + unembed_flops(cfg, continuation)
        for layer in range(layers):
            blocks = (layers - layer) * block_flops(cfg, seq - first, seq)
            total += heads * (blocks + unembed_flops(cfg, continuation))
    return total


def loop_flops(cfg: object, n: int, seq: int) -> float:
    """FLOPs of TransformerLens's per-head loop: per paragraph, the source run, the baseline
    and one whole forward per head, each with the unembedding of every position."""
    layers, heads = cfg.n_layers, cfg.n_heads  # type: ignore[attr-defined]
    forward = layers * block_flops(cfg, seq, seq) + unembed_flops(cfg, seq)
    return n * (layers * heads + 2) * forward


def perturbed_sources(subject: Subject, n: int, seed: int) -> tuple[Paragraphs, Paragraphs]:
    """Targets and their perturbed copies (see the module docs)."""
    model = subject.model
    if subject.organism is not None:
        memorized = scan_memorization(model, subject.planted, progress=False).memorized()[:n]
        pmp = perturb_prefixes(
            model, memorized, config=PerturbConfig(seed=seed), progress=False
        ).perturbed
        assert pmp is not None
        return memorized, pmp
    target = subject.planted[list(range(n))]
    generator = torch.Generator().manual_seed(seed)
    tokens = target.tokens.clone()
    where = torch.randint(40, 50, (n,), generator=generator)
    tokens[torch.arange(n), where] = torch.randint(0, model.cfg.d_vocab, (n,), generator=generator)
    return target, Paragraphs.from_tokens(tokens, prefix_len=target.prefix_len)


@contextlib.contextmanager
def without_causal_reuse() -> Iterator[None]:
    """The sweep as it runs on a backend without a shareable key/value cache."""
    original = patching_module.shares_prefix_cache
    patching_module.shares_prefix_cache = lambda model: False
    try:
        yield
    finally:
        patching_module.shares_prefix_cache = original


if __name__ == "__main__":
    main()
