"""The whole pipeline on one model, as one self-contained HTML page (``memloc report``).

Scan -> memorized (EM = 50) and non-memorized (EM <= 10) paragraphs -> rare-token heads ->
prefix perturbation -> head patching from the perturbed paragraphs -> gradient maps -> sparse
unlearning with the gradient mask vs a random mask of the same size. Each step is the library
call a notebook would make; this module only chooses the sets and lays out the page.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from memloc_tl.analysis.gradients import GradientComparison, compare_gradient_norms
from memloc_tl.analysis.patching import PatchingSweep, patching_sweep
from memloc_tl.analysis.perturbation import PerturbConfig, PrefixPerturbation, perturb_prefixes
from memloc_tl.analysis.rare_tokens import (
    RareTokenAttention,
    rare_token_attention,
    rarest_positions,
)
from memloc_tl.checkpoints import (
    CheckpointSeries,
    TrainingDynamics,
    check_fits,
    training_dynamics,
)
from memloc_tl.core.backend import HookedModel
from memloc_tl.core.paragraphs import Paragraphs, corpus_token_counts
from memloc_tl.core.validation import (
    check_bool,
    check_fraction,
    check_positive_int,
    check_real,
    check_seed,
)
from memloc_tl.editing.sparse_edit import EditConfig, EvalSets, compare_edits
from memloc_tl.localization.benchmark import (
    BenchmarkConfig,
    DeletionBenchmark,
    DeletionConfig,
    InjectionBenchmark,
    deletion_benchmark,
    injection_benchmark,
)
from memloc_tl.localization.injection import InjectionConfig
from memloc_tl.localization.localizers import LocalizeConfig
from memloc_tl.memorization import MemorizationScan, scan_memorization, summarize
from memloc_tl.uncertainty import HeadRanking, bootstrap_difference
from memloc_tl.viz import (
    CircuitsView,
    HtmlPage,
    attention_figure,
    attention_view,
    edit_comparison_figure,
    em_drop_figure,
    rarity_view,
    token_view,
)

if TYPE_CHECKING:
    import plotly.graph_objects as go


@dataclass(frozen=True)
class ReportConfig:
    """The settings of :func:`memorization_report` (every number checked when it is made, so a
    bad one fails before the first analysis, not after minutes of them).

    Attributes:
        n_paragraphs: paragraphs per set (memorized, non-memorized), at least 2.
        edit_lr, edit_steps, fraction: the sparse unlearning settings (paper: lr 1e-5 for
            GPT-Neo 125M; the small organism needs about 3e-2).
        seed: seed of the perturbations, the random mask and the bootstrap intervals.
        title: the page title.
        batch_size: paragraphs per forward pass.
        inj: also run INJ at the head level (section 8): plant a held-out non-memorized
            paragraph in a seeded head of the model (taken out again after) and rank the heads
            for it (up to 400 fine-tuning steps; the costliest section).
    """

    n_paragraphs: int = 8
    edit_lr: float = 1e-5
    edit_steps: int = 10
    fraction: float = 0.001
    seed: int = 0
    title: str = "memloc-tl report"
    batch_size: int = 16
    inj: bool = False

    def __post_init__(self) -> None:
        check_positive_int(self.n_paragraphs, "n_paragraphs")
        if self.n_paragraphs < 2:
            raise ValueError(f"n_paragraphs must be at least 2, got {self.n_paragraphs}")
        check_real(self.edit_lr, "edit_lr", above=0.0)
        check_positive_int(self.edit_steps, "edit_steps")
        check_fraction(self.fraction, "fraction")
        check_positive_int(self.batch_size, "batch_size")
        check_seed(self.seed)
        if not isinstance(self.title, str):
            raise TypeError(f"title must be a string, got {type(self.title).__name__}")
        check_bool(self.inj, "inj")


@dataclass(frozen=True)
class MemorizationReport:
    """Every result of :func:`memorization_report`, and the page that shows them.

    Attributes:
        title: the page title.
        scan: EM and NLL of every input paragraph.
        memorized, non_memorized: the paragraphs analyzed (at most ``n_paragraphs`` each).
        rare: rare-token attention on the memorized paragraphs.
        perturbation: prefix perturbation of both sets, keyed ``"memorized"`` and
            ``"non-memorized"``.
        sweep: every head patched from the perturbed memorized paragraphs (PMPs) into the
            memorized ones (``None`` if no PMP could be built).
        gradients: parameter-gradient maps, memorized vs non-memorized.
        edits: :func:`~memloc_tl.editing.compare_edits`'s table (gradient vs random mask).
        views: circuitsvis views of the first memorized paragraph.
        attention: the attention from the last prefix position of the first memorized
            paragraph, every token labelled, for the rare-token and patching heads.
        injection: INJ at the head level (``inj=True``): a non-memorized paragraph planted in
            a known head of the model (taken out again after), then looked for by the head
            localizers.
        deletion: DEL: for the first memorized paragraphs, their top weights by the paper's
            gradient criterion, by |w x grad| and at random zeroed; the target's EM against
            the other memorized paragraphs' (:func:`~memloc_tl.deletion_benchmark`).
        training: the memorized and non-memorized paragraphs over the checkpoints of a
            training run, and the rare-token and patching heads at every step (when the report
            was given checkpoints).
        notes: what the reader should know about the choices made.
    """

    title: str
    scan: MemorizationScan
    memorized: Paragraphs
    non_memorized: Paragraphs
    rare: RareTokenAttention
    perturbation: dict[str, PrefixPerturbation]
    sweep: PatchingSweep | None
    gradients: GradientComparison
    edits: pd.DataFrame
    views: tuple[CircuitsView, ...]
    deletion: DeletionBenchmark | None = None
    notes: tuple[str, ...] = ()
    attention: go.Figure | None = None
    injection: InjectionBenchmark | None = None
    seed: int = 0
    training: TrainingDynamics | None = None

    @functools.cached_property
    def rare_ranking(self) -> HeadRanking:
        """The rare-token ranking with its bootstrap interval over the memorized paragraphs."""
        return self.rare.bootstrap(BOOTSTRAP_RESAMPLES, seed=self.seed)

    @functools.cached_property
    def sweep_ranking(self) -> HeadRanking | None:
        """The patching ranking (mean dNLL) with its bootstrap interval."""
        return (
            None
            if self.sweep is None
            else self.sweep.bootstrap(BOOTSTRAP_RESAMPLES, seed=self.seed)
        )

    def to_frame(self) -> pd.DataFrame:
        """The findings, one row per section: columns section, finding (the page's lines)."""
        rows = [
            ("memorization", self.scan_finding()),
            ("rare-token heads", self.rare_finding()),
            ("prefix perturbation", self.perturbation_finding()),
            ("patching", self.patching_finding() if self.sweep is not None else "no PMP built"),
            ("gradients", self.gradient_finding()),
            ("sparse unlearning", self.edit_finding()),
        ]
        if self.injection is not None:
            rows.append(("injection", self.injection_finding()))
        if self.training is not None:
            rows += [("over training", line) for line in self.training.findings()]
        return pd.DataFrame(rows, columns=["section", "finding"])

    def figure(self) -> go.Figure:
        """The report's first figure, the EM distribution of the scan (:meth:`page` holds them
        all)."""
        return self.scan.figure()

    def __repr__(self) -> str:
        return (
            f"MemorizationReport({self.title!r}: {len(self.memorized)} memorized and "
            f"{len(self.non_memorized)} non-memorized paragraphs of {len(self.scan.paragraphs)})"
        )

    def page(self) -> HtmlPage:
        """The report as an :class:`~memloc_tl.viz.HtmlPage`: per section a definition, the
        evidence, the paper's number where it has one, and a line computed from the data."""
        page = HtmlPage(self.title)
        for note in self.notes:
            page.text(note, note=True)
        page.text(DEFINITIONS)

        page.heading("1. Memorization scan")
        page.text(
            "EM of every scanned paragraph: greedy decoding from its prefix against its true "
            "continuation."
        )
        page.table(summarize({"all": self.scan}))
        page.figure(self.scan.figure())
        page.text(self.scan_finding())

        page.heading("2. Rare-token heads (paper 6.2-6.3)")
        page.text(
            "Pooled Kendall tau between a prefix token's corpus-frequency rank and the attention "
            f"it receives from position {self.rare.query_pos} (the last prefix token), over the "
            "MPs; negative = the head attends to rare tokens. Paper (GPT-Neo 125M): L1H2 is the "
            "rare-token head, tau about -0.97."
        )
        page.figure(self.rare.figure())
        page.table(_top_frame(self.rare.top(5), "pooled tau (mean per rank)"))
        page.text(self.rare_finding())
        if self.attention is not None:
            page.figure(self.attention)
        for view in self.views:
            page.view(view)

        page.heading("3. Prefix-token perturbation (paper 4)")
        page.text(
            "Each prefix position in turn gets a random token; the EM drop is measured against "
            "the model's own greedy continuation of the unperturbed prefix, for both sets (the "
            "paper's definition; for an MP that is its own text). Paper (GPT-Neo 125M): mean "
            "EM drop per perturbed token 12.19 for MPs vs 33.12 for NMPs."
        )
        page.figure(em_drop_figure(*self.perturbation.items()))
        page.table(
            pd.DataFrame(
                {
                    "set": list(self.perturbation),
                    "mean EM drop per perturbed token": [
                        r.mean_drop_per_token() for r in self.perturbation.values()
                    ],
                }
            )
        )
        page.text(self.perturbation_finding())

        page.heading("4. Head patching (paper 6, appendix A.3)")
        if self.sweep is None:
            page.text("No perturbed paragraph could be built, so no patching sweep.", note=True)
        else:
            page.text(
                "Each head alone patched from the PMP into its MP (all positions of the head's "
                "output): the change of the continuation NLL. Large = the head carries what "
                "recall needs from the prefix. The paper ties this to the rare-token head, L1H2."
            )
            page.figure(self.sweep.figure())
            page.table(_top_frame(self.sweep.top(5), "mean dNLL"))
            page.text(self.patching_finding())

        page.heading("5. Parameter gradients (paper 5.1-5.2)")
        page.text(
            "Per layer and weight matrix, the largest |gradient| of the continuation NLL (the "
            "paper's attribution), for MPs and NMPs (top: MP; bottom: each cell's share of "
            "its map's total, MP - NMP). The table sums the shares per layer. Paper (GPT-Neo "
            "125M): MPs have relatively more gradient in the lower layers, NMPs in the higher."
        )
        page.figure(self.gradients.figure())
        shares = pd.DataFrame(
            {
                "layer": list(range(self.gradients.memorized.max_abs.scores.shape[0])),
                "MP - NMP layer share": self.gradients.layer_share_difference().tolist(),
            }
        )
        page.table(shares)
        page.text(self.gradient_finding())

        page.heading("6. Sparse unlearning (paper 5.3)")
        page.text(
            "Fine-tuning only the top 0.1% of weights by contrastive gradient (MPs up, NMPs "
            "kept) vs a random 0.1%. Edited: the MPs unlearned, EM against their true text. "
            "Held-out: other NMPs, EM against the original model's greedy continuation (so 50 "
            "before): how far the edit changes the model elsewhere. Paper (GPT-Neo 125M, "
            "Fig. 5): MP EM after, top-0.1% 26.75, random 0.1% 49.80."
        )
        sets = [name for name in ("edited", "heldout") if name in set(self.edits["set"])]
        page.figure(edit_comparison_figure(self.edits, set_name=sets))
        page.table(self.edits)
        page.text(self.edit_finding())

        if self.deletion is not None:
            page.heading("7. Is the localization real? Deletion specificity")
            page.text(
                "Unlearning through a mask does not show that the mask holds the paragraph. "
                "Here each of the first memorized paragraphs is localized on its own, its top "
                "weights are zeroed (nothing is trained), and its EM is compared with the other "
                "memorized paragraphs'. Specificity = the target's EM drop minus the others' "
                "mean EM drop: high when the weights are the target's own."
            )
            summary = self.deletion.summary()
            page.figure(self.deletion.figure())
            page.table(summary)
            best = summary.sort_values("specificity", ascending=False).iloc[0]
            paper = summary.loc[summary["method"] == "gradient", "specificity"]
            page.text(
                f"Most specific: {best['method']} (specificity {best['specificity']:.1f}); "
                f"the paper's gradient criterion: {float(paper.iloc[0]):.1f}. Injection "
                "benchmarks with known ground truth (memloc_tl.localization) say whether a "
                "localizer finds where a paragraph was put.",
                note=True,
            )

        if self.injection is not None:
            page.heading("8. Is the localization real? A head with known contents")
            page.text(
                "A non-memorized paragraph is fine-tuned into all weights of one chosen head of "
                "the model (everything else frozen, a KL term holding the rest), then "
                "each head localizer ranks the heads for that paragraph. Rank 1 = the planted "
                "head found. Random ranks it by chance."
            )
            columns = ["seed", "steps", "em_before", "em_after", "abs_w_before", "abs_w_after"]
            columns += [c for c in self.injection.injections if c.startswith("memorized_mean_em")]
            page.table(self.injection.injections.loc[:, columns])
            page.table(self.injection.summary().loc[:, ["method", "mean_rank", "top1", "cost"]])
            page.text(self.injection_finding())

        if self.training is not None:
            timeline = self.training.timeline
            page.heading("9. Over training")
            page.text(
                f"The analyzed paragraphs at each of {len(timeline.steps)} training checkpoints "
                f"of {timeline.name} (steps {', '.join(map(str, timeline.steps))}): when each "
                "became memorized, and where the MPs' rare-token and patching heads rank at "
                "each step (patched from the same PMPs at every step). A head that ranks first "
                "before the paragraphs are memorized was in place before they were."
            )
            page.figure(timeline.heatmap())
            for heads in self.training.heads:
                page.figure(heads.figure())
            for line in self.training.findings():
                page.text(line)
        return page

    def injection_finding(self) -> str:
        """One line: how many head localizers ranked the planted head first."""
        if self.injection is None:
            return "No injection benchmark (memorization_report(..., inj=True) runs one)."
        summary = self.injection.summary().set_index("method")
        localizers = summary.drop(index="random", errors="ignore")
        found = [str(m) for m, row in localizers.iterrows() if row["top1"] == 1.0]
        em = self.injection.injections["em_after"].iloc[0]
        injections = self.injection.injections
        if not bool(injections["succeeded"].all()):
            return (
                f"Here the injection did NOT succeed: the planted paragraph reached EM {em} of "
                f"{self.scan.continuation_len} within {int(injections['steps'].iloc[0])} steps, "
                "so no truth was planted "
                "and the localizers are not scored (a head may be too small a place for an "
                "unseen paragraph in this model)."
            )
        state = "succeeded"
        if "damaging" in injections and bool(injections["damaging"].any()):
            state += " and damaged the model"
        line = (
            f"Here {_count(len(injections), 'injection')} {state}: the planted paragraph reached "
            f"EM {em}; {len(found)} of {len(localizers)} head localizers ranked the planted "
            "head first"
        )
        line += f" ({', '.join(found)})" if found else ""
        if "random" in summary.index:
            line += f"; random ranked it {summary.loc['random', 'mean_rank']:.0f}"
        return line + "."

    def scan_finding(self) -> str:
        """One line: how many paragraphs are memorized."""
        full, low = len(self.scan.memorized()), len(self.scan.non_memorized())
        return (
            f"Here: {full} of {len(self.scan)} paragraphs are memorized (EM = "
            f"{self.scan.continuation_len}) and {low} non-memorized (EM <= 10); analyzed: "
            f"{len(self.memorized)} MPs and {len(self.non_memorized)} NMPs."
        )

    def rare_finding(self) -> str:
        """One line: this model's rare-token head, and where the paper's L1H2 ranks here."""
        (head, tau), *_ = self.rare.top(1)
        ranking = self.rare_ranking
        line = (
            f"Here the head that attends most to rare tokens is {head} (tau {tau:.2f}): by this "
            "criterion, this model's counterpart of GPT-Neo 125M's L1H2. How sure: "
            f"{ranking.verdict()}."
        )
        scores = self.rare.pooled_tau_mean
        n_layers, n_heads = scores.scores.shape
        if n_layers > 1 and n_heads > 2 and str(head) != "L1H2":
            line += f" L1H2 itself: {ranking.describe('L1H2')}."
        return line

    def perturbation_finding(self) -> str:
        """One line: are MPs more robust to a changed prefix token than NMPs, as in the paper
        (with the bootstrap interval of the difference over paragraphs)?"""
        drops = {name: r.mean_drop_per_token() for name, r in self.perturbation.items()}
        mp, nmp = drops["memorized"], drops["non-memorized"]
        difference = bootstrap_difference(
            self.perturbation["memorized"].mean_drop_per_paragraph(),
            self.perturbation["non-memorized"].mean_drop_per_paragraph(),
            name="EM drop per token, MP - NMP",
            n_resamples=BOOTSTRAP_RESAMPLES,
            seed=self.seed,
        )
        robust = difference.point < 0  # the statistic whose interval the line reports
        line = (
            f"Here: {mp:.2f} memorized vs {nmp:.2f} non-memorized (difference per paragraph "
            f"{difference.describe()}): "
        )
        if not difference.resolved:
            return line + "not resolved at this sample size (the interval includes 0)."
        return line + (
            f"memorized recall is {'more' if robust else 'less'} robust to a single changed "
            "prefix token than a non-memorized continuation, "
            + ("as in the paper." if robust else "unlike the paper.")
        )

    def patching_finding(self) -> str:
        """One line: the head patching hurts most, and whether it is the rare-token head."""
        if self.sweep is None:
            return "No patching sweep."
        (head, delta), *_ = self.sweep.top(1)
        sweep_ranking, rare_ranking = self.sweep_ranking, self.rare_ranking
        assert sweep_ranking is not None
        (rare_head, _), *_ = self.rare.top(1)
        if not (sweep_ranking.resolved and rare_ranking.resolved):
            verdict = (
                "whether it is also the rare-token head is not resolved at this sample size: "
                "the bootstrap does not separate the candidates (more memorized paragraphs "
                "would tell)."
            )
        elif head == rare_head:
            verdict = (
                "it is also the head that attends most to rare tokens, as the paper found for L1H2."
            )
        else:
            verdict = (
                f"the rare-token head is {rare_head}: here the head that reads rare tokens is "
                "not the one whose patching hurts recall most."
            )
        return (
            f"Here patching changes the NLL most at {head} (+{delta:.3f}; "
            f"{sweep_ranking.verdict()}). By rare-token preference {rare_ranking.describe(head)}; "
            f"{verdict}"
        )

    def gradient_finding(self) -> str:
        """One line: lower-layer share of MPs vs NMPs, against the paper's direction."""
        difference = self.gradients.layer_share_difference()
        half = max(1, len(difference) // 2)
        lower = float(difference[:half].sum())
        same = lower > 0
        layers = "layer 0" if half == 1 else f"layers 0-{half - 1}"
        return (
            f"Here the lower half of the {len(difference)} layers ({layers}) holds "
            f"{abs(lower):.3f} {'more' if same else 'less'} of the MPs' gradient share than of "
            "the NMPs': "
            + ("the paper's direction" if same else "the opposite of the paper's direction")
            + f" (one map each from the summed gradient of {len(self.memorized)} MPs and "
            f"{len(self.non_memorized)} NMPs: no interval over paragraphs)."
        )

    def edit_finding(self) -> str:
        """One line per mask: edited and held-out EM, before and after."""
        rows = self.edits.loc[self.edits["metric"] == "mean_em"]
        parts = []
        for mask, group in rows.groupby("mask", sort=False):
            cells = {r["set"]: (r["before"], r["after"]) for _, r in group.iterrows()}
            (before, after) = cells["edited"]
            text = f"{mask} mask: edited EM {before:.1f} -> {after:.1f}"
            if "heldout" in cells:
                (held_before, held_after) = cells["heldout"]
                text += f", held-out {held_before:.1f} -> {held_after:.1f}"
                text += f" ({_specificity(before - after, held_before - held_after)})"
            parts.append(text)
        sample = _count(len(self.memorized), "unlearned paragraph")
        return f"Here, for {sample}: " + "; ".join(parts) + "."

    def write_html(self, path: str | os.PathLike[str]) -> Path:
        """Write the self-contained page (opens with no network)."""
        return self.page().write(path)


DEFINITIONS = (
    "A paragraph is a 50-token prefix and a 50-token continuation. EM (exact match): how many "
    "continuation tokens greedy decoding from the prefix reproduces before the first mistake. "
    "MP: memorized paragraph (EM = 50). NMP: non-memorized paragraph (EM <= 10). PMP: an MP "
    "with the one prefix token changed that lowers its EM most. NLL: mean negative "
    "log-likelihood of the continuation tokens."
)


BOOTSTRAP_RESAMPLES = 1000
"""Resamples behind every interval and verdict of the report (seeded by the report's seed)."""


def _count(n: int, noun: str) -> str:
    return f"one {noun}" if n == 1 else f"{n} {noun}s"


def _specificity(edited_drop: float, heldout_drop: float) -> str:
    """What an edit's two EM drops say: did it hit what it unlearned, or everything?"""
    if edited_drop < 1.0:  # nothing unlearned: "not specific" would say it did something
        if heldout_drop < 1.0:
            return "no effect"
        return f"no effect on the unlearned paragraphs; the held-out ones lost {heldout_drop:.1f}"
    if edited_drop > heldout_drop:
        return "it hit the unlearned paragraphs more than the held-out ones"
    return "it changed the held-out paragraphs more than the unlearned ones: not specific"


def _top_frame(top: Sequence[tuple[object, float]], score: str) -> pd.DataFrame:
    return pd.DataFrame({"head": [str(h) for h, _ in top], score: [s for _, s in top]})


def memorization_report(
    model: HookedModel,
    paragraphs: Paragraphs,
    *,
    corpus_counts: Int[Tensor, " d_vocab"] | None = None,
    general: Paragraphs | None = None,
    checkpoints: CheckpointSeries | None = None,
    config: ReportConfig | None = None,
    progress: bool = True,
) -> MemorizationReport:
    """Run the paper's analyses on ``paragraphs`` and collect them in a report.

    Args:
        model: the model (not changed; the edits work on copies).
        paragraphs: paragraphs to scan; the memorized (EM = 50) and non-memorized (EM <= 10)
            ones are analyzed, at most ``config.n_paragraphs`` of each. Needs at least 2 of
            each.
        corpus_counts: unigram counts for the rare-token analysis; default the counts over
            ``paragraphs`` themselves (noted in the report).
        general: general text for the perplexity of the edited models (optional).
        checkpoints: training checkpoints of the model (e.g. ``organism.checkpoints``): adds
            section 9, the analyzed paragraphs and their heads over training.
        config: the settings (:class:`ReportConfig`; default ``ReportConfig()``).
        progress: show progress bars.
    """
    config = ReportConfig() if config is None else config
    if not isinstance(config, ReportConfig):
        raise TypeError(f"config must be a ReportConfig, got {type(config).__name__}")
    if checkpoints is not None and not isinstance(checkpoints, CheckpointSeries):
        raise TypeError(f"checkpoints must be a CheckpointSeries, got {type(checkpoints).__name__}")
    if checkpoints is not None:  # before the first analysis, not after all of them
        check_fits(checkpoints, paragraphs)
    n_paragraphs, seed, batch_size = config.n_paragraphs, config.seed, config.batch_size
    notes: list[str] = []
    scan = scan_memorization(model, paragraphs, batch_size=batch_size, progress=progress)
    memorized, non_memorized = scan.memorized(), scan.non_memorized()
    if len(memorized) < 2 or len(non_memorized) < 2:
        raise ValueError(
            f"the report needs at least 2 memorized (EM = {scan.continuation_len}) and 2 "
            f"non-memorized (EM <= 10) paragraphs; the scan found {len(memorized)} and "
            f"{len(non_memorized)}. Pass more paragraphs."
        )
    # Held-out non-memorized paragraphs for the edit evaluation, disjoint from those analyzed.
    heldout = non_memorized[n_paragraphs : 2 * n_paragraphs]
    every_memorized = memorized
    memorized, non_memorized = memorized[:n_paragraphs], non_memorized[:n_paragraphs]
    if len(every_memorized) > len(memorized):
        notes.append(
            f"Rare-token attention (one forward pass per paragraph) uses all "
            f"{len(every_memorized)} memorized paragraphs; perturbation, patching, gradients "
            f"and unlearning, which cost far more, the first {len(memorized)} (n_paragraphs)."
        )
    if corpus_counts is None:
        corpus_counts = corpus_token_counts(paragraphs, d_vocab=model.cfg.d_vocab)
        notes.append(
            "Token rarity is counted over the scanned paragraphs only (no corpus counts given)."
        )

    rare = rare_token_attention(
        model, every_memorized, corpus_counts, batch_size=batch_size, progress=progress
    )
    perturbation = {
        # Both against the model's greedy continuation of the unperturbed prefix, the paper's
        # definition (for memorized paragraphs that is their own text): against the true text a
        # non-memorized paragraph starts near EM 0 and cannot drop.
        "memorized": perturb_prefixes(
            model,
            memorized,
            config=PerturbConfig(em_against="greedy", seed=seed, batch_size=2 * batch_size),
            progress=progress,
        ),
        "non-memorized": perturb_prefixes(
            model,
            non_memorized,
            config=PerturbConfig(em_against="greedy", seed=seed, batch_size=2 * batch_size),
            build_perturbed=False,
            progress=progress,
        ),
    }
    pmp = perturbation["memorized"].perturbed
    sweep = None
    if pmp is not None and len(pmp) == len(memorized):
        sweep = patching_sweep(
            model, memorized, pmp, batch_size=max(1, batch_size // 4), progress=progress
        )
    gradients = compare_gradient_norms(
        model, memorized, non_memorized, batch_size=batch_size, progress=progress
    )
    edits, _ = compare_edits(
        model,
        memorized,
        keep=non_memorized,
        masks=("gradient", "random"),
        config=EditConfig(
            fraction=config.fraction,
            lr=config.edit_lr,
            steps=config.edit_steps,
            seed=seed,
            batch_size=batch_size,
        ),
        evaluate_on=EvalSets(heldout=heldout if len(heldout) else None, general=general),
        progress=progress,
    )

    settings = LocalizeConfig(batch_size=batch_size)  # the seed is each benchmark's own
    deletion = deletion_benchmark(
        model,
        memorized[:2],
        others=memorized,
        non_memorized=non_memorized,
        config=DeletionConfig(fraction=config.fraction),
        benchmark=BenchmarkConfig(
            methods=("gradient", "grad_x_weight", "random"), seeds=(seed,), localize=settings
        ),
        progress=progress,
    )

    injection = None
    if config.inj:
        planted = heldout[:1] if len(heldout) else non_memorized[:1]
        injection = injection_benchmark(
            model,
            planted,
            keep=Paragraphs.concat(non_memorized, memorized),
            config=InjectionConfig(level="heads", seed=seed),
            benchmark=BenchmarkConfig(
                methods=("zero_ablation", "attribution", "activation", "random"),
                seeds=(seed,),
                localize=settings,
            ),
            memorized=memorized,
            progress=progress,
        )

    tokens = memorized.tokens[0]
    prefix_len = memorized.prefix_len
    rarest = rarest_positions(tokens[:prefix_len], corpus_counts, rare.k_rarest)
    top_heads = [head for head, _ in rare.top(2)]
    patching_head = sweep.top(1)[0][0] if sweep is not None else None
    if patching_head is not None and patching_head not in top_heads:
        top_heads.append(patching_head)
    drop = perturbation["memorized"].em_drop.scores[0].nan_to_num(0.0)
    views = (
        attention_view(model, tokens, top_heads, rare_positions=rarest, prefix_len=prefix_len),
        rarity_view(model, tokens, corpus_counts, prefix_len=prefix_len),
        token_view(
            model, tokens, drop, title="EM drop when the token is perturbed", prefix_len=prefix_len
        ),
    )
    attention = attention_figure(
        model, tokens, top_heads, query_pos=rare.query_pos, rare_positions=rarest
    )
    training = None
    if checkpoints is not None:
        training = training_dynamics(
            checkpoints,
            memorized,
            corpus_counts,
            others=non_memorized,
            source=pmp if sweep is not None else None,
            progress=progress,
        )
    return MemorizationReport(
        title=config.title,
        scan=scan,
        memorized=memorized,
        non_memorized=non_memorized,
        rare=rare,
        perturbation=perturbation,
        sweep=sweep,
        gradients=gradients,
        edits=edits,
        views=views,
        deletion=deletion,
        attention=attention,
        injection=injection,
        seed=seed,
        training=training,
        notes=(
            f"Model: {model.cfg.model_name} ({model.cfg.n_layers} layers x "
            f"{model.cfg.n_heads} heads); seed {seed}; generated with torch {torch.__version__}.",
            *notes,
        ),
    )
