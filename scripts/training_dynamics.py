"""The default organism over training: when each planted tier became memorized, and the
rare-token head at each checkpoint (the numbers of docs/training-dynamics.md).

    python scripts/training_dynamics.py            # the default organism (built if needed)
    python scripts/training_dynamics.py --tiny     # the small test organism
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

from memloc_tl import (
    OrganismConfig,
    PerturbConfig,
    build_organism,
    localize_over_checkpoints,
    mask_drift,
    perturb_prefixes,
    rare_token_attention,
    scan_checkpoints,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the small test organism")
    args = parser.parse_args()
    organism = build_organism(OrganismConfig.tiny() if args.tiny else OrganismConfig())
    series = organism.checkpoints
    print(f"{series.name}: checkpoints at steps {list(series.steps)}")
    started = time.perf_counter()
    timeline = scan_checkpoints(series, organism.planted, progress=False)
    print(
        f"scan of {len(organism.planted)} planted paragraphs x {len(series)} checkpoints: "
        f"{time.perf_counter() - started:.1f} s"
    )
    tiers = torch.tensor(organism.planted.meta["tier"])
    first = timeline.first_memorized_step()
    for tier, (count, repetitions) in enumerate(organism.config.planted_tiers):
        columns = (tiers == tier).nonzero().flatten()
        mean_em = timeline.exact_match[:, columns].float().mean(1)
        share = timeline.memorized[:, columns].float().mean(1)
        steps = [first[organism.planted.ids[int(j)]] for j in columns]
        reached = sorted(s for s in steps if s is not None)
        print(
            f"tier {tier} ({count} paragraphs x{repetitions}/epoch): mean EM per step "
            f"{[round(float(e), 1) for e in mean_em]}, memorized share "
            f"{[round(float(s), 2) for s in share]}; first memorized at "
            f"{dict(Counter(reached))} ({len(steps) - len(reached)} never)"
        )
    events = timeline.forgetting_events()
    print(f"forgetting events: {len(events)} {events[:10]}")
    # the rare-token head at every checkpoint, on the paragraphs memorized at the end
    final = timeline.memorized[-1]
    memorized = organism.planted.select(final)
    for checkpoint in series:
        model = checkpoint.load()
        rare = rare_token_attention(model, memorized, organism.corpus_counts, progress=False)
        ranking = rare.bootstrap(200, seed=0)
        (head, tau), *_ = rare.top(1)
        print(
            f"step {checkpoint.step}: rare-token head {head} (tau {tau:.2f}); {ranking.verdict()}"
        )
        del model
    final_timeline = scan_checkpoints(series, memorized, progress=False)
    for analysis in ("zero_ablation", "rare_tokens"):
        heads = localize_over_checkpoints(
            series,
            memorized,
            analysis=analysis,
            corpus_counts=organism.corpus_counts,
            progress=False,
        )
        print(heads.answer(final_timeline))
    # patching from the PMPs found on the final model, the same inputs at every step (the
    # report's section 9: its first 8 memorized paragraphs)
    started = time.perf_counter()
    targets = memorized[:8]
    pmp = perturb_prefixes(
        organism.model, targets, config=PerturbConfig(em_against="greedy"), progress=False
    ).perturbed
    assert pmp is not None
    patched = localize_over_checkpoints(
        series, targets, analysis="patching", source=pmp, progress=False
    )
    print(patched.answer(scan_checkpoints(series, targets, progress=False)))
    print(f"patching over checkpoints (8 paragraphs): {time.perf_counter() - started:.1f} s")
    drift = mask_drift(series, memorized, progress=False)  # the paper's gradient, top 0.1%
    print(drift.to_frame().to_string(index=False))


if __name__ == "__main__":
    main()
