"""INJ and DEL on the organism: does each localizer find where a paragraph is? (run by hand)

    python benchmarks/localization.py                      # default organism, every part
    python benchmarks/localization.py --tiny --part heads  # quick

Prints, per localizer, the recall of the injected units (weights: at the injected count and at
0.1%; heads: the share of runs with the injected head first) beside the random, |w| and |delta
w| baselines, each localizer's cost as a ratio to one forward+backward of the target, and the
DEL specificity. The goals of issue 9 are printed with the measured values.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from memloc_tl import OrganismConfig, Paragraphs, build_organism
from memloc_tl.localization import (
    InjectionConfig,
    LearnedMaskConfig,
    deletion_benchmark,
    injection_benchmark,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny organism")
    parser.add_argument("--part", choices=["weights", "heads", "del", "all"], default="all")
    parser.add_argument("--seeds", type=int, default=3, help="injections per level")
    parser.add_argument("--paragraphs", type=int, default=2, help="paragraphs per injection")
    parser.add_argument("--learned-steps", type=int, default=150)
    args = parser.parse_args()
    pd.set_option("display.width", 160)
    organism = build_organism(OrganismConfig.tiny() if args.tiny else OrganismConfig())
    model = organism.model
    tiers = torch.tensor(organism.planted.meta["tier"])
    top = organism.planted.select(tiers == 0)
    # the KL keeps non-memorized and other memorized paragraphs (those DEL and damage use)
    keep = Paragraphs.concat(organism.control[:16], top[8:16])
    learned = LearnedMaskConfig(steps=args.learned_steps)
    seeds = list(range(args.seeds))
    general = organism.heldout[len(organism.heldout) // 2 :]
    cfg = model.cfg
    print(f"organism {organism.config.key()}: {cfg.n_layers} layers x {cfg.n_heads} heads")

    if args.part in ("weights", "all"):
        started = time.perf_counter()
        result = injection_benchmark(
            model,
            organism.heldout[: args.paragraphs],
            keep=keep,
            config=InjectionConfig(level="weights", fraction=0.01, max_steps=600),
            methods=["random", "magnitude", "oracle", "gradient", "grad_x_weight", "learned"],
            seeds=seeds,
            memorized=top[:8],
            general=general,
            learned=learned,
            progress=False,
        )
        print(f"\nINJ, weights (1% per paragraph), {time.perf_counter() - started:.0f} s")
        print(result.injections.to_string(index=False))
        summary = result.summary()
        print(summary.to_string(index=False))
        by = summary.set_index("method")["recall"]
        best = by.drop(["oracle", "magnitude", "random"]).max()
        print(f"goal: best localizer recall >= 0.50 -> {best:.3f}")
        print(f"goal: |w| recall within 2x of random -> {by['magnitude'] / by['random']:.2f}x")

    if args.part in ("heads", "all"):
        started = time.perf_counter()
        result = injection_benchmark(
            model,
            organism.heldout[: args.paragraphs],
            keep=keep,
            config=InjectionConfig(level="heads", max_steps=600),
            seeds=seeds,
            memorized=top[:8],
            learned=learned,
            progress=False,
        )
        print(f"\nINJ, heads (one head per paragraph), {time.perf_counter() - started:.0f} s")
        print(result.injections.to_string(index=False))
        summary = result.summary()
        print(summary.to_string(index=False))
        best = summary.drop(summary.index[summary["method"] == "random"])["top1"].max()
        print(f"goal: injected head ranked first in >= 90% of runs -> {best:.0%}")

    if args.part in ("del", "all"):
        started = time.perf_counter()
        result = deletion_benchmark(
            model,
            top[:4],
            others=top,
            non_memorized=organism.control[:16],
            methods=["gradient", "grad_x_weight", "learned", "random"],
            fraction=0.001,
            learned=learned,
            progress=False,
        )
        print(f"\nDEL, zero the top 0.1% of weights, {time.perf_counter() - started:.0f} s")
        print(result.summary().to_string(index=False))


if __name__ == "__main__":
    main()
