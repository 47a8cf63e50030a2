"""Benchmark: a masked optimizer step vs a dense one, and sparse unlearning on the organism.

Run by hand: ``python benchmarks/editing.py [--tiny]``. Prints

- the time of one ``MaskedOptimizer`` Adam step (compact mode, the default, and restore mode)
  vs one plain Adam step on the same parameters and gradients (goal: at most 1.2x);
- peak memory (goal: one model plus two batches): a scan of 16 paragraphs, ``sparse_edit`` with
  each mask, and ``compare_edits`` of all three masks, as multiples of the model's own bytes;
- ``compare_edits`` on the organism: gradient 0.1% mask vs random 0.1% vs all weights, with the
  before/after EM of the unlearned paragraphs, held-out EM (against the original model's greedy
  continuation), KL to the original and corpus perplexity (paper Fig. 5 for GPT-Neo 125M:
  MP EM all 26.90, top-0.1% 26.75, random 49.80).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from collections.abc import Callable

import pandas as pd
import torch
from common import (
    Subject,
    add_subject_args,
    describe,
    exact_cpu_memory,
    load_subject,
    model_bytes,
    peak_memory,
    synchronize,
)
from tqdm.auto import tqdm

from memloc_tl import Paragraphs, scan_memorization
from memloc_tl.analysis.gradients import attributed_parameters
from memloc_tl.core.backend import HookedModel
from memloc_tl.editing import (
    EditConfig,
    EvalSets,
    MaskedOptimizer,
    ParamMask,
    compare_edits,
    sparse_edit,
)
from memloc_tl.editing.sparse_edit import MaskChoice


def step_time(optimizer: torch.optim.Optimizer | MaskedOptimizer, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        optimizer.step()
        synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def memory(subject: Subject, args: argparse.Namespace) -> None:
    """Peak memory of a scan and of the edits, over the bytes of one model, and their time."""
    model, device = subject.model, subject.model.cfg.device or "cpu"
    size = model_bytes(model)
    batch = subject.everything[:16]
    memorized, keep = subject.planted[:1], subject.control[:16]
    config = EditConfig(fraction=args.fraction, lr=args.lr, steps=2, batch_size=16)
    print(f"\npeak memory above the loaded model ({size / 2**20:.0f} MiB), in models:")

    def line(label: str, extra: int, seconds: float, note: str = "") -> None:
        print(
            f"  {label:<52} +{extra / 2**20:8.1f} MiB  {1 + extra / size:5.2f}x  "
            f"{seconds:7.1f} s  {note}"
        )

    def wanted(label: str) -> bool:
        return not args.rows or any(re.search(pattern, label) for pattern in args.rows)

    def timed(run: Callable[[], object]) -> tuple[int, object, float]:
        started = time.perf_counter()
        peak, value = peak_memory(run, device)
        return peak, value, time.perf_counter() - started

    if wanted("scan"):
        peak, _, seconds = timed(
            lambda: scan_memorization(model, batch, batch_size=16, progress=False)
        )
        line("scan, 16 paragraphs in one batch", peak, seconds)
    many = subject.control[: args.many_keep]
    runs: list[tuple[str, Paragraphs, dict[str, object]]] = [
        (f"mask {mask!r}", keep, {"mask": mask}) for mask in ("gradient", "random", "all")
    ]
    runs += [
        (
            "mask 'random', checkpoint_blocks=False",
            keep,
            {"mask": "random", "checkpoint_blocks": False},
        ),
        (
            "mask 'random', kl_reference='stored'",
            keep,
            {"mask": "random", "kl_reference": "stored"},
        ),
        (f"mask 'random', {len(many)} keep paragraphs", many, {"mask": "random"}),
        (
            f"mask 'random', {len(many)} keep, kl_reference='stored'",
            many,
            {"mask": "random", "kl_reference": "stored"},
        ),
    ]
    for label, keep_set, changes in runs:
        if not wanted(f"sparse_edit, {label}"):
            continue
        run = dataclasses.replace(config, **changes)  # type: ignore[arg-type]
        peak, result, seconds = timed(
            lambda run=run, keep_set=keep_set: sparse_edit(
                model, memorized, keep=keep_set, config=run, progress=False
            )
        )
        held = sum(
            v.numel() * v.element_size()
            for side in (result.edit.before, result.edit.after)  # type: ignore[attr-defined]
            for v in side.values()
        )
        line(f"sparse_edit, {label}", peak, seconds, f"(result holds {held / size:.3f})")
    cases: tuple[tuple[str, tuple[MaskChoice, ...]], ...] = (
        ("compare_edits, all three masks", ("gradient", "random", "all")),
        ("compare_edits, gradient and random masks", ("gradient", "random")),
    )
    for label, masks in cases:
        if wanted(label):
            peak, _, seconds = timed(
                lambda masks=masks: compare_edits(
                    model, memorized, keep=keep, masks=masks, config=config, progress=False
                )
            )
            line(label, peak, seconds, "(goal <= 1.5x)")
    print(
        "  unavoidable for a mask of all weights: gradients (1x the attributed matrices), Adam's "
        "two moments (2x) and the result's before/after values (2x) of the attributed matrices"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    add_subject_args(parser)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--fraction", type=float, default=0.001)
    parser.add_argument(
        "--many-keep",
        type=int,
        default=64,
        metavar="N",
        help="keep paragraphs of the memory rows that show how a stored reference grows",
    )
    parser.add_argument(
        "--per-paragraph",
        type=int,
        default=0,
        metavar="N",
        help="also run the paper's protocol: N runs, one memorized paragraph each",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        metavar="TEXT",
        help="measure only the memory rows whose label one of these regular expressions "
        "matches (re.search: \"mask 'random'$\" is that row alone), then stop",
    )
    args = parser.parse_args()
    if "cuda" not in str(args.device):
        exact_cpu_memory()  # before anything is allocated: the peaks below are then exact
    subject = load_subject(args)
    model = subject.model
    print(describe(subject))
    memory(subject, args)  # first, before the step timing below allocates copies of the weights
    if args.rows:
        return

    params = attributed_parameters(model)
    mask = ParamMask.random(model, fraction=args.fraction, seed=0)

    def optimizers(masked: str | None) -> torch.optim.Optimizer | MaskedOptimizer:
        copies = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
        generator = torch.Generator().manual_seed(0)
        for name, p in copies.items():
            # the same gradients for both: zero outside the mask, as the reference code left them
            noise = torch.randn(p.shape, generator=generator).to(p.device)
            p.grad = noise * 1e-3 * mask.boolean(name).to(p.device)
        adam = torch.optim.Adam(list(copies.values()), lr=1e-5)
        if masked is None:
            return adam
        return MaskedOptimizer(
            adam,
            {copies[n]: s for n, s in mask.selections.items()},
            mode=masked,  # type: ignore[arg-type]
        )

    dense, compact, restore = optimizers(None), optimizers("compact"), optimizers("restore")
    for optimizer in (dense, compact, restore):
        step_time(optimizer, 3)
    t_dense, t_compact, t_restore = (step_time(o, 30) for o in (dense, compact, restore))
    n_weights = sum(p.numel() for p in params.values())
    print(f"{n_weights} attributed weights, mask {mask.count}; same gradients (zero outside)")
    print(f"dense Adam step                     {t_dense * 1e3:8.3f} ms")
    print(f"masked Adam step, compact (default) {t_compact * 1e3:8.3f} ms")
    print(f"masked Adam step, restore           {t_restore * 1e3:8.3f} ms")
    print(f"compact / dense = {t_compact / t_dense:6.2f}x   (goal <= 1.2)")
    print(f"restore / dense = {t_restore / t_dense:6.2f}x   (any optimizer, e.g. L-BFGS)")

    organism = subject.organism
    if organism is None:
        return  # random weights: nothing memorized to unlearn
    scan = scan_memorization(model, subject.everything, progress=False)
    memorized, non_memorized = scan.memorized()[:8], scan.non_memorized()
    table, _ = compare_edits(
        model,
        memorized,
        keep=non_memorized[:16],
        config=EditConfig(fraction=args.fraction, lr=args.lr, steps=10),
        evaluate_on=EvalSets(heldout=non_memorized[16:48], general=organism.heldout),
        progress=False,
    )
    print(f"\nsparse unlearning, 8 memorized paragraphs, lr {args.lr}, 10 Adam steps:")
    pivot = table.pivot_table(index=["mask", "set", "metric"], values=["before", "after"])
    print(pivot[["before", "after"]].round(3).to_string())
    if args.per_paragraph:
        per_paragraph(model, scan.memorized(), non_memorized, organism.heldout, args)


def per_paragraph(
    model: HookedModel,
    memorized: Paragraphs,
    non_memorized: Paragraphs,
    general: Paragraphs,
    args: argparse.Namespace,
) -> None:
    """The paper's protocol: one memorized paragraph per run, averaged over runs (Fig. 5)."""
    n = min(args.per_paragraph, len(memorized))
    rows = []
    for i in tqdm(range(n), desc="runs"):
        table, _ = compare_edits(
            model,
            memorized[i : i + 1],
            keep=non_memorized[:16],
            masks=("gradient", "random"),
            config=EditConfig(fraction=args.fraction, lr=args.lr, steps=10, seed=i),
            evaluate_on=EvalSets(heldout=non_memorized[16:48], general=general),
            progress=False,
        )
        rows.append(table.assign(run=i))
    runs = pd.concat(rows, ignore_index=True)
    mean = runs.pivot_table(index=["mask", "set", "metric"], values=["before", "after"])
    print(f"\nthe paper's protocol: {n} runs of one memorized paragraph each, lr {args.lr}:")
    print(mean[["before", "after"]].round(3).to_string())
    print("paper (GPT-Neo 125M), memorized EM after: top-0.1% 26.75, random 0.1% 49.80")


if __name__ == "__main__":
    main()
