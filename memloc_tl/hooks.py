"""Hook names and hook factories. Hooks are registered only inside ``model.hooks(...)`` scopes."""

from __future__ import annotations

from transformer_lens.utils import get_act_name


def hook_name(kind: str, layer: int) -> str:
    """TransformerLens hook name: ``hook_name("pattern", 1) == "blocks.1.attn.hook_pattern"``."""
    if layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")
    return get_act_name(kind, layer)
