"""Renderers draw exactly the numbers of the results they are given."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from memloc_tl.analysis import compare_gradient_norms, perturb_prefixes, rare_token_attention
from memloc_tl.core.results import HeadScores
from memloc_tl.organism import Organism
from memloc_tl.viz import (
    attention_figure,
    attention_view,
    edit_comparison_figure,
    em_drop_figure,
    token_view,
)


def test_head_and_component_figures_show_the_scores(organism: Organism) -> None:
    scores = HeadScores("x", torch.arange(8.0).view(2, 4))
    figure = scores.figure()
    assert [list(row) for row in figure.data[0].z] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert figure.data[0].text[1][2] == "L1H2"
    model = organism.model
    comparison = compare_gradient_norms(
        model, organism.planted[[0, 1]], organism.control[[0, 1]], progress=False
    )
    both = comparison.figure()
    heatmaps = [trace for trace in both.data if trace.type == "heatmap"]
    mp, nmp = comparison.memorized.max_abs.scores, comparison.non_memorized.max_abs.scores
    assert [list(map(float, row)) for row in heatmaps[0].z] == torch.cat([mp, nmp], 1).tolist()
    share = mp / mp.sum() - nmp / nmp.sum()
    torch.testing.assert_close(torch.tensor(heatmaps[1].z, dtype=torch.float32), share)
    assert comparison.share_difference().scores.sum().abs() < 1e-5  # shares sum to 1 each
    bars = [trace for trace in both.data if trace.type == "bar"]
    assert list(bars[0].x) == pytest.approx(comparison.layer_share_difference().tolist())
    assert list(comparison.memorized.figure().data[0].x) == list(
        comparison.memorized.max_abs.components
    )
    # every heatmap says what its colors mean
    titled = [figure, both, comparison.memorized.figure()]
    for fig in titled:
        for trace in (t for t in fig.data if t.type == "heatmap"):
            assert trace.colorbar.title.text, fig.layout.title.text
    assert figure.data[0].colorbar.title.text == "x"
    assert heatmaps[1].colorbar.title.text == "MP - NMP"
    # the difference's colorbar lies under its own heatmap, not beside the bar chart
    domain = both.layout.xaxis2.domain
    bar = heatmaps[1].colorbar
    assert bar.orientation == "h"
    assert domain[0] < bar.x < domain[1]
    assert bar.x + bar.len / 2 * (domain[1] - domain[0]) <= domain[1] + 0.1
    # a long score name is wrapped onto lines, never cut
    long = HeadScores("pooled tau (mean per rank)", torch.zeros(2, 4)).figure()
    assert long.data[0].colorbar.title.text.replace("<br>", " ") == "pooled tau (mean per rank)"


def test_em_drop_and_edit_figures(organism: Organism) -> None:
    result = perturb_prefixes(
        organism.model, organism.planted[[0, 1]], build_perturbed=False, progress=False
    )
    figure = em_drop_figure(("memorized", result))
    expected = result.mean_drop_per_position()
    assert list(figure.data[0].y)[1:] == pytest.approx(expected[1:].tolist())
    table = pd.DataFrame(
        {
            "set": ["edited", "edited"],
            "metric": ["mean_em"] * 2,
            "mask": ["gradient", "random"],
            "before": [50.0, 50.0],
            "after": [10.0, 49.0],
        }
    )
    bars = edit_comparison_figure(table)
    assert list(bars.data[1].y) == [10.0, 49.0]
    with pytest.raises(ValueError, match="no rows"):
        edit_comparison_figure(table, metric="perplexity")
    heldout = table.assign(set="heldout", after=[2.0, 47.0])
    both = edit_comparison_figure(pd.concat([table, heldout]), set_name=["edited", "heldout"])
    after = dict(zip(both.data[1].x, both.data[1].y, strict=True))
    assert after == {
        "gradient / edited": 10.0,
        "random / edited": 49.0,
        "gradient / heldout": 2.0,
        "random / heldout": 47.0,
    }
    with pytest.raises(ValueError, match=r"\['heldout'\].*has sets \['edited'\]"):
        edit_comparison_figure(table, set_name=["edited", "heldout"])


def test_circuitsvis_views(organism: Organism) -> None:
    model, tokens = organism.model, organism.planted.tokens[0]
    rare = rare_token_attention(
        model, organism.planted[[0]], organism.corpus_counts, progress=False
    )
    assert rare.figure().data[0].z is not None
    view = attention_view(model, tokens, ["L1H2", "L0H1"], rare_positions=[3])
    html = str(view)
    assert "L1H2" in html
    assert "L0H1" in html
    unmarked = str(attention_view(model, tokens, ["L1H2", "L0H1"]))
    assert html.count('"*') == unmarked.count('"*') + 1  # the one marked rare position
    colored = str(token_view(model, tokens, torch.arange(50.0)))
    assert "49.0" in colored
    # the colors the title names are the ones drawn (circuitsvis's pure blue mixes to purple)
    assert "#2166ac" in colored
    with pytest.raises(ValueError, match="one paragraph"):
        attention_view(model, tokens[None])


def test_attention_figure_labels_every_token_and_token_views_state_their_scale(
    organism: Organism,
) -> None:
    model, tokens = organism.model, organism.planted.tokens[0]
    figure = attention_figure(model, tokens, ["L1H2", "L0H1"], query_pos=49, rare_positions=[3])
    _, cache = model.run_with_cache(tokens[None])
    expected = [cache["blocks.1.attn.hook_pattern"][0, 2, 49, :50].tolist()]
    expected.append(cache["blocks.0.attn.hook_pattern"][0, 1, 49, :50].tolist())
    torch.testing.assert_close(torch.tensor(figure.data[0].z), torch.tensor(expected))
    labels = list(figure.layout.xaxis.ticktext)
    plain = [str(t) for t in model.to_str_tokens(tokens[:50])]
    assert labels == [f"*{t}" if i == 3 else t for i, t in enumerate(plain)]
    assert figure.data[0].colorbar.title.text == "attention from 49"
    for bad, match in (({"query_pos": 100}, "query_pos"), ({"heads": []}, "heads is empty")):
        with pytest.raises(ValueError, match=match):
            attention_figure(model, tokens, **{"heads": ["L0H0"], "query_pos": 49, **bad})

    view = token_view(model, tokens, -torch.arange(50.0) + 10, title="d", prefix_len=50)
    assert view.title == (
        "d (white = 0, dark blue = 10, dark red = -39; \u2502 = start of the continuation)"
    )
    assert view.props["tokens"][50].startswith("\u2502")
    assert (view.props["minValue"], view.props["maxValue"]) == (-39.0, 10.0)
