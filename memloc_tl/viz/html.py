"""Offline HTML: circuitsvis views and plotly figures that render with no network.

circuitsvis's own HTML imports its JavaScript from a CDN (and, offline, inlines the 1.3 MB
bundle into every single view); plotly's ``to_html`` may point at a CDN too. Here both scripts
come from the installed wheels:

- a :class:`CircuitsView` shown in Jupyter carries the circuitsvis bundle with it, so it renders
  with no network, also in a saved notebook;
- an :class:`HtmlPage` puts each library's script in the page once, however many figures and
  views it holds, and writes the file atomically.
"""

from __future__ import annotations

import functools
import html
import itertools
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import circuitsvis
import pandas as pd
import plotly.graph_objects as go
import plotly.offline
from circuitsvis.utils.convert_props import convert_props
from plotly.io.base_renderers import MimetypeRenderer

from memloc_tl.core.files import atomic_write_text

_SOURCE_MAP = re.compile(r"^//# sourceMappingURL=.*$", re.MULTILINE)


def _inline_js(source: str) -> str:
    """JavaScript that is safe inside a ``<script>`` element and asks for no source map."""
    return _SOURCE_MAP.sub("", source).replace("</script", "<\\/script")


@functools.cache
def circuitsvis_js() -> str:
    """The circuitsvis browser bundle shipped in its wheel (defines the global ``CircuitsVis``)."""
    bundle = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not bundle.is_file():
        raise FileNotFoundError(
            f"circuitsvis {circuitsvis.__version__} has no browser bundle at {bundle}; "
            "reinstall it with `pip install --force-reinstall circuitsvis`"
        )
    return _inline_js(bundle.read_text(encoding="utf-8"))


@functools.cache
def plotly_js() -> str:
    """plotly.js as shipped in the plotly wheel."""
    return _inline_js(plotly.offline.get_plotlyjs())


@dataclass(frozen=True)
class CircuitsView:
    """A circuitsvis visualization (e.g. ``"AttentionHeads"``) and its properties.

    In Jupyter it displays itself with the circuitsvis bundle inlined, so it needs no network;
    :class:`HtmlPage` includes the bundle once per page instead.
    """

    element: str
    props: dict[str, Any]
    title: str = ""

    def to_html(self, *, include_script: bool = True, element_id: str | None = None) -> str:
        """A ``<div>`` and the script that renders into it (plus the bundle, if asked)."""
        element_id = element_id or f"memloc-view-{uuid.uuid4().hex[:12]}"
        # JSON inside a script: "</" must not end the element early.
        props = convert_props(self.props).replace("</", "<\\/")
        parts = [f"<script>{circuitsvis_js()}</script>"] if include_script else []
        parts.append(f'<div id="{element_id}" class="memloc-view" style="margin: 15px 0;"></div>')
        parts.append(
            f"<script>CircuitsVis.render({json.dumps(element_id)}, "
            f"CircuitsVis[{json.dumps(self.element)}], {props});</script>"
        )
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        return self.to_html(include_script=True)

    def __str__(self) -> str:
        return self.to_html(include_script=False)

    def show(self) -> None:
        """Display in Jupyter (needs IPython)."""
        _display(self)


def _display(obj: Any) -> None:
    try:
        from IPython.display import display
    except ImportError as error:  # pragma: no cover - IPython comes with Jupyter
        raise RuntimeError("show() needs IPython (Jupyter); use to_html() elsewhere") from error
    display(obj)


class OfflineNotebookRenderer(MimetypeRenderer):
    """plotly renderer for Jupyter that needs no network.

    plotly's own ``"notebook"`` renderer inlines plotly.js but loads MathJax from a CDN. This
    one writes HTML with no external script: plotly.js is inlined in the first figure shown
    (``plotly_js="once"``, the default: a saved notebook stays small and renders top to bottom)
    or in every figure (``"each"``: any single output renders on its own).
    """

    def __init__(self, plotly_js: Literal["once", "each"] = "once") -> None:
        if plotly_js not in ("once", "each"):
            raise ValueError(f"plotly_js must be 'once' or 'each', got {plotly_js!r}")
        self.plotly_js = plotly_js
        # plotly renders with a shallow copy of the renderer: keep the state in a shared dict
        self._state = {"sent": False}

    def to_mimebundle(self, fig_dict: Any) -> dict[str, str]:
        import plotly.io as pio

        include = self.plotly_js == "each" or not self._state["sent"]
        self._state["sent"] = True
        html = pio.to_html(
            fig_dict,
            include_plotlyjs=include,
            include_mathjax=False,
            full_html=False,
            default_width="100%",
            default_height="525px",
            config={"displaylogo": False},
            validate=False,
        )
        return {"text/html": html}


