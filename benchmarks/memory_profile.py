"""Benchmark: what is alive at the memory peak of one sparse edit, by category and by origin.

Run by hand: ``python benchmarks/memory_profile.py --layout gpt-neo-125m --mask random``.
One warm-up edit, then one edit under ``torch.profiler`` (``profile_memory=True``). The
profiler's tensor timeline (every allocation and free that torch's allocator saw) is replayed
to find the moment the most bytes were allocated above the start, and the tensors alive then are
printed: summed by the profiler's category (parameter, gradient, autograd detail, ...) and, the
largest first, with the operator that allocated each and the memloc-tl frames above it. On the
CPU this tracked peak is what ``benchmarks/editing.py``'s resident-memory peak measures, less
what the C allocator keeps; compare the two in one run of each.

The timeline comes from ``torch.profiler._memory_profiler``, a private module of torch (2.13 here):
a torch release may change it, and then this benchmark, not the library, needs updating.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from common import add_subject_args, describe, load_subject, model_bytes
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action, MemoryProfile, TensorKey

from memloc_tl.editing import EditConfig, sparse_edit


def origins(profile_: MemoryProfile) -> dict[TensorKey, str]:
    """Each tensor's allocating operator, then the memloc-tl frames above it."""
    found: dict[TensorKey, str] = {}
    for event in profile_._op_tree.dfs():
        if event.typed[0] != _EventType.Allocation or event.typed[1].alloc_size <= 0:
            continue
        key = TensorKey.from_allocation(event.typed[1])
        if key is None:
            continue
        chain: list[str] = []
        parent = event.parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.parent
        ours = [name.split("memloc_tl/")[-1] for name in chain if "memloc_tl/" in name]
        found[key] = " < ".join(chain[:2] + ours)
    return found


def peak_tensors(profile_: MemoryProfile) -> tuple[int, dict[Any, int]]:
    """The most bytes allocated above the start at any moment, and the tensors alive then."""
    total = peak = 0
    live: dict[Any, int] = {}
    at_peak: dict[Any, int] = {}
    for _, action, (key, version), size in profile_.timeline:
        if action == Action.CREATE:
            total += size
            if isinstance(key, TensorKey) and version == 0:
                live[key] = size
        elif action == Action.DESTROY:
            total -= abs(size)
            live.pop(key, None)
        else:  # a mutation or a tensor from before the profile: no bytes allocated
            continue
        if total > peak:
            peak, at_peak = total, dict(live)
    return peak, at_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    add_subject_args(parser)
    parser.add_argument("--mask", choices=["gradient", "random", "all"], default="random")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=15, help="largest tensors to list")
    args = parser.parse_args()
    subject = load_subject(args)
    model = subject.model
    print(describe(subject))
    size = model_bytes(model)
    memorized, keep = subject.planted[:1], subject.control[:16]
    config = EditConfig(mask=args.mask, steps=args.steps, batch_size=16)
    sparse_edit(model, memorized, keep=keep, config=config, progress=False)  # warm-up
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        sparse_edit(model, memorized, keep=keep, config=config, progress=False)
    memory = MemoryProfile(prof.profiler.kineto_results)  # type: ignore[union-attr]
    peak, alive = peak_tensors(memory)
    print(
        f"\nsparse_edit, mask {args.mask!r}, {args.steps} steps: tracked peak above the loaded "
        f"model ({size / 2**20:.0f} MiB) {peak / 2**20:.1f} MiB = {peak / size:.2f} models"
    )
    by_category: Counter[str] = Counter()
    for key, nbytes in alive.items():
        category = memory._categories.get(key, 0)
        by_category["unknown" if category is None else category.name.lower()] += nbytes
    untracked = peak - sum(alive.values())
    if untracked:
        by_category["not a tensor the profiler names"] += untracked
    for category, nbytes in by_category.most_common():
        print(f"  {category:<34} {nbytes / 2**20:8.1f} MiB  {nbytes / size:5.3f} models")
    where = origins(memory)
    print(f"\nthe {args.top} largest tensors alive at the peak:")
    for key, nbytes in sorted(alive.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {nbytes / 2**20:8.1f} MiB  {where.get(key, '?')}")


if __name__ == "__main__":
    main()
