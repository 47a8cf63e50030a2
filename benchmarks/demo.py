"""Benchmark: how long a new user waits for ``memloc demo``, first run and cached.

Run by hand on an otherwise idle machine: ``python benchmarks/demo.py [--tiny]``. Runs
``memloc demo`` twice in a fresh process each, with an empty temporary cache: the first run builds
the organism, the second loads it. Prints both wall times (the numbers the README states), the
build time the demo reports, and cached / first.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny organism")
    args = parser.parse_args()
    seconds = []
    with tempfile.TemporaryDirectory() as cache:
        command = [sys.executable, "-m", "memloc_tl", "demo", "--cache-dir", cache]
        command += ["--tiny"] if args.tiny else []
        for run in ("first (builds the organism)", "second (cached)"):
            started = time.perf_counter()
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            seconds.append(time.perf_counter() - started)
            print(f"memloc demo, {run:28s} {seconds[-1]:7.1f} s")
        built = re.search(r"built in ([0-9.]+) s", done.stdout)
        if built:
            print(f"organism build (as the demo reports)    {float(built[1]):7.1f} s")
    print(f"cached / first = {seconds[1] / seconds[0]:5.2f}x")


if __name__ == "__main__":
    main()
