"""The whole pipeline as one offline HTML page: ``memorization_report`` and ``memloc report``."""

from __future__ import annotations

import time
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

import pytest
import torch

from memloc_tl import (
    Paragraphs,
    patching_sweep,
    rare_token_attention,
    scan_checkpoints,
    scan_memorization,
)
from memloc_tl.cli import main
from memloc_tl.models import load_model
from memloc_tl.organism import Organism
from memloc_tl.report import ReportConfig, memorization_report

from ..browser import visit
from ..contract import check_result


@pytest.fixture(scope="module")
def report_file(tmp_path_factory: pytest.TempPathFactory, organism: Organism) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    cache = organism.path.parent
    assert main(["report", "--tiny", "--cache-dir", str(cache), "--out", str(out)]) == 0
    return out


def test_the_report_holds_the_library_results(
    organism: Organism, unchanged: Callable[[Any], Any]
) -> None:
    model = organism.model
    everything = Paragraphs.concat(organism.planted, organism.control, organism.heldout)
    with unchanged(model):
        report = memorization_report(
            model,
            everything,
            corpus_counts=organism.corpus_counts,
            checkpoints=organism.checkpoints,
            config=ReportConfig(n_paragraphs=4, edit_steps=2, edit_lr=3e-2, inj=True),
            progress=False,
        )
    check_result(report)  # the result contract (tests/core/test_results_contract.py has the rest)
    findings = report.to_frame()
    assert findings.loc[findings["section"] == "memorization", "finding"].iloc[0] == (
        report.scan_finding()
    )
    assert "over training" in set(findings["section"])
    scan = scan_memorization(model, report.memorized, progress=False)
    assert len(report.memorized) == 4
    assert (scan.exact_match == 50).all()
    assert (scan_memorization(model, report.non_memorized, progress=False).exact_match <= 10).all()
    # rare-token attention reads every memorized paragraph, not only the first n_paragraphs
    every = scan_memorization(model, everything, progress=False).memorized()
    assert report.rare.n_paragraphs == len(every) > len(report.memorized)
    independent = rare_token_attention(model, every, organism.corpus_counts, progress=False)
    torch.testing.assert_close(
        report.rare.pooled_tau_mean.scores, independent.pooled_tau_mean.scores
    )
    # every ranking statement carries its sample size and bootstrap interval
    assert f"n = {len(every)} paragraphs, 1000 bootstrap resamples" in report.rare_finding()
    assert "resolved" in report.rare_finding()
    assert "95% interval" in report.patching_finding()
    assert report.rare_ranking.first == report.rare.top(1)[0][0]
    assert report.sweep is not None
    assert report.sweep.paragraphs.ids == report.memorized.ids
    assert set(report.edits["mask"]) == {"gradient", "random"}
    assert set(report.perturbation) == {"memorized", "non-memorized"}
    assert report.deletion is not None
    deletion = report.deletion.to_frame()
    assert set(deletion["paragraph"]) == set(report.memorized.ids[:2])
    assert set(deletion["method"]) == {"gradient", "grad_x_weight", "random"}
    assert (deletion["target_em_before"] == 50).all()
    html = report.page().html()
    assert "Deletion specificity" in html
    # INJ: a held-out paragraph planted in a known head; the exact ablation sweep must find it
    assert report.injection is not None
    inj = report.injection.frame.set_index("method")
    assert set(inj.index) == {"zero_ablation", "attribution", "activation", "random"}
    assert report.injection.injections["em_after"].iloc[0] == 50
    assert inj.loc["zero_ablation", "rank"] == 1
    assert "8. Is the localization real? A head with known contents" in html
    assert escape(report.injection_finding()) in html
    # section 9: the analyzed paragraphs and their heads over the organism's checkpoints
    training = report.training
    assert training is not None
    series = organism.checkpoints
    followed = Paragraphs.concat(report.memorized, report.non_memorized)
    by_hand = scan_checkpoints(series, followed, progress=False)
    assert training.timeline.ids == followed.ids
    assert torch.equal(training.timeline.exact_match, by_hand.exact_match)
    rare_heads, patched = training.heads
    assert (rare_heads.analysis, patched.analysis) == ("rare_tokens", "patching")
    last = load_model(series.checkpoints[-1].source)  # the organism's final model
    pmp = report.perturbation["memorized"].perturbed
    assert pmp is not None
    sweep = patching_sweep(last, report.memorized, pmp, progress=False)
    torch.testing.assert_close(patched.scores[-1], sweep.mean_delta_nll.scores.float())
    torch.testing.assert_close(
        rare_heads.scores[-1],
        rare_token_attention(
            last, report.memorized, organism.corpus_counts, progress=False
        ).pooled_tau_mean.scores.float(),
        equal_nan=True,
    )
    assert "9. Over training" in html
    for line in training.findings():
        assert escape(line) in html
    assert training.findings()[1] == rare_heads.answer(training.timeline)
    assert html.count("Plotly.newPlot") == 11
    assert html.count('class="memloc-view"') == 3
    assert "MP: memorized paragraph (EM = 50)" in html
    # every comparison states its sample: the perturbation difference with its interval
    mp_drops = report.perturbation["memorized"].mean_drop_per_paragraph()
    nmp_drops = report.perturbation["non-memorized"].mean_drop_per_paragraph()
    perturbation = report.perturbation_finding()
    assert f"n = {len(mp_drops)} vs {len(nmp_drops)})" in perturbation
    assert f"{float(mp_drops.mean() - nmp_drops.mean()):+.2f} (95% interval" in perturbation
    assert f"summed gradient of {len(report.memorized)} MPs" in report.gradient_finding()
    assert report.injection_finding().startswith("Here one injection succeeded")
    for finding in (
        report.scan_finding(),
        report.perturbation_finding(),
        report.rare_finding(),
        report.patching_finding(),
        report.gradient_finding(),
        report.edit_finding(),
    ):
        assert finding.startswith("Here")
        assert escape(finding) in html
    # the findings are computed from the results, not fixed text
    (rare_head, _), *_ = report.rare.top(1)
    assert f"is {rare_head} (tau" in report.rare_finding()
    (patch_head, _), *_ = report.sweep.top(1)
    assert f"most at {patch_head} (+" in report.patching_finding()
    edited = report.edits.query("set == 'edited' and metric == 'mean_em' and mask == 'random'")
    assert f"edited EM 50.0 -> {float(edited['after'].iloc[0]):.1f}" in report.edit_finding()
    em = report.edits.query("metric == 'mean_em'").set_index(["mask", "set"])
    drops = {
        name: float(em.loc[("gradient", name), "before"] - em.loc[("gradient", name), "after"])
        for name in ("edited", "heldout")
    }
    verdict = "not specific" if drops["heldout"] >= drops["edited"] else "hit the unlearned"
    if drops["edited"] < 1:  # nothing unlearned is "no effect", whatever the held-out set did
        verdict = "no effect"
    if max(drops.values()) >= 1:
        assert verdict in report.edit_finding().split("; random")[0]
    # the attention figure shows the rare-token heads and the patching head, every key labelled
    assert report.attention is not None
    heatmap = report.attention.data[0]
    assert str(patch_head) in heatmap.y
    assert str(rare_head) in heatmap.y
    assert len(report.attention.layout.xaxis.ticktext) == report.rare.query_pos + 1
    assert str(report.rare.top(1)[0][0]) in html
    # perturbation: both sets against the model's greedy continuation (the paper's definition),
    # so every baseline EM is full and the drops are comparable
    for result in report.perturbation.values():
        assert (result.baseline_em == 50).all()
    non_memorized = report.perturbation["non-memorized"]
    greedy = non_memorized.paragraphs.continuation
    assert not torch.equal(greedy, report.non_memorized.continuation)
    assert "own greedy continuation" in html
    mp, nmp = (report.perturbation[k].mean_drop_per_token() for k in ("memorized", "non-memorized"))
    assert f"Here: {mp:.2f} memorized vs {nmp:.2f} non-memorized" in html


