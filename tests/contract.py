"""The result contract (:class:`memloc_tl.core.results.Result`), checked on one instance."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go

from memloc_tl.core.results import Result

NOT_RESULTS = {
    # settings
    "BenchmarkConfig",
    "CorpusConfig",
    "DeletionConfig",
    "EditConfig",
    "EvalSets",
    "InjectionConfig",
    "LearnedMaskConfig",
    "LocalizeConfig",
    "OrganismConfig",
    "PerturbConfig",
    "Precision",
    "ReportConfig",
    # values and inputs
    "HeadRef",
    "Paragraphs",
    "Units",
    "LocalizationTask",
    "Localizer",
    # artefacts and the things analyses run on
    "CheckpointSeries",
    "Organism",
    "ParamMask",
    "WeightEdit",
    "Workbench",
}
"""Public dataclasses that are not analysis results (they hold inputs, settings or weights)."""


def check_result(result: Any) -> None:
    """``result`` meets the contract: a non-empty frame, a plotly figure, a one-line repr."""
    name = type(result).__name__
    assert isinstance(result, Result), f"{name} lacks to_frame or figure"
    frame = result.to_frame()
    assert isinstance(frame, pd.DataFrame), f"{name}.to_frame() gave {type(frame).__name__}"
    assert len(frame) > 0, f"{name}.to_frame() is empty"
    assert len(frame.columns) > 0, f"{name}.to_frame() has no columns"
    figure = result.figure()
    assert isinstance(figure, go.Figure), f"{name}.figure() gave {type(figure).__name__}"
    assert len(figure.data) > 0, f"{name}.figure() draws nothing"
    text = repr(result)
    assert "\n" not in text, f"repr({name}) spans lines"
    assert len(text) <= 300, f"repr({name}) is {len(text)} characters: {text[:80]}..."
    assert text.startswith(name), f"repr({name}) does not name its type: {text[:80]}"
