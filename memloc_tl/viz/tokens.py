"""circuitsvis views: attention patterns of chosen heads, and tokens colored by a score."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import circuitsvis.attention
import circuitsvis.tokens
import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from memloc_tl.heads import HeadRef
from memloc_tl.hooks import hook_name


def _str_tokens(model: HookedTransformer, tokens: Tensor) -> list[str]:
    return [str(t) for t in model.to_str_tokens(tokens)]


def attention_view(
    model: HookedTransformer,
    tokens: Tensor,
    heads: Sequence[HeadRef | str] = ("L1H2",),
    *,
    rare_positions: Sequence[int] = (),
) -> Any:
    """circuitsvis attention patterns of ``heads`` on one paragraph (``[pos]`` token ids).

    ``rare_positions`` are marked with a ``*`` in the token labels (e.g. the k rarest).
    """
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one paragraph [pos], got shape {tuple(tokens.shape)}")
    refs = [HeadRef.parse(h).check(model.cfg) for h in heads]
    names = {hook_name("pattern", r.layer) for r in refs}
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens[None].to(model.cfg.device), names_filter=lambda n: n in names
        )
    patterns = torch.stack([cache[hook_name("pattern", r.layer)][0, r.head] for r in refs]).cpu()
    labels = _str_tokens(model, tokens)
    marked = set(rare_positions)
    labels = [f"*{t}" if i in marked else t for i, t in enumerate(labels)]
    return circuitsvis.attention.attention_heads(
        attention=patterns, tokens=labels, attention_head_names=[str(r) for r in refs]
    )


def token_view(model: HookedTransformer, tokens: Tensor, values: Tensor | Sequence[float]) -> Any:
    """circuitsvis tokens colored by a score per position (rarity, EM drop, gradient ...).

    ``values`` may be shorter than ``tokens`` (e.g. prefix scores): the rest are shown at 0;
    NaN is shown as 0.
    """
    labels = _str_tokens(model, tokens)
    values = torch.as_tensor(values, dtype=torch.float32).nan_to_num(0.0)
    padded = torch.zeros(len(labels))
    padded[: len(values)] = values[: len(labels)]
    return circuitsvis.tokens.colored_tokens(tokens=labels, values=padded)
