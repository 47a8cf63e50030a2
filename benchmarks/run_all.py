"""Every speed benchmark in one go: the ratios each prints, gathered in one table.

Run by hand, e.g. on a GPU machine::

    python benchmarks/run_all.py --device cuda --layout organism
    python benchmarks/run_all.py --device cuda --layout gpt-neo-125m --large-batches --out r.md

Each benchmark runs as its own process (so one failing does not stop the others) with the same
``--device``, ``--layout`` and ``--tiny``; its full output is echoed, and every line of the form
``name = 1.23x ...`` is collected into the summary. Ratios compare two timings of one process
on one machine, so they are comparable across runs; absolute seconds are not.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS: dict[str, list[str]] = {
    "scan": [],
    "patching": [],
    "perturbation": [],
    "gradients": [],
    "editing": [],
    "backends": [],
    "corpus": [],
    "precision": [],
    "startup": ["--repeats", "3"],
}
MODEL_FREE = {"startup"}
"""Benchmarks that load no model (no --device / --layout)."""
LARGE_BATCHES: dict[str, list[str]] = {
    "scan": ["--batch-size", "256"],
    "patching": ["--batch-size", "32"],
    "perturbation": ["--batch-size", "512", "--generate-batch-size", "512"],
    "gradients": ["--batch-size", "64"],
    "editing": [],
    "backends": [],
    "corpus": [
        "--windows",
        "2048",
        "--batch-size",
        "256",
        "--prefix-len",
        "32",
        "--continuation-len",
        "32",
    ],
    "precision": ["--batch-size", "256"],
    "startup": [],
}
"""Batch sizes that keep a GPU busy (GPT-Neo 125M fits these in well under 40 GB)."""
RATIO = re.compile(r"^(?P<name>[^=]+?)\s*=\s*(?P<value>[0-9.]+)x(?P<rest>.*)$")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--device", default=None, help="passed on (default: cuda if available)")
    parser.add_argument(
        "--layout", choices=["organism", "gpt-neo-125m", "gpt2-124m"], default="organism"
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny organism (a quick check)")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per benchmark")
    parser.add_argument(
        "--large-batches", action="store_true", help="GPU-sized batches (see LARGE_BATCHES)"
    )
    parser.add_argument("--out", type=Path, help="also write the summary as a Markdown table")
    args = parser.parse_args()

    common = ["--layout", args.layout] + (["--tiny"] if args.tiny else [])
    if args.device:
        common += ["--device", args.device]
    rows: list[tuple[str, str, str, str]] = []
    for name in args.only or BENCHMARKS:
        shared = [] if name in MODEL_FREE else common
        command = [sys.executable, str(HERE / f"{name}.py"), *shared, *BENCHMARKS[name]]
        if args.large_batches:
            command += LARGE_BATCHES[name]
        print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
        started = time.perf_counter()
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=args.timeout, check=False
            )
        except subprocess.TimeoutExpired:
            rows.append((name, "timed out", f"after {args.timeout:.0f} s", ""))
            continue
        print(done.stdout, end="")
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            rows.append((name, "failed", f"exit code {done.returncode}", ""))
            continue
        for line in done.stdout.splitlines():
            if match := RATIO.match(line.strip()):
                rest = match["rest"].strip()
                rows.append((name, match["name"].strip(), match["value"] + "x", rest))
        print(f"({time.perf_counter() - started:.0f} s)")

    header = ("benchmark", "ratio", "value", "goal")
    table = [header, ("---",) * 4, *rows]
    markdown = "\n".join("| " + " | ".join(row) + " |" for row in table)
    print("\n" + markdown)
    if args.out is not None:
        args.out.write_text(markdown + "\n")


if __name__ == "__main__":
    main()
