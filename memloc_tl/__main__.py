"""``python -m memloc_tl``: the same as the ``memloc`` command."""

from memloc_tl.cli import main

raise SystemExit(main())
