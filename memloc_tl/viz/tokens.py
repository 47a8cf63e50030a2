"""circuitsvis views: attention patterns of chosen heads, and tokens colored by a score."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from memloc_tl.backend import HookedModel
from memloc_tl.heads import HeadRef
from memloc_tl.hooks import hook_name
from memloc_tl.viz.html import CircuitsView


def _str_tokens(model: HookedModel, tokens: Tensor) -> list[str]:
    return [str(t) for t in model.to_str_tokens(tokens)]


def attention_view(
    model: HookedModel,
    tokens: Tensor,
    heads: Sequence[HeadRef | str] = ("L1H2",),
    *,
    rare_positions: Sequence[int] = (),
) -> CircuitsView:
    """circuitsvis attention patterns of ``heads`` on one paragraph (``[pos]`` token ids).

    ``rare_positions`` are marked with a ``*`` in the token labels (e.g. the k rarest). The view
    renders offline (see :class:`~memloc_tl.viz.html.CircuitsView`).
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
    return CircuitsView(
        "AttentionHeads",
        {
            "attention": patterns,
            "tokens": labels,
            "attentionHeadNames": [str(r) for r in refs],
            "maskUpperTri": True,
        },
        title="attention of " + ", ".join(map(str, refs)),
    )


def token_view(
    model: HookedModel,
    tokens: Tensor,
    values: Tensor | Sequence[float],
    *,
    title: str = "",
) -> CircuitsView:
    """circuitsvis tokens colored by a score per position (rarity, EM drop, gradient ...).

    ``values`` may be shorter than ``tokens`` (e.g. prefix scores): the rest are shown at 0;
    NaN is shown as 0.
    """
    labels = _str_tokens(model, tokens)
    values = torch.as_tensor(values, dtype=torch.float32).nan_to_num(0.0)
    padded = torch.zeros(len(labels))
    padded[: len(values)] = values[: len(labels)]
    return CircuitsView("ColoredTokens", {"tokens": labels, "values": padded}, title=title)


def rarity_view(model: HookedModel, tokens: Tensor, counts: Tensor) -> CircuitsView:
    """Tokens colored by corpus rarity, ``-log10`` of the token's relative frequency.

    ``counts`` are corpus unigram counts (:func:`~memloc_tl.paragraphs.corpus_token_counts`);
    tokens never seen count as seen once.
    """
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one paragraph [pos], got shape {tuple(tokens.shape)}")
    if counts.ndim != 1 or int(tokens.max()) >= len(counts):
        raise ValueError(
            f"counts must be one count per vocabulary id (at least {int(tokens.max()) + 1}), "
            f"got shape {tuple(counts.shape)}"
        )
    counts = counts.double().clamp(min=1.0)
    rarity = -(counts[tokens.cpu()] / counts.sum()).log10()
    return token_view(model, tokens, rarity.float(), title="rarity (-log10 corpus frequency)")
