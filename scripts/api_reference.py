"""Write docs/api.md, the API reference, from the public names and their docstrings.

python scripts/api_reference.py          # rewrite docs/api.md
python scripts/api_reference.py --check  # exit 1 if docs/api.md is out of date (tested)
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

import memloc_tl
import memloc_tl.core.backend
import memloc_tl.viz

OUT = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def _summary(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.split("\n\n")[0].replace("\n", " ").strip()


def _signature(name: str, obj: object) -> str:
    try:
        signature = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return name
    # annotations are strings (postponed evaluation): show them without their quotes
    signature = re.sub(r"(: |-> )'([^']*)'", r"\1\2", signature)
    signature = re.sub(r'(: |-> )"([^"]*)"', r"\1\2", signature)
    return f"{name}{signature}"


def _members(cls: type) -> list[str]:
    names = []
    for member, value in vars(cls).items():
        if member.startswith("_") or member in getattr(cls, "__dataclass_fields__", {}):
            continue
        if callable(value) or isinstance(value, property | classmethod | staticmethod):
            names.append(member)
    return sorted(names)


def _entry(name: str, obj: object) -> list[str]:
    module = getattr(obj, "__module__", "")
    lines = []
    if inspect.isclass(obj):
        kind = "dataclass" if dataclasses.is_dataclass(obj) else "class"
        lines.append(f"### `{name}` ({kind}, `{module}`)")
        lines.append("")
        lines.append(f"```python\n{_signature(name, obj)}\n```")
        # members of others' classes (torch's Module) depend on what else was imported
        members = _members(obj) if module.startswith("memloc_tl") else []
        if members:
            lines.append("")
            lines.append("Members: " + ", ".join(f"`{m}`" for m in members))
    elif callable(obj):
        lines.append(f"### `{name}` (`{module}`)")
        lines.append("")
        lines.append(f"```python\n{_signature(name, obj)}\n```")
    else:
        lines.append(f"### `{name}`")
        lines.append("")
        lines.append(f"Value: `{obj!r}`")
    summary = _summary(obj) if (inspect.isclass(obj) or callable(obj)) else ""
    if summary:
        lines.append("")
        lines.append(summary)
    lines.append("")
    return lines


def _section(title: str, module: ModuleType, prefix: str) -> list[str]:
    lines = [f"## {title}", ""]
    for name in sorted(module.__all__, key=str.lower):
        if name.startswith("__"):
            continue
        lines.extend(_entry(f"{prefix}{name}", getattr(module, name)))
    return lines


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python scripts/api_reference.py`; a test checks that it",
        "is current. Every name below is importable from `memloc_tl` (or `memloc_tl.viz`,",
        "`memloc_tl.core.backend`).",
        "The pages per analysis explain when to use what: see [the index](index.md).",
        "",
    ]
    lines += _section("memloc_tl", memloc_tl, "")
    lines += _section("memloc_tl.viz", memloc_tl.viz, "viz.")
    lines += _section("memloc_tl.core.backend", memloc_tl.core.backend, "backend.")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that it is current")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run python scripts/api_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
