"""plotly figures: head heatmaps, layer x component maps, EM drop per position, edit comparison."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from memloc_tl.analysis.gradients import GradientComparison
    from memloc_tl.analysis.patching import HeadIntervention
    from memloc_tl.analysis.perturbation import PrefixPerturbation
    from memloc_tl.checkpoints import HeadTimeline, MaskDrift, MemorizationTimeline
    from memloc_tl.core.results import HeadScores, LayerComponentScores, TokenScores
    from memloc_tl.editing.sparse_edit import EditResult
    from memloc_tl.localization.injection import Injection
    from memloc_tl.localization.units import Localization
    from memloc_tl.memorization import MemorizationScan
    from memloc_tl.uncertainty import HeadRanking


def _wrapped(name: str, width: int = 14) -> str:
    """A colorbar title: the whole score name, broken into lines that fit beside the plot."""
    lines: list[str] = []
    for word in name.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "<br>".join(lines)


def head_scores_figure(scores: HeadScores, *, title: str | None = None) -> go.Figure:
    """Heatmap of one score per head: layers down, heads across, labelled ``L1H2``."""
    n_layers, n_heads = scores.scores.shape
    labels = [[f"L{layer}H{head}" for head in range(n_heads)] for layer in range(n_layers)]
    figure = go.Figure(
        go.Heatmap(
            z=scores.scores.tolist(),
            x=[f"H{h}" for h in range(n_heads)],
            y=[f"L{layer}" for layer in range(n_layers)],
            text=labels,
            hovertemplate="%{text}: %{z:.4g}<extra></extra>",
            colorscale="RdBu",
            zmid=0,
            colorbar={"title": {"text": _wrapped(scores.name)}},
        )
    )
    figure.update_layout(title=title or scores.name, xaxis_title="head", yaxis_title="layer")
    figure.update_yaxes(autorange="reversed")
    return figure


def _component_heatmap(scores: LayerComponentScores, **kwargs: object) -> go.Heatmap:
    n_layers = scores.scores.shape[0]
    return go.Heatmap(
        z=scores.scores.tolist(),
        x=list(scores.components),
        y=[f"L{layer}" for layer in range(n_layers)],
        hovertemplate="L%{y} %{x}: %{z:.3g}<extra></extra>",
        **kwargs,  # type: ignore[arg-type]
    )


def layer_component_figure(scores: LayerComponentScores, *, title: str | None = None) -> go.Figure:
    """Heatmap of scores per layer x component (the paper's Fig. 4)."""
    figure = go.Figure(
        _component_heatmap(
            scores, colorscale="Viridis", colorbar={"title": {"text": _wrapped(scores.name)}}
        )
    )
    figure.update_layout(title=title or scores.name, xaxis_title="component", yaxis_title="layer")
    figure.update_yaxes(autorange="reversed")
    return figure


def gradient_comparison_figure(
    comparison: GradientComparison, *, statistic: str = "max_abs"
) -> go.Figure:
    """Memorized, non-memorized and their layer-share difference side by side."""
    memorized = comparison.memorized.statistic(statistic)
    non_memorized = comparison.non_memorized.statistic(statistic)
    figure = make_subplots(
        rows=2,
        cols=2,
        column_widths=[0.8, 0.2],
        vertical_spacing=0.22,
        specs=[[{"colspan": 2}, None], [{}, {}]],
        subplot_titles=(
            "memorized | non-memorized",
            "share of the map's total: MP - NMP",
            "layer share: MP - NMP",
        ),
    )
    # memorized and non-memorized side by side on one color scale, components prefixed
    both = go.Heatmap(
        z=torch.cat([memorized.scores, non_memorized.scores], 1).tolist(),
        x=[f"MP {c}" for c in memorized.components] + [f"NMP {c}" for c in memorized.components],
        y=[f"L{layer}" for layer in range(memorized.scores.shape[0])],
        hovertemplate="%{y} %{x}: %{z:.3g}<extra></extra>",
        colorscale="Viridis",
        colorbar={"y": 0.8, "len": 0.4, "title": {"text": statistic}},
    )
    figure.add_trace(both, row=1, col=1)
    figure.add_trace(
        _component_heatmap(
            comparison.share_difference(statistic),
            colorscale="RdBu",
            zmid=0,
            # under its own heatmap: at the right edge it would sit beside the bar chart
            colorbar={
                "orientation": "h",
                "x": 0.39,
                "xanchor": "center",
                "y": -0.17,
                "yanchor": "top",
                "len": 0.7,
                "thickness": 12,
                "title": {"text": "MP - NMP", "side": "top"},
            },
        ),
        row=2,
        col=1,
    )
    difference = comparison.layer_share_difference(statistic)
    figure.add_trace(
        go.Bar(
            x=difference.tolist(),
            y=[f"L{layer}" for layer in range(len(difference))],
            orientation="h",
            showlegend=False,
        ),
        row=2,
        col=2,
    )
    figure.update_yaxes(autorange="reversed")
    figure.update_layout(
        title=f"gradient {statistic} per layer x component", height=760, margin={"b": 120}
    )
    return figure


def em_drop_figure(*results: tuple[str, PrefixPerturbation]) -> go.Figure:
    """Mean EM drop per prefix position, one line per named result (the paper's Fig. 3)."""
    figure = go.Figure()
    for name, result in results:
        drop = result.mean_drop_per_position()
        figure.add_trace(
            go.Scatter(x=list(range(len(drop))), y=drop.tolist(), mode="lines+markers", name=name)
        )
    figure.update_layout(
        title="EM drop when one prefix token is perturbed",
        xaxis_title="prefix position",
        yaxis_title="mean EM drop",
    )
    return figure


def edit_comparison_figure(
    table: pd.DataFrame,
    *,
    set_name: str | Sequence[str] = "edited",
    metric: str = "mean_em",
) -> go.Figure:
    """Before and after per mask, from :func:`~memloc_tl.editing.compare_edits`'s table (Fig. 5).

    ``set_name`` may name several sets (e.g. ``["edited", "heldout"]``): one bar group per mask
    and set, so what the edit did to the target stands beside what it did elsewhere.
    """
    names = [set_name] if isinstance(set_name, str) else list(set_name)
    rows = table.loc[table["set"].isin(names) & (table["metric"] == metric)]
    missing = [name for name in names if name not in set(rows["set"])]
    if missing or not names:
        raise ValueError(
            f"the table has no rows for set(s) {missing or names!r} and metric {metric!r}; "
            f"it has sets {sorted(set(table['set']))}"
        )
    if len(names) == 1:
        return _before_after_bars(rows, "mask", f"{names[0]} {metric} before and after", metric)
    rows = rows.assign(group=rows["mask"] + " / " + rows["set"])
    title = f"{metric} before and after, per mask / set"
    return _before_after_bars(rows, "group", title, metric)


def _before_after_bars(rows: pd.DataFrame, x: str, title: str, metric: str) -> go.Figure:
    """Grouped bars of the ``before`` and ``after`` columns, one group per value of ``x``."""
    figure = go.Figure(
        [
            go.Bar(name="before", x=rows[x].tolist(), y=rows["before"].tolist()),
            go.Bar(name="after", x=rows[x].tolist(), y=rows["after"].tolist()),
        ]
    )
    figure.update_layout(barmode="group", title=title, yaxis_title=metric)
    return figure


def token_scores_figure(scores: TokenScores, *, title: str | None = None) -> go.Figure:
    """Heatmap of a score per paragraph (rows, by id) and token position (columns)."""
    figure = go.Figure(
        go.Heatmap(
            z=scores.scores.tolist(),
            y=list(scores.paragraphs.ids),
            x=list(range(scores.scores.shape[1])),
            hovertemplate="%{y} pos %{x}: %{z:.3g}<extra></extra>",
            colorscale="Viridis",
            colorbar={"title": {"text": _wrapped(scores.name)}},
        )
    )
    figure.update_layout(
        title=title or scores.name, xaxis_title="position", yaxis_title="paragraph"
    )
    return figure


def exact_match_figure(scan: MemorizationScan, *, title: str | None = None) -> go.Figure:
    """Histogram of exact-match lengths (0..continuation length) of a scan."""
    n = scan.continuation_len
    counts = scan.exact_match.bincount(minlength=n + 1)
    figure = go.Figure(go.Bar(x=list(range(n + 1)), y=counts.tolist()))
    figure.update_layout(
        title=title or f"exact-match length of {len(scan)} paragraphs",
        xaxis_title="EM (tokens reproduced greedily)",
        yaxis_title="paragraphs",
    )
    return figure


def intervention_figure(result: HeadIntervention) -> go.Figure:
    """EM of each target paragraph without vs with the intervention (diagonal = no effect)."""
    n = result.paragraphs.continuation_len
    heads = ", ".join(map(str, result.heads))
    figure = go.Figure(
        [
            go.Scatter(
                x=result.baseline_em.tolist(),
                y=result.em.tolist(),
                mode="markers",
                text=list(result.paragraphs.ids),
                hovertemplate="%{text}: EM %{x} -> %{y}<extra></extra>",
                name="paragraphs",
            ),
            go.Scatter(x=[0, n], y=[0, n], mode="lines", name="no effect", line={"dash": "dot"}),
        ]
    )
    figure.update_layout(
        title=f"{result.kind} {heads}: exact match per paragraph",
        xaxis_title="EM without intervention",
        yaxis_title=f"EM with {result.kind}",
    )
    return figure


def edit_result_figure(result: EditResult, *, metric: str = "mean_em") -> go.Figure:
    """Before and after of one edit, per evaluated set."""
    rows = result.evaluation.loc[result.evaluation["metric"] == metric]
    if len(rows) == 0:
        raise ValueError(f"the evaluation has no rows for metric {metric!r}")
    return _before_after_bars(rows, "set", f"{result.objective}: {metric} before and after", metric)


def injection_result_figure(injection: Injection) -> go.Figure:
    """An injection: each planted paragraph's EM before and after (planted where it reaches the
    continuation's length)."""
    rows = pd.DataFrame(
        {
            "paragraph": list(injection.paragraphs.ids),
            "before": injection.em_before.float().tolist(),
            "after": injection.em_after.float().tolist(),
        }
    )
    where = injection.config.level
    figure = _before_after_bars(
        rows, "paragraph", f"injected into {where}: EM before and after", "EM"
    )
    figure.add_hline(y=injection.paragraphs.continuation_len, line_dash="dot")
    return figure


def localization_figure(localization: Localization) -> go.Figure:
    """Heads: a head heatmap; neurons: scores per layer x neuron; weights: the summed score of
    each matrix."""
    if localization.level == "heads":
        return head_scores_figure(localization.head_scores())
    if localization.level == "neurons":
        scores = torch.stack(list(localization.scores.values()))
        figure = go.Figure(
            go.Heatmap(
                z=scores.tolist(),
                y=[f"L{layer}" for layer in range(scores.shape[0])],
                colorscale="RdBu",
                zmid=0,
                colorbar={"title": "score"},
            )
        )
        figure.update_layout(
            title=f"{localization.method}: neuron scores", xaxis_title="neuron", yaxis_title="layer"
        )
        figure.update_yaxes(autorange="reversed")
        return figure
    frame = localization.to_frame()
    figure = go.Figure(go.Bar(x=frame["parameter"], y=frame["sum"]))
    figure.update_layout(
        title=f"{localization.method}: summed weight scores per matrix",
        xaxis_title="matrix",
        yaxis_title="sum of scores",
    )
    return figure


def benchmark_figure(summary: pd.DataFrame, column: str, title: str) -> go.Figure:
    """One bar per localizer (a benchmark summary's ``column``); baselines in grey."""
    baselines = {"random", "magnitude", "oracle"}
    colors = ["#9e9e9e" if m in baselines else "#1f77b4" for m in summary["method"]]
    figure = go.Figure(
        go.Bar(x=summary["method"], y=summary[column], marker_color=colors, name=column)
    )
    figure.update_layout(title=title, xaxis_title="localizer", yaxis_title=column)
    return figure


def ranking_figure(ranking: HeadRanking, k: int = 10) -> go.Figure:
    """The top ``k`` heads' scores with bootstrap intervals, and how often each ranked first."""
    top = ranking.top(k)
    labels = [str(head) for head, _ in top]
    scores = [score for _, score in top]
    low = [float(ranking.low[h.layer, h.head]) for h, _ in top]
    high = [float(ranking.high[h.layer, h.head]) for h, _ in top]
    first = [float(ranking.p_first[h.layer, h.head]) for h, _ in top]
    figure = go.Figure(
        go.Bar(
            x=labels,
            y=scores,
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [h - s for h, s in zip(high, scores, strict=True)],
                "arrayminus": [s - lo for s, lo in zip(scores, low, strict=True)],
            },
            text=[f"first in {p:.0%}" for p in first],
            hovertemplate="%{x}: %{y:.3f}<br>%{text}<extra></extra>",
            name=ranking.name,
        )
    )
    percent = round(100 * ranking.level)
    figure.update_layout(
        title=f"{ranking.name}: top {len(top)} heads, {percent}% bootstrap intervals "
        f"(n = {ranking.n_paragraphs} paragraphs)",
        xaxis_title="head",
        yaxis_title=ranking.name,
    )
    return figure