def notebook_mode(plotly_js: Literal["once", "each"] = "once") -> None:
    """Make plotly figures render offline in Jupyter and in saved notebooks.

    Registers :class:`OfflineNotebookRenderer` as ``"memloc_offline"`` and makes
    ``"plotly_mimetype+memloc_offline"`` the default: JupyterLab draws a figure from its data
    with its plotly extension where it has one, and from the self-contained HTML otherwise.
    circuitsvis views (:class:`CircuitsView`) are offline already.
    """
    import plotly.io as pio

    pio.renderers["memloc_offline"] = OfflineNotebookRenderer(plotly_js)
    pio.renderers.default = "plotly_mimetype+memloc_offline"


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
.memloc-note { color: #555; }
"""


@dataclass
class HtmlPage:
    """A self-contained HTML page of headings, text, tables, plotly figures and circuitsvis views.

    plotly.js and the circuitsvis bundle are inlined once each (only if the page uses them), so
    the page opens with no network.

    Example::

        page = HtmlPage("L1H2")
        page.heading("Rare-token attention")
        page.figure(result.figure())
        page.view(attention_view(model, tokens, ["L1H2"]))
        page.write("report.html")
    """

    title: str
    _body: list[str] = field(default_factory=list, init=False, repr=False)
    _uses_plotly: bool = field(default=False, init=False, repr=False)
    _uses_circuitsvis: bool = field(default=False, init=False, repr=False)
    _ids: itertools.count = field(default_factory=itertools.count, init=False, repr=False)

    def heading(self, text: str, level: int = 2) -> HtmlPage:
        if level not in range(1, 7):
            raise ValueError(f"level must be 1..6, got {level}")
        self._body.append(f"<h{level}>{html.escape(text)}</h{level}>")
        return self

    def text(self, text: str, *, note: bool = False) -> HtmlPage:
        """A paragraph of plain text (escaped)."""
        css = ' class="memloc-note"' if note else ""
        self._body.append(f"<p{css}>{html.escape(text)}</p>")
        return self

    def table(self, frame: pd.DataFrame, *, float_format: str = "{:.4g}") -> HtmlPage:
        self._body.append(
            frame.to_html(index=False, float_format=float_format.format, border=0, escape=True)
        )
        return self

    def figure(self, figure: go.Figure) -> HtmlPage:
        if not isinstance(figure, go.Figure):
            raise TypeError(f"figure must be a plotly Figure, got {type(figure).__name__}")
        self._uses_plotly = True
        self._body.append(
            figure.to_html(
                full_html=False,
                include_plotlyjs=False,
                include_mathjax=False,
                div_id=f"memloc-figure-{next(self._ids)}",
                config={"displaylogo": False},
            )
        )
        return self

    def view(self, view: CircuitsView) -> HtmlPage:
        if not isinstance(view, CircuitsView):
            raise TypeError(f"view must be a CircuitsView, got {type(view).__name__}")
        self._uses_circuitsvis = True
        if view.title:
            self.heading(view.title, level=4)
        self._body.append(
            view.to_html(include_script=False, element_id=f"memloc-view-{next(self._ids)}")
        )
        return self

    def html(self) -> str:
        scripts = []
        if self._uses_plotly:
            scripts.append(f'<script type="text/javascript">{plotly_js()}</script>')
        if self._uses_circuitsvis:
            scripts.append(f"<script>{circuitsvis_js()}</script>")
        head = "\n".join(
            [
                '<meta charset="utf-8">',
                f"<title>{html.escape(self.title)}</title>",
                f"<style>{_STYLE}</style>",
                *scripts,
            ]
        )
        body = "\n".join([f"<h1>{html.escape(self.title)}</h1>", *self._body])
        return (
            f"<!DOCTYPE html>\n<html>\n<head>\n{head}\n</head>\n<body>\n{body}\n</body>\n</html>\n"
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the page; the file appears complete or not at all."""
        path = Path(path)
        if path.suffix.lower() not in (".html", ".htm"):
            raise ValueError(f"the page must be written to a .html file, got {path.name!r}")
        atomic_write_text(path, self.html())
        return path
