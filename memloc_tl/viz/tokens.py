"""Views of one paragraph's tokens.

circuitsvis views (attention patterns of chosen heads, tokens colored by a score) and a plotly
heatmap of the attention from one query position with every token labelled (circuitsvis's
attention charts skip labels when tokens are many).
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from memloc_tl.core.backend import HookedModel
from memloc_tl.core.heads import HeadRef
from memloc_tl.core.hooks import hook_name
from memloc_tl.viz.html import CircuitsView

CONTINUATION_MARK = "\u2502"
"""Put before the first continuation token's label: where the prefix ends."""


def _str_tokens(model: HookedModel, tokens: Tensor) -> list[str]:
    return [str(t) for t in model.to_str_tokens(tokens)]


def _labels(
    model: HookedModel,
    tokens: Tensor,
    *,
    rare_positions: Sequence[int] = (),
    prefix_len: int | None = None,
) -> list[str]:
    """Token labels: ``*`` before rare positions, the mark before the first continuation token."""
    labels = _str_tokens(model, tokens)
    marked = set(rare_positions)
    labels = [f"*{t}" if i in marked else t for i, t in enumerate(labels)]
    if prefix_len is not None and 0 < prefix_len < len(labels):
        labels[prefix_len] = CONTINUATION_MARK + labels[prefix_len]
    return labels


def _patterns(
    model: HookedModel, tokens: Tensor, refs: Sequence[HeadRef]
) -> Float[Tensor, "head query key"]:
    names = {hook_name("pattern", r.layer) for r in refs}
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens[None].to(model.cfg.device), names_filter=lambda n: n in names
        )
    return torch.stack([cache[hook_name("pattern", r.layer)][0, r.head] for r in refs]).cpu()


def attention_view(
    model: HookedModel,
    tokens: Tensor,
    heads: Sequence[HeadRef | str] = ("L1H2",),
    *,
    rare_positions: Sequence[int] = (),
    prefix_len: int | None = None,
) -> CircuitsView:
    """circuitsvis attention patterns of ``heads`` on one paragraph (``[pos]`` token ids).

    ``rare_positions`` are marked with a ``*`` in the token labels (e.g. the k rarest), and the
    first continuation token with a ``\u2502`` when ``prefix_len`` is given. The view renders
    offline (see :class:`~memloc_tl.viz.html.CircuitsView`). circuitsvis labels only some tokens
    of a long paragraph; :func:`attention_figure` labels every one.
    """
    _check_paragraph(tokens)
    refs = [HeadRef.parse(h).check(model.cfg) for h in heads]
    patterns = _patterns(model, tokens, refs)
    labels = _labels(model, tokens, rare_positions=rare_positions, prefix_len=prefix_len)
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


def attention_figure(
    model: HookedModel,
    tokens: Tensor,
    heads: Sequence[HeadRef | str] = ("L1H2",),
    *,
    query_pos: int,
    rare_positions: Sequence[int] = (),
) -> go.Figure:
    """Heatmap of each head's attention from ``query_pos`` to every earlier token, all labelled.

    One row per head, one column per key position ``0..query_pos``; rare positions are starred.
    The paper reads the attention from the last prefix position (49), where recall starts.
    """
    _check_paragraph(tokens)
    if not 0 <= query_pos < len(tokens):
        raise ValueError(f"query_pos must be in 0..{len(tokens) - 1}, got {query_pos}")
    refs = [HeadRef.parse(h).check(model.cfg) for h in heads]
    if not refs:
        raise ValueError("heads is empty; name at least one head, e.g. ['L1H2']")
    rows = _patterns(model, tokens, refs)[:, query_pos, : query_pos + 1]
    labels = _labels(model, tokens[: query_pos + 1], rare_positions=rare_positions)
    positions = list(range(query_pos + 1))
    figure = go.Figure(
        go.Heatmap(
            z=rows.tolist(),
            x=positions,
            y=[str(r) for r in refs],
            colorscale="Blues",
            zmin=0.0,
            colorbar={"title": {"text": f"attention from {query_pos}"}},
            customdata=[labels] * len(refs),
            hovertemplate="%{y} -> %{customdata} (position %{x}): %{z:.3f}<extra></extra>",
        )
    )
    figure.update_xaxes(
        tickmode="array", tickvals=positions, ticktext=labels, tickangle=-90, tickfont={"size": 9}
    )
    figure.update_yaxes(autorange="reversed")
    figure.update_layout(
        title=f"attention from position {query_pos} to each token (* = rare)",
        height=260 + 30 * len(refs),
    )
    return figure


def token_view(
    model: HookedModel,
    tokens: Tensor,
    values: Tensor | Sequence[float],
    *,
    title: str = "",
    prefix_len: int | None = None,
) -> CircuitsView:
    """circuitsvis tokens colored by a score per position (rarity, EM drop, gradient ...).

    ``values`` may be shorter than ``tokens`` (e.g. prefix scores): the rest are shown at 0;
    NaN is shown as 0. The color scale runs from white (0) to dark blue (the largest value) or
    dark red (the most negative one), the ends of plotly's RdBu scale that the figures use (a
    pure blue, circuitsvis's default, turns purple as it mixes with white); the title states
    both ends, as circuitsvis draws no legend.
    ``prefix_len`` marks the first continuation token with a ``\u2502``.
    """
    labels = _labels(model, tokens, prefix_len=prefix_len)
    values = torch.as_tensor(values, dtype=torch.float32).nan_to_num(0.0)
    padded = torch.zeros(len(labels))
    padded[: len(values)] = values[: len(labels)]
    low, high = min(float(padded.min()), 0.0), max(float(padded.max()), 0.0)
    scale = f"white = 0, dark blue = {high:.3g}" + (f", dark red = {low:.3g}" if low < 0 else "")
    if prefix_len is not None:
        scale += f"; {CONTINUATION_MARK} = start of the continuation"
    props = {
        "tokens": labels,
        "values": padded,
        "minValue": low,
        "maxValue": high or 1.0,
        "positiveColor": POSITIVE_COLOR,
        "negativeColor": NEGATIVE_COLOR,
    }
    return CircuitsView(
        "ColoredTokens", props, title=f"{title} ({scale})" if title else f"({scale})"
    )


POSITIVE_COLOR, NEGATIVE_COLOR = "#2166ac", "#b2182b"  # plotly RdBu's blue and red ends


def _check_paragraph(tokens: Tensor) -> None:
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one paragraph [pos], got shape {tuple(tokens.shape)}")


def rarity_view(
    model: HookedModel, tokens: Tensor, counts: Tensor, *, prefix_len: int | None = None
) -> CircuitsView:
    """Tokens colored by corpus rarity, ``-log10`` of the token's relative frequency.

    ``counts`` are corpus unigram counts (:func:`~memloc_tl.core.paragraphs.corpus_token_counts`);
    tokens never seen count as seen once.
    """
    _check_paragraph(tokens)
    if counts.ndim != 1 or int(tokens.max()) >= len(counts):
        raise ValueError(
            f"counts must be one count per vocabulary id (at least {int(tokens.max()) + 1}), "
            f"got shape {tuple(counts.shape)}"
        )
    counts = counts.double().clamp(min=1.0)
    rarity = -(counts[tokens.cpu()] / counts.sum()).log10()
    return token_view(
        model,
        tokens,
        rarity.float(),
        title="rarity (-log10 corpus frequency)",
        prefix_len=prefix_len,
    )
