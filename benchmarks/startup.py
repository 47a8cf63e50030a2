"""Benchmark: how long ``memloc --help`` and ``import memloc_tl`` take (goal: --help < 3 s).

Run by hand: ``python benchmarks/startup.py [--repeats 5]``. Each command runs in a fresh
process; the best of the repeats is printed, beside a bare ``python -c pass`` measured in the
same run (so the ratio shows what memloc-tl adds to the interpreter's own start).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "memloc --help": [sys.executable, "-m", "memloc_tl", "--help"],
    "import memloc_tl": [sys.executable, "-c", "import memloc_tl"],
    "first analyzer use (loads torch)": [
        sys.executable,
        "-c",
        "import memloc_tl; memloc_tl.scan_memorization",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    best: dict[str, float] = {}
    for name, command in COMMANDS.items():
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times.append(time.perf_counter() - started)
        best[name] = min(times)
        print(f"{name:36s} {best[name]:7.3f} s")
    print(f"--help / bare python = {best['memloc --help'] / best['python -c pass']:6.2f}x")
    print(f"memloc --help {best['memloc --help']:.2f} s   (goal < 3 s)")


if __name__ == "__main__":
    main()
