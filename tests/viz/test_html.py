"""Offline HTML: the circuitsvis bundle and plotly.js come from the wheels, once per page."""

from __future__ import annotations

import os
from pathlib import Path

import plotly.graph_objects as go
import plotly.offline
import pytest
import torch

from memloc_tl.viz import CircuitsView, HtmlPage, circuitsvis_js, plotly_js

from ..browser import visit


def _view(name: str = "L1H2") -> CircuitsView:
    attention = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0)).tril()
    return CircuitsView(
        "AttentionHeads",
        {
            "attention": attention,
            "tokens": ["a", "b", "</script>", "d"],
            "attentionHeadNames": [name],
        },
        title=f"attention of {name}",
    )


def _page() -> HtmlPage:
    page = HtmlPage("a <page>")
    page.heading("figures").text("two figures & two views")
    page.figure(go.Figure(go.Heatmap(z=[[1, 2], [3, 4]])))
    page.figure(go.Figure(go.Bar(x=["a", "b"], y=[1, 2])))
    page.view(_view("L1H2"))
    page.view(CircuitsView("ColoredTokens", {"tokens": ["x", "y"], "values": [0.0, 1.0]}))
    return page


def test_scripts_come_from_the_wheels_without_network_references() -> None:
    bundle, plotly = circuitsvis_js(), plotly_js()
    assert "var CircuitsVis" in bundle
    assert "sourceMappingURL" not in bundle
    assert "</script" not in bundle
    assert "</script" not in plotly
    assert len(plotly) > 1_000_000


def test_a_page_inlines_each_script_once() -> None:
    html = _page().html()
    assert html.count(circuitsvis_js()) == 1
    assert html.count(plotly_js()) == 1
    assert "src=" not in html.replace(plotly_js(), "").replace(circuitsvis_js(), "")
    assert "unpkg.com" not in html
    assert html.count('class="memloc-view"') == 2
    assert html.count("Plotly.newPlot") == 2
    # user text is escaped; a "</script>" token inside props cannot end the script early
    assert "a &lt;page&gt;" in html
    assert '"<\\/script>"' in html


def test_pages_without_figures_or_views_carry_no_scripts() -> None:
    html = HtmlPage("text only").text("hello").html()
    assert "CircuitsVis" not in html
    assert "Plotly" not in html


def test_a_view_in_jupyter_carries_its_bundle() -> None:
    view = _view()
    assert view._repr_html_().count("var CircuitsVis") == 1
    assert "var CircuitsVis" not in str(view)
    assert "CircuitsVis.render(" in str(view)


def test_bad_input_is_refused(tmp_path: Path) -> None:
    page = HtmlPage("x")
    with pytest.raises(TypeError, match="plotly Figure"):
        page.figure("not a figure")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="CircuitsView"):
        page.view("<div>")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\.html"):
        page.write(tmp_path / "report.pdf")
    with pytest.raises(ValueError, match="level"):
        page.heading("x", level=9)


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "page.html"
    path = _page().write(target)
    assert path == target
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # readable like any page

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _page().write(tmp_path / "other.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]


def test_the_page_renders_offline_in_chromium(tmp_path: Path) -> None:
    path = _page().write(tmp_path / "page.html")
    seen = visit(
        path,
        {
            "plots": "document.querySelectorAll('.js-plotly-plot .main-svg').length > 0",
            "figures": "document.querySelectorAll('.js-plotly-plot').length",
            "views": "Array.from(document.querySelectorAll('.memloc-view'))"
            ".map(e => e.childElementCount)",
            "text": "document.body.innerText",
        },
    )
    assert seen.errors == []
    assert seen.console_errors == []
    assert seen.network_requests == []
    assert seen.facts["plots"] is True
    assert seen.facts["figures"] == 2
    assert seen.facts["views"] == [1, 1]
    assert "L1H2" in str(seen.facts["text"])


def test_notebook_renderer_needs_no_network() -> None:
    import plotly.io as pio

    from memloc_tl.viz import notebook_mode
    from memloc_tl.viz.html import OfflineNotebookRenderer

    figure = go.Figure(go.Bar(x=["a"], y=[1]))
    once = OfflineNotebookRenderer("once")
    first = once.to_mimebundle(figure.to_dict())["text/html"]
    second = once.to_mimebundle(figure.to_dict())["text/html"]
    assert "src=" not in first.replace(plotly.offline.get_plotlyjs(), "")
    assert "MathJax.js" not in first
    assert len(first) > 1_000_000 > len(second)  # plotly.js inlined once
    each = OfflineNotebookRenderer("each")
    each.to_mimebundle(figure.to_dict())
    assert len(each.to_mimebundle(figure.to_dict())["text/html"]) > 1_000_000
    with pytest.raises(ValueError, match="once"):
        OfflineNotebookRenderer("cdn")  # type: ignore[arg-type]
    default = pio.renderers.default
    try:
        notebook_mode()
        assert pio.renderers.default == "plotly_mimetype+memloc_offline"
        # through plotly's own display path (which copies the renderer for every figure)
        sizes = [len(figure._repr_mimebundle_()["text/html"]) for _ in range(3)]
        assert sizes[0] > 1_000_000 > max(sizes[1:])
    finally:
        pio.renderers.default = default
