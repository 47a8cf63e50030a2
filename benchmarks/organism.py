"""Benchmark: how long the default organism takes to build (goal: at most 6 minutes on 2 cores).

Run by hand on an otherwise idle machine: ``python benchmarks/organism.py``. Builds into a
temporary cache (never the user's), prints the wall time against the goal, and the build's
acceptance report.
"""

from __future__ import annotations

import json
import tempfile
import time

import torch

from memloc_tl import OrganismConfig, build_organism

GOAL_SECONDS = 6 * 60


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        organism = build_organism(OrganismConfig(), cache_dir=cache, progress=False)
        seconds = time.perf_counter() - started
    print(f"torch threads {torch.get_num_threads()}")
    print(
        f"default build {seconds:7.1f} s; goal {GOAL_SECONDS} s; ratio {seconds / GOAL_SECONDS:.2f}"
    )
    print(json.dumps(organism.report["acceptance"]))


if __name__ == "__main__":
    main()
