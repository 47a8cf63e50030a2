"""Memorization over training: the organism's checkpoints, series, and the timeline."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import shutil
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from memloc_tl import CheckpointSeries, Paragraphs, scan_checkpoints, scan_memorization
from memloc_tl.checkpoints import Checkpoint, step_of
from memloc_tl.models import load_model
from memloc_tl.organism import CHECKPOINTS, Organism, load_organism
from memloc_tl.results import HeadScores


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
