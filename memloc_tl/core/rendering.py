"""How a result draws itself without knowing the package that draws it.

``memloc_tl.viz`` sits on top of every other module: it imports plotly and circuitsvis, and it
knows every result type. The result types sit below it and must not import it. So a result's
``figure()`` calls :func:`render` here, and ``viz`` registers one renderer per result type and
view (:func:`renders`, in ``memloc_tl/viz/renderers.py``) under the type's qualified name, so
that registering needs no import of the result modules either. :func:`render` loads ``viz``
the first time a figure is asked for: the one place that names it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

Renderer = TypeVar("Renderer", bound=Callable[..., Any])

VIEWER = "memloc_tl.viz"
"""The package whose import registers the renderers."""

_RENDERERS: dict[tuple[str, str], Callable[..., Any]] = {}


def qualified_name(kind: type) -> str:
    """``"memloc_tl.core.results.HeadScores"``: the key a renderer is registered under."""
    return f"{kind.__module__}.{kind.__qualname__}"


def renders(kind: str, view: str = "figure") -> Callable[[Renderer], Renderer]:
    """Register the decorated ``function(result, **options)`` as the ``view`` of the result
    type whose qualified name is ``kind``; the function is returned unchanged."""

    def register(function: Renderer) -> Renderer:
        key = (kind, view)
        if key in _RENDERERS and _RENDERERS[key] is not function:
            raise ValueError(f"{view!r} of {kind} is registered twice")
        _RENDERERS[key] = function
        return function

    return register


def render(result: object, view: str = "figure", **options: Any) -> Any:
    """The ``view`` of ``result`` (a plotly figure), drawn by the renderer registered for its
    type or the nearest base class that has one."""
    importlib.import_module(VIEWER)  # registers the renderers (once; later calls are lookups)
    for kind in type(result).__mro__:
        renderer = _RENDERERS.get((qualified_name(kind), view))
        if renderer is not None:
            return renderer(result, **options)
    raise TypeError(f"no {view!r} renderer for {type(result).__name__}")


def registered() -> dict[tuple[str, str], Callable[..., Any]]:
    """Every registered ``(type, view) -> renderer`` (after loading the renderers)."""
    importlib.import_module(VIEWER)
    return dict(_RENDERERS)