def test_too_few_memorized_paragraphs_is_a_clear_error(
    organism: Organism, default_organism: Organism
) -> None:
    with pytest.raises(ValueError, match="at least 2 memorized"):
        memorization_report(organism.model, organism.control, progress=False)
    with pytest.raises(ValueError, match="n_paragraphs"):
        ReportConfig(n_paragraphs=1)
    with pytest.raises(ValueError, match="edit_lr"):
        ReportConfig(edit_lr=float("nan"))
    with pytest.raises(TypeError, match="config must be a ReportConfig"):
        memorization_report(organism.model, organism.planted, config={"n_paragraphs": 4})  # type: ignore[arg-type]
    # checkpoints of another model (the default organism's tokenizer) fail before the first
    # analysis, not after all of them
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"checkpoint at step \d+"):
        memorization_report(
            organism.model, organism.planted, checkpoints=default_organism.checkpoints
        )
    assert time.perf_counter() - started < 30
    with pytest.raises(TypeError, match="checkpoints must be a CheckpointSeries"):
        memorization_report(organism.model, organism.planted, checkpoints=["step-1"])  # type: ignore[arg-type]


def test_cli_rejects_a_non_html_report(tmp_path: Path, organism: Organism) -> None:
    out = tmp_path / "report.pdf"
    code = main(["report", "--tiny", "--cache-dir", str(organism.path.parent), "--out", str(out)])
    assert code == 2
    assert not out.exists()
    demo = ["demo", "--tiny", "--cache-dir", str(organism.path.parent), "--report", str(out)]
    assert main(demo) == 2
    assert not out.exists()


