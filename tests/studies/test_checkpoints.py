"""Memorization over training: the organism's checkpoints, series, and the timeline."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from memloc_tl import CheckpointSeries, Paragraphs, scan_checkpoints, scan_memorization
from memloc_tl.checkpoints import Checkpoint, step_of
from memloc_tl.core.results import HeadScores
from memloc_tl.models import load_model
from memloc_tl.organism import CHECKPOINTS, Organism, load_organism


def test_the_last_checkpoint_is_the_final_model_and_every_one_is_checksummed(
    organism: Organism, tmp_path: Path
) -> None:
    series = organism.checkpoints
    report = organism.report
    assert list(series.steps) == report["checkpoint_steps"]
    assert len(series) == organism.config.n_checkpoints
    assert series.steps[-1] == report["total_steps"]  # the last one is the end of training
    last = Path(series.checkpoints[-1].source)
    final, kept = (
        load_file(organism.path / "model.safetensors"),
        load_file(last / "model.safetensors"),
    )
    assert final.keys() == kept.keys()
    for name, tensor in final.items():
        assert torch.equal(tensor, kept[name]), name  # bit for bit
    first = load_file(Path(series.checkpoints[0].source) / "model.safetensors")
    assert not all(torch.equal(first[n], final[n]) for n in final)  # earlier ones differ
    # a checkpoint changed on disk is refused when the organism loads
    copy = tmp_path / organism.path.name
    shutil.copytree(organism.path, copy)
    damaged = copy / CHECKPOINTS / last.name / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match=r"step-\d+/model.safetensors differs from when it was written"
    ):
        load_organism(copy)


def test_the_timeline_equals_scans_of_each_checkpoint_loaded_by_hand(
    organism: Organism, unchanged: Any
) -> None:
    paragraphs = Paragraphs.concat(organism.planted[:10], organism.control[:2])
    with unchanged(organism.model):
        timeline = scan_checkpoints(organism.checkpoints, paragraphs, progress=False)
    assert timeline.exact_match.shape == (len(organism.checkpoints), len(paragraphs))
    for i, checkpoint in enumerate(organism.checkpoints):
        by_hand = scan_memorization(load_model(checkpoint.source), paragraphs, progress=False)
        assert torch.equal(timeline.exact_match[i], by_hand.exact_match.cpu()), checkpoint.step
        torch.testing.assert_close(timeline.nll[i], by_hand.nll.float().cpu())
    final = scan_memorization(organism.model, paragraphs, progress=False)
    assert torch.equal(timeline.exact_match[-1], final.exact_match.cpu())
    # the first memorized step, and forgetting, read straight off the EM table
    full = paragraphs.continuation_len
    for j, step in enumerate(timeline.first_memorized_step().values()):
        column = timeline.exact_match[:, j].tolist()
        if step is None:
            assert full not in column
        else:
            at = timeline.steps.index(step)
            assert column[at] == full
            assert full not in column[:at]
    events = {
        (paragraphs.ids[j], timeline.steps[i])
        for i in range(1, len(timeline.steps))
        for j in range(len(paragraphs))
        if timeline.exact_match[i - 1, j] == full and timeline.exact_match[i, j] < full
    }
    assert set(timeline.forgetting_events()) == events
    # the most repeated tier ends memorized and is not memorized at the first checkpoint
    assert bool(timeline.memorized[-1, :8].float().mean() >= 0.75)
    frame = timeline.to_frame()
    assert len(frame) == len(timeline.steps) * len(paragraphs)
    row = frame[(frame["step"] == timeline.steps[1]) & (frame["id"] == paragraphs.ids[3])]
    assert int(row["exact_match"].iloc[0]) == int(timeline.exact_match[1, 3])
    assert len(timeline.figure().data) == len(paragraphs)
    heatmap = timeline.heatmap().data[0]
    memorized_at = timeline.first_memorized_step()
    order = [memorized_at[p] for p in heatmap.y]
    known = [s for s in order if s is not None]
    assert known == sorted(known)  # sorted by the step each became memorized
    assert order[len(known) :] == [None] * (len(order) - len(known))


def test_only_one_checkpoint_model_is_alive_at_a_time(organism: Organism) -> None:
    alive: list[weakref.ref[Any]] = []
    seen_alive: list[int] = []

    def tracked(checkpoint: Checkpoint) -> Checkpoint:
        def load() -> Any:
            gc.collect()
            seen_alive.append(sum(ref() is not None for ref in alive))
            model = checkpoint.load()
            alive.append(weakref.ref(model))
            return model

        return dataclasses.replace(checkpoint, load=load)

    series = organism.checkpoints
    series = dataclasses.replace(series, checkpoints=tuple(tracked(c) for c in series))
    scan_checkpoints(series, organism.planted[:2], progress=False)
    assert seen_alive == [0] * len(series)


def test_bad_series_are_refused_before_any_model_loads(
    organism: Organism, neo_checkpoint: Path, tmp_path: Path
) -> None:
    directories = [Path(c.source) for c in organism.checkpoints]
    with pytest.raises(ValueError, match="empty"):
        CheckpointSeries.from_directories([])
    with pytest.raises(ValueError, match="empty"):
        CheckpointSeries("x", ())
    with pytest.raises(ValueError, match=r"increase strictly.*order the checkpoints"):
        CheckpointSeries.from_directories(directories[::-1])
    with pytest.raises(ValueError, match="increase strictly"):
        CheckpointSeries.from_directories(directories[:2], steps=[5, 5])
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        CheckpointSeries.from_directories([*directories[:1], tmp_path / "step-999999"])
    other = tmp_path / "step-999999"
    shutil.copytree(neo_checkpoint, other)
    with pytest.raises(ValueError, match="another architecture"):
        CheckpointSeries.from_directories([*directories, other])
    retokenized = tmp_path / "tok" / "step-999999"
    shutil.copytree(directories[-1], retokenized)
    (retokenized / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="another tokenizer"):
        CheckpointSeries.from_directories([*directories, retokenized])
    with pytest.raises(ValueError, match="no training step"):
        step_of("final")
    assert step_of("step143000") == 143000
    assert step_of("/x/step-000120") == 120
    with pytest.raises(TypeError, match="CheckpointSeries"):
        scan_checkpoints([directories[0]], organism.planted)  # type: ignore[arg-type]
    # paragraphs of another tokenizer: refused at the first checkpoint, naming it
    foreign = dataclasses.replace(organism.planted[:2], vocab_fingerprint="0" * 16)
    with pytest.raises(ValueError, match=r"checkpoint at step \d+"):
        scan_checkpoints(organism.checkpoints, foreign, progress=False)


def test_localization_over_checkpoints_equals_each_analysis_by_hand(
    organism: Organism, unchanged: Any
) -> None:
    from memloc_tl import localize, localize_over_checkpoints, rare_token_attention

    series, paragraphs = organism.checkpoints, organism.planted[:6]
    counts = organism.corpus_counts
    with unchanged(organism.model):
        rare = localize_over_checkpoints(series, paragraphs, corpus_counts=counts, progress=False)
        ablation = localize_over_checkpoints(
            series, paragraphs, analysis="zero_ablation", progress=False
        )
    for i, checkpoint in enumerate(series):
        model = load_model(checkpoint.source)
        by_hand = rare_token_attention(model, paragraphs, counts, progress=False)
        torch.testing.assert_close(
            rare.scores[i], by_hand.pooled_tau_mean.scores.float(), equal_nan=True
        )
        found = localize(model, paragraphs, method="zero_ablation", level="heads")
        torch.testing.assert_close(ablation.scores[i], found.head_scores().scores.float())
    # each figure's axis says what the score is, as the analysis names it
    assert rare.score == by_hand.pooled_tau_mean.name
    assert rare.figure().layout.yaxis.title.text == rare.score
    # the final top head, its rank over steps, and the one-line answer, from the scores
    last = rare.at(series.steps[-1])
    (top, _), *_ = last.top(1, order="smallest")
    assert rare.final_top() == top
    ranks = rare.rank_over_steps()
    assert ranks[series.steps[-1]] == 1
    for step, rank in ranks.items():
        assert rank == rare.at(step).rank(top, order="smallest")
    since = rare.first_step_ranked_first()
    assert since is not None
    assert all(ranks[s] == 1 for s in series.steps if s >= since)
    earlier = [s for s in series.steps if s < since]
    assert not earlier or ranks[earlier[-1]] != 1
    timeline = scan_checkpoints(series, paragraphs, progress=False)
    answer = rare.answer(timeline)
    assert answer.startswith(f"{top} is the top head by rare_tokens")
    assert f"ranks first from step {since} on" in answer
    frame = ablation.to_frame()
    assert len(frame) == len(series) * ablation.scores[0].numel()
    assert len(ablation.figure(k=3).data) == 3

    # a custom analysis: any function of the model that gives HeadScores
    def negated(model: Any) -> HeadScores:
        found = localize(model, paragraphs, method="zero_ablation", level="heads")
        return HeadScores("minus zero ablation", -found.head_scores().scores)

    custom = localize_over_checkpoints(
        series, paragraphs, analysis=negated, order="smallest", progress=False
    )
    torch.testing.assert_close(custom.scores, -ablation.scores)
    assert custom.final_top() == ablation.final_top()
    assert custom.analysis == "negated"


def test_patching_and_head_localizers_over_checkpoints_equal_each_run_by_hand(
    organism: Organism,
) -> None:
    from memloc_tl import localize, localize_over_checkpoints, patching_sweep

    full = organism.checkpoints
    series = dataclasses.replace(full, checkpoints=full.checkpoints[::2])  # first, middle, last
    target, keep = organism.planted[:3], organism.control[:3]
    source = organism.control[3:6]  # row-aligned paragraphs patched in, the same at every step
    patched = localize_over_checkpoints(
        series, target, analysis="patching", source=source, progress=False
    )
    activation = localize_over_checkpoints(
        series, target, analysis="activation", keep=keep, progress=False
    )
    assert patched.order == activation.order == "largest"
    for i, checkpoint in enumerate(series):
        model = load_model(checkpoint.source)
        sweep = patching_sweep(model, target, source, progress=False)
        torch.testing.assert_close(patched.scores[i], sweep.mean_delta_nll.scores.float())
        found = localize(model, target, method="activation", level="heads", keep=keep)
        torch.testing.assert_close(activation.scores[i], found.head_scores().scores.float())
    assert patched.final_top() == patched.at(series.steps[-1]).top(1)[0][0]


def test_localization_over_checkpoints_refuses_bad_input_before_loading(
    organism: Organism,
) -> None:
    from memloc_tl import localize_over_checkpoints

    loads: list[int] = []
    series = organism.checkpoints
    counted = dataclasses.replace(
        series,
        checkpoints=tuple(
            dataclasses.replace(c, load=lambda c=c: loads.append(c.step) or c.load())
            for c in series
        ),
    )
    with pytest.raises(ValueError, match="needs corpus_counts"):
        localize_over_checkpoints(counted, organism.planted[:2])
    with pytest.raises(ValueError, match="analysis must be one of"):
        localize_over_checkpoints(counted, organism.planted[:2], analysis="bogus")
    with pytest.raises(ValueError, match="needs order="):
        localize_over_checkpoints(counted, organism.planted[:2], analysis=lambda m: m)
    with pytest.raises(ValueError, match="'patching' needs source"):
        localize_over_checkpoints(counted, organism.planted[:2], analysis="patching")
    with pytest.raises(ValueError, match="row-aligned"):
        localize_over_checkpoints(
            counted, organism.planted[:2], analysis="patching", source=organism.control[:3]
        )
    with pytest.raises(ValueError, match="source goes with analysis='patching'"):
        localize_over_checkpoints(
            counted, organism.planted[:2], analysis="zero_ablation", source=organism.control[:2]
        )
    with pytest.raises(ValueError, match="'activation' needs keep"):
        localize_over_checkpoints(counted, organism.planted[:2], analysis="activation")
    assert loads == []


def test_mask_drift_equals_the_overlap_of_masks_made_by_hand(organism: Organism) -> None:
    from memloc_tl import localize, mask_drift

    series, paragraphs = organism.checkpoints, organism.planted[:4]
    drift = mask_drift(series, paragraphs, fraction=0.01, progress=False)
    masks = []
    for checkpoint in series:
        mask = localize(load_model(checkpoint.source), paragraphs, method="gradient").param_mask(
            0.01
        )
        masks.append(torch.cat([mask.masks[n].flatten() for n in sorted(mask.masks)]))
    assert drift.sizes.tolist() == [int(m.sum()) for m in masks]
    by_hand = [int((a & b).sum()) for a, b in itertools.pairwise(masks)]
    assert drift.shared.tolist() == by_hand
    union = [int((a | b).sum()) for a, b in itertools.pairwise(masks)]
    expected = [s / u for s, u in zip(by_hand, union, strict=True)]
    assert drift.jaccard.tolist() == pytest.approx(expected)
    frame = drift.to_frame()
    assert frame["next_step"].tolist() == list(series.steps[1:])
    assert list(drift.figure().data[0].y) == pytest.approx(expected)
    with pytest.raises(ValueError, match="method must be one of"):
        mask_drift(series, paragraphs, method="random")
    with pytest.raises(ValueError, match="fraction"):
        mask_drift(series, paragraphs, fraction=1.5)


def test_the_corpus_scan_over_a_series_equals_one_scan_per_checkpoint_and_resumes(
    organism: Organism, tmp_path: Path
) -> None:
    from memloc_tl.checkpoints import (
        SERIES_FILE,
        corpus_timeline,
        read_corpus_series,
        scan_corpus_checkpoints,
        step_directory,
    )
    from memloc_tl.corpus import (
        CorpusConfig,
        documents_from_texts,
        read_corpus_scan,
        scan_corpus,
    )

    full = organism.checkpoints
    series = dataclasses.replace(full, checkpoints=full.checkpoints[-3:])
    texts = [organism.tokenizer.decode(row) for row in organism.planted.tokens[:8]]
    texts += [organism.tokenizer.decode(row) for row in organism.control.tokens[:4]]
    documents = list(documents_from_texts(texts, organism.model))
    config = CorpusConfig(docs_per_shard=5)
    out = tmp_path / "series"
    summaries = scan_corpus_checkpoints(series, documents, out, config=config, progress=False)
    assert [s.shards_scored for s in summaries] == [3, 3, 3]
    table = read_corpus_series(out)
    assert table.columns[0] == "step"
    timeline = corpus_timeline(out)
    assert timeline.steps == series.steps
    paragraphs = Paragraphs.from_texts(texts, organism.model, on_short="skip")
    by_checkpoints = scan_checkpoints(series, paragraphs, progress=False)
    assert timeline.ids == tuple(str(i) for i in range(len(texts)))
    assert torch.equal(timeline.exact_match, by_checkpoints.exact_match)
    torch.testing.assert_close(timeline.nll, by_checkpoints.nll)
    for checkpoint in series:  # each step's shards equal the corpus scan of it, by hand
        single = tmp_path / f"single-{checkpoint.step}"
        scan_corpus(load_model(checkpoint.source), documents, single, config=config, progress=False)
        expected = read_corpus_scan(single)
        got = table[table["step"] == checkpoint.step].drop(columns="step")
        pd.testing.assert_frame_equal(got.reset_index(drop=True), expected)

    # a lost shard: the series cannot be read; a resume scores only that shard, same table
    middle = step_directory(out, series.steps[1])
    (middle / "shard-000001.json").unlink()
    with pytest.raises(ValueError, match=rf"step {series.steps[1]}: .*--resume"):
        read_corpus_series(out)
    with pytest.raises(FileExistsError, match="resume"):
        scan_corpus_checkpoints(series, documents, out, config=config, progress=False)
    resumed = scan_corpus_checkpoints(
        series, documents, out, config=config, resume=True, progress=False
    )
    assert [s.shards_scored for s in resumed] == [0, 1, 0]
    pd.testing.assert_frame_equal(read_corpus_series(out), table)
    # another series, or a spent iterator, is refused before any model loads
    other = dataclasses.replace(full, checkpoints=full.checkpoints[:2])
    with pytest.raises(ValueError, match="another series"):
        scan_corpus_checkpoints(other, documents, out, config=config, resume=True)
    with pytest.raises(TypeError, match="re-iterable"):
        scan_corpus_checkpoints(series, iter(documents), tmp_path / "x")

    class Once:  # re-iterable in form, but spent after the first pass
        def __init__(self) -> None:
            self.rows = iter(documents)

        def __iter__(self) -> Any:
            return self.rows

    with pytest.raises(ValueError, match="gave 0 documents at step"):
        scan_corpus_checkpoints(series, Once(), tmp_path / "once", progress=False)
    assert (out / SERIES_FILE).is_file()


def test_a_hub_revision_series_loads_each_revision_offline(
    organism: Organism, tmp_path: Path
) -> None:
    """Pythia's path (``revision="step…"``), offline: the organism's checkpoints laid out as the
    revisions of one hub model in a Hugging Face cache; the timeline equals the directories'."""
    name = "EleutherAI/gpt-neo-125M"  # a name TransformerLens knows; its files are ours
    repo = tmp_path / ("models--" + name.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    series = organism.checkpoints
    for checkpoint in series:
        commit = f"{checkpoint.step:040x}"
        snapshot = repo / "snapshots" / commit
        shutil.copytree(checkpoint.source, snapshot)
        (repo / "refs" / f"step{checkpoint.step}").write_text(commit)
    # main is the end of training, as on the hub (TransformerLens reads the tokenizer there);
    # weights taken from main instead of the revision would fail the comparison below
    (repo / "refs" / "main").write_text(commit)
    paragraphs = organism.planted[:6]
    script = textwrap.dedent(
        f"""
        import json, torch
        from memloc_tl import CheckpointSeries, Paragraphs, scan_checkpoints
        series = CheckpointSeries.from_revisions(
            {name!r}, {[f"step{s}" for s in series.steps]}, device="cpu"
        )
        paragraphs = Paragraphs.from_tokens(
            torch.tensor({paragraphs.tokens.tolist()}), prefix_len={paragraphs.prefix_len}
        )
        timeline = scan_checkpoints(series, paragraphs, progress=False)
        print(json.dumps({{"steps": timeline.steps, "em": timeline.exact_match.tolist()}}))
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = json.loads(done.stdout.strip().splitlines()[-1])
    expected = scan_checkpoints(series, paragraphs, progress=False)
    assert output["steps"] == list(series.steps)
    assert output["em"] == expected.exact_match.tolist()
    assert len({tuple(row) for row in output["em"]}) > 1  # the revisions are different models