def timeline_figure(timeline: MemorizationTimeline) -> go.Figure:
    """EM vs training step, one line per paragraph."""
    figure = go.Figure()
    for j, paragraph in enumerate(timeline.ids):
        figure.add_trace(
            go.Scatter(
                x=list(timeline.steps),
                y=timeline.exact_match[:, j].tolist(),
                mode="lines+markers",
                name=paragraph,
            )
        )
    figure.add_hline(y=timeline.continuation_len, line={"dash": "dot"}, annotation_text="memorized")
    figure.update_layout(
        title=f"exact match over training: {timeline.name}",
        xaxis_title="training step",
        yaxis_title="EM (tokens)",
    )
    return figure


def timeline_heatmap(timeline: MemorizationTimeline) -> go.Figure:
    """Paragraphs x steps, EM as color; paragraphs sorted by the step each became memorized."""
    first = timeline.first_memorized_step()
    never = max(timeline.steps) + 1
    order = sorted(range(len(timeline.ids)), key=lambda j: (first[timeline.ids[j]] or never, j))
    figure = go.Figure(
        go.Heatmap(
            z=timeline.exact_match[:, order].T.tolist(),
            x=[str(s) for s in timeline.steps],
            y=[timeline.ids[j] for j in order],
            colorscale="Viridis",
            zmin=0,
            zmax=timeline.continuation_len,
            colorbar={"title": {"text": "EM"}},
            hovertemplate="%{y} at step %{x}: EM %{z}<extra></extra>",
        )
    )
    figure.update_layout(
        title=f"when each paragraph became memorized: {timeline.name}",
        xaxis_title="training step",
        yaxis_title="paragraph (first memorized first)",
    )
    figure.update_yaxes(autorange="reversed")
    return figure


