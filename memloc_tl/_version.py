__version__ = "0.2.0"
"""The version of memloc-tl (the single source: pyproject.toml reads it from here)."""
