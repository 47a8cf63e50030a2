"""INJ and DEL on the organism: does each localizer find where a paragraph is? (run by hand)

    python benchmarks/localization.py                      # default organism, every part
    python benchmarks/localization.py --tiny --part heads  # quick
    python benchmarks/localization.py --part cli --seeds 2  # time of `memloc localize-benchmark`
    python benchmarks/localization.py --part edit --paragraphs 4 --edit-lr 3e-2 1e-2 5e-3

Prints, per localizer, the recall of the injected units (weights: at the injected count and at
0.1%; heads: the share of runs with the injected head first) beside the random, |w| and |delta
w| baselines (neurons: the injected neurons among the top ones), each localizer's cost as a ratio
to one forward+backward of the target, the DEL specificity, and the edit specificity of sparse
unlearning at each ``--edit-lr``. The goals of issue 9 are printed with the measured values.
"""

from __future__ import annotations

import argparse
import itertools
import time
import typing

import pandas as pd

from memloc_tl import EditConfig, EvalSets, OrganismConfig, Paragraphs, build_organism, sparse_edit
from memloc_tl.localization import (
    BenchmarkConfig,
    DeletionConfig,
    InjectionBenchmark,
    InjectionConfig,
    LearnedMaskConfig,
    LocalizeConfig,
)
from memloc_tl.localization.benchmark import organism_benchmark, organism_sets
from memloc_tl.workbench import ORGANISM_EDIT_LR


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny organism")
    parser.add_argument(
        "--part",
        choices=["weights", "heads", "neurons", "del", "edit", "cli", "all"],
        default="all",
    )
    parser.add_argument("--seeds", type=int, default=2, help="injections per level")
    parser.add_argument("--paragraphs", type=int, default=2, help="paragraphs per injection")
    parser.add_argument("--learned-steps", type=int, default=150)
    parser.add_argument(
        "--edit-lr",
        type=float,
        nargs="+",
        default=[ORGANISM_EDIT_LR],
        help="edit part: learning rates of the sparse unlearning (one run each)",
    )
    args = parser.parse_args()
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 30)
    organism = build_organism(OrganismConfig.tiny() if args.tiny else OrganismConfig())
    cfg = organism.model.cfg
    print(f"organism {organism.config.key()}: {cfg.n_layers} layers x {cfg.n_heads} heads")
    settings = LocalizeConfig(learned=LearnedMaskConfig(steps=args.learned_steps))
    seeds = tuple(range(args.seeds))

    def localizers(methods: tuple[str, ...] | None = None) -> BenchmarkConfig:
        return BenchmarkConfig(methods=methods, seeds=seeds, localize=settings)

    damage = ["seed", "steps", "em_after", "abs_w_before", "abs_w_after"]
    damage += ["memorized_mean_em_before", "memorized_mean_em_after"]

    if args.part in ("cli", "all"):
        # what `memloc localize-benchmark` runs with its defaults, one seed at a time
        for seed in range(args.seeds):
            started = time.perf_counter()
            result = organism_benchmark(
                organism, level="weights", benchmark=BenchmarkConfig(seeds=(seed,)), progress=False
            )
            assert isinstance(result, InjectionBenchmark)
            row = result.injections.iloc[0]
            seconds = time.perf_counter() - started
            print(
                f"\nCLI default INJ (weights, 2 paragraphs, every localizer), seed {seed}: "
                f"{seconds:.0f} s; succeeded {row['succeeded']}, damaging {row['damaging']} "
                f"(memorized EM drop {row['memorized_em_drop']:.1f}, perplexity "
                f"x{row['perplexity_ratio']:.2f})"
            )
            print(f"goal: one seed <= 300 s on the CPU -> {seconds:.0f} s")

    if args.part in ("weights", "all"):
        started = time.perf_counter()
        result = organism_benchmark(
            organism,
            kind="inj",
            level="weights",
            n_paragraphs=args.paragraphs,
            config=InjectionConfig(fraction=0.01, max_steps=400),
            benchmark=localizers(
                ("random", "magnitude", "oracle", "gradient", "grad_x_weight", "learned")
            ),
            progress=False,
        )
        assert isinstance(result, InjectionBenchmark)
        print(f"\nINJ, weights (1% per paragraph), {time.perf_counter() - started:.0f} s")
        print(result.injections[[*damage, "general_perplexity_before", "general_perplexity_after"]])
        summary = result.summary().drop(columns=["top1", "mean_rank"])
        print(summary.to_string(index=False, float_format="{:.4f}".format))
        by = summary.set_index("method")["recall"]
        best = by.drop(["oracle", "magnitude", "random"]).max()
        print(f"goal: best localizer recall at 1% >= 0.50 -> {best:.3f}")
        print(f"goal: |w| recall within 2x of random -> {by['magnitude'] / by['random']:.1f}x")

    if args.part in ("heads", "all"):
        started = time.perf_counter()
        result = organism_benchmark(
            organism,
            kind="inj",
            level="heads",
            n_paragraphs=args.paragraphs,
            benchmark=localizers(),
            progress=False,
        )
        assert isinstance(result, InjectionBenchmark)
        print(f"\nINJ, heads (one head per paragraph), {time.perf_counter() - started:.0f} s")
        print(result.injections[damage])
        summary = result.summary().drop(columns=["recall_at_0_1"])
        print(summary.to_string(index=False, float_format="{:.3f}".format))
        ranked = summary[summary["method"] != "random"]
        print(f"goal: injected head first in >= 90% of runs -> {ranked['top1'].max():.0%}")

    if args.part in ("neurons", "all"):
        started = time.perf_counter()
        result = organism_benchmark(
            organism,
            kind="inj",
            level="neurons",
            n_paragraphs=args.paragraphs,
            benchmark=localizers(),
            progress=False,
        )
        assert isinstance(result, InjectionBenchmark)
        n = InjectionConfig().n_neurons
        print(f"\nINJ, neurons ({n} per paragraph), {time.perf_counter() - started:.0f} s")
        print(result.injections[damage])
        summary = result.summary()
        print(summary.to_string(index=False, float_format="{:.3f}".format))
        by = summary.set_index("method")["recall"]
        print(f"best localizer recall of the injected neurons -> {by.drop('random').max():.3f}")

    if args.part in ("del", "all"):
        started = time.perf_counter()
        result = organism_benchmark(
            organism,
            kind="del",
            level="weights",
            n_paragraphs=args.paragraphs,
            config=DeletionConfig(fraction=0.001),
            benchmark=BenchmarkConfig(
                methods=("gradient", "grad_x_weight", "learned", "random"), localize=settings
            ),
            progress=False,
        )
        print(f"\nDEL, zero the top 0.1% of weights, {time.perf_counter() - started:.0f} s")
        print(result.summary().to_string(index=False, float_format="{:.3f}".format))

    if args.part in ("edit", "all"):
        # Sparse unlearning of one memorized paragraph (0.1% gradient mask, the paper's
        # one-paragraph protocol) with the KL on non-memorized paragraphs only (the paper) and
        # with the other memorized paragraphs in the KL set too.
        sets = organism_sets(organism)
        others = sets.memorized[args.paragraphs :]
        rows = []
        for i, lr in itertools.product(range(args.paragraphs), args.edit_lr):
            for keep_name, keep in (
                ("non-memorized", sets.non_memorized),
                ("+ other memorized", Paragraphs.concat(sets.non_memorized, others)),
            ):
                result = sparse_edit(
                    organism.model,
                    sets.memorized[i : i + 1],
                    keep=keep,
                    config=EditConfig(fraction=0.001, steps=10, lr=lr),
                    evaluate_on=EvalSets(others=others, general=sets.general),
                    progress=False,
                )
                target = result.metric("edited", "mean_em")
                kept = result.metric("others", "mean_em")
                ppl = result.metric("general", "perplexity")
                rows.append(
                    {
                        "target": i,
                        "lr": lr,
                        "keep": keep_name,
                        "target_em": target[1],
                        "others_em": kept[1],
                        "others_em_before": kept[0],
                        "perplexity_rise": ppl[1] / ppl[0] - 1,
                    }
                )
        frame = pd.DataFrame(rows)
        print("\nsparse unlearning, 0.1% gradient mask, 10 steps, one paragraph per run")
        means = typing.cast(pd.DataFrame, frame.groupby(["lr", "keep"]).mean(numeric_only=True))
        print(means.drop(columns="target"))
        print("goal: target EM <= 10, others mean EM >= 45, perplexity rise <= 2%")


if __name__ == "__main__":
    main()