def head_timeline_figure(timeline: HeadTimeline, k: int = 5) -> go.Figure:
    """A head score vs training step, one line per head of the last step's top ``k``."""
    last = timeline.at(timeline.steps[-1])
    figure = go.Figure()
    for head, _ in last.top(k, order=timeline.order):
        figure.add_trace(
            go.Scatter(
                x=list(timeline.steps),
                y=[timeline.at(step)[head] for step in timeline.steps],
                mode="lines+markers",
                name=str(head),
            )
        )
    figure.update_layout(
        title=f"{timeline.analysis} over training: the last step's top {k} heads",
        xaxis_title="training step",
        yaxis_title=timeline.score or timeline.analysis,
    )
    return figure


def mask_drift_figure(drift: MaskDrift) -> go.Figure:
    """Jaccard overlap of consecutive checkpoints' top weights, against the later step."""
    figure = go.Figure(
        go.Scatter(
            x=list(drift.steps[1:]),
            y=drift.jaccard.tolist(),
            mode="lines+markers",
            name=drift.method,
            customdata=[[a, b] for a, b in zip(drift.steps[:-1], drift.steps[1:], strict=True)],
            hovertemplate="steps %{customdata[0]} -> %{customdata[1]}: %{y:.3f}<extra></extra>",
        )
    )
    figure.update_layout(
        title=f"overlap of consecutive top-{drift.fraction:.1%} {drift.method} masks "
        f"(n = {drift.n_paragraphs} paragraphs)",
        xaxis_title="training step (the later of the pair)",
        yaxis_title="Jaccard overlap",
        yaxis_range=[0, 1],
    )
    return figure