def test_demo_writes_the_report_of_its_organism(tmp_path: Path, organism: Organism) -> None:
    out = tmp_path / "demo.html"
    cache = str(organism.path.parent)
    assert main(["demo", "--tiny", "--cache-dir", cache, "--report", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    assert "9. Over training" in html  # the organism kept checkpoints
    assert html.count("Plotly.newPlot") == 11
    assert organism.model.cfg.model_name in html


def test_the_report_opens_offline_in_chromium(report_file: Path) -> None:
    seen = visit(
        report_file,
        {
            "figures": "document.querySelectorAll('.js-plotly-plot').length",
            "drawn": "Array.from(document.querySelectorAll('.js-plotly-plot'))"
            ".filter(e => e.querySelector('.main-svg')).length",
            "views": "Array.from(document.querySelectorAll('.memloc-view'))"
            ".map(e => e.childElementCount)",
            "headings": "Array.from(document.querySelectorAll('body > h2')).map(e => e.innerText)",
            # every heatmap drawn with a colorbar title
            "heatmaps": "Array.from(document.querySelectorAll('.js-plotly-plot'))"
            ".filter(e => e.data.some(t => t.type === 'heatmap')).length",
            "colorbar_titles": "Array.from(document.querySelectorAll('.colorbar .cbtitle'))"
            ".map(e => e.textContent).filter(t => t.trim().length > 0).length",
            "colorbars": "document.querySelectorAll('.colorbar').length",
            # ... whole (no ellipsis), and drawn inside its figure, not cut at an edge
            "cut_titles": "Array.from(document.querySelectorAll('.colorbar .cbtitle'))"
            ".filter(e => e.textContent.includes('\u2026')).length",
            "outside": "Array.from(document.querySelectorAll('.js-plotly-plot')).flatMap(p => {"
            " const box = p.querySelector('.main-svg').getBoundingClientRect();"
            " return Array.from(p.querySelectorAll('.colorbar')).filter(c => {"
            " const r = c.getBoundingClientRect();"
            " return r.right > box.right + 1 || r.left < box.left - 1 || r.bottom > box.bottom + 1;"
            " }); }).length",
            # the attention figure draws a label for every key position
            "attention_labels": "Array.from(document.querySelectorAll('.js-plotly-plot'))"
            ".filter(e => (e.layout.title.text || '').startsWith('attention from position'))"
            ".map(e => e.querySelectorAll('.xtick text').length)",
            "view_titles": "Array.from(document.querySelectorAll('h4')).map(e => e.innerText)",
        },
    )
    assert seen.errors == []
    assert seen.console_errors == []
    assert seen.network_requests == []
    assert seen.facts["figures"] == 11
    assert seen.facts["drawn"] == 11
    assert seen.facts["heatmaps"] >= 5
    assert seen.facts["colorbars"] >= seen.facts["heatmaps"]
    assert seen.facts["colorbar_titles"] == seen.facts["colorbars"]
    assert seen.facts["cut_titles"] == 0
    assert seen.facts["outside"] == 0
    assert seen.facts["attention_labels"] == [50]
    titles = seen.facts["view_titles"]
    assert isinstance(titles, list)
    scales = ("white = 0, dark blue = " in t and "start of the continuation" in t for t in titles)
    assert sum(scales) == 2
    assert seen.facts["views"] == [1, 1, 1]
    headings = seen.facts["headings"]
    assert isinstance(headings, list)
    assert len(headings) == 8
    assert headings[-2].startswith("7. Is the localization real?")
    assert headings[-1].startswith("9. Over training")


def test_the_specificity_verdict_of_an_edit_that_unlearned_nothing_is_no_effect() -> None:
    from memloc_tl.report import _specificity

    assert _specificity(0.0, 0.0) == "no effect"
    assert _specificity(0.5, 3.0).startswith("no effect on the unlearned paragraphs")
    assert "not specific" in _specificity(2.0, 3.0)
    assert _specificity(5.0, 1.0).startswith("it hit the unlearned paragraphs")
