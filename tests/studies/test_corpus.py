"""Corpus scans: streamed input, Parquet shards, torchrun with two ranks, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from memloc_tl import Paragraphs, scan_memorization
from memloc_tl.corpus import (
    CorpusConfig,
    Placement,
    documents_from_files,
    documents_from_texts,
    documents_from_token_file,
    init_distributed,
    local_device,
    read_corpus_scan,
    scan_corpus,
)
from memloc_tl.organism import Organism, corpus_texts

N_DOCS = 60


@pytest.fixture(scope="module")
def texts(organism: Organism) -> list[str]:
    """Background documents of the organism's corpus, with its planted paragraphs among them."""
    planted = [organism.tokenizer.decode(row) for row in organism.planted.tokens]
    background = corpus_texts()[: N_DOCS - len(planted)]
    mixed = [text for pair in zip(background, planted, strict=False) for text in pair]
    return mixed + background[len(planted) :]


@pytest.fixture(scope="module")
def reference(organism: Organism, texts: list[str], tmp_path_factory: Any) -> pd.DataFrame:
    """The single-process scan of the texts, every non-overlapping window, 7 documents a shard."""
    out = tmp_path_factory.mktemp("single")
    config = CorpusConfig(windows="all", docs_per_shard=7)
    documents = documents_from_texts(texts, organism.model)
    scan_corpus(organism.model, documents, out, config=config, progress=False)
    return read_corpus_scan(out)


def test_the_corpus_scan_equals_scan_memorization(
    organism: Organism, texts: list[str], reference: pd.DataFrame
) -> None:
    paragraphs = Paragraphs.from_texts(texts, organism.model, windows="all", on_short="skip")
    scan = scan_memorization(organism.model, paragraphs, progress=False)
    assert reference["id"].tolist() == list(paragraphs.ids)
    assert reference["exact_match"].tolist() == scan.exact_match.tolist()
    np.testing.assert_allclose(reference["nll"], scan.nll.numpy(), atol=1e-5)
    assert reference["memorized"].any()  # the organism's planted paragraphs are in its corpus
    assert (~reference["memorized"]).any()


def test_the_memorization_score_against_hand_written_loops(
    organism: Organism, texts: list[str], reference: pd.DataFrame
) -> None:
    model = organism.model
    rows = reference.iloc[[*range(0, len(reference), max(1, len(reference) // 6))]]
    tokenizer = model.tokenizer
    for row in rows.itertuples():
        ids = tokenizer(texts[int(row.document)], add_special_tokens=False)["input_ids"]
        window = torch.tensor(ids[row.start : row.start + 100])
        # one forward per continuation position: the argmax given the true context
        with torch.no_grad():
            hits = [
                int(model(window[None, : 50 + i])[0, -1].argmax()) == int(window[50 + i])
                for i in range(50)
            ]
        assert row.teacher_forced_match == pytest.approx(sum(hits) / 50)
        leading = next((i for i, hit in enumerate(hits) if not hit), 50)
        assert row.exact_match == leading
    assert "memorization_score" not in reference.columns  # Pythia's score only when asked for


def test_pythias_memorization_score_is_free_running_generation(
    organism: Organism, texts: list[str], reference: pd.DataFrame, tmp_path: Path
) -> None:
    """free_running=True: Pythia's score, the share of the continuation greedy generation gives."""
    model = organism.model
    config = CorpusConfig(windows="all", docs_per_shard=7, free_running=True)
    scan_corpus(model, documents_from_texts(texts, model), tmp_path, config=config, progress=False)
    table = read_corpus_scan(tmp_path)
    # the other columns are the plain scan's
    pd.testing.assert_frame_equal(table.drop(columns="memorization_score"), reference)
    rows = table.iloc[[*range(0, len(table), max(1, len(table) // 8))]]
    rows = pd.concat([rows, table[table["memorized"]].head(2)])
    windows = []
    for row in rows.itertuples():
        ids = model.tokenizer(texts[int(row.document)], add_special_tokens=False)["input_ids"]
        windows.append(ids[row.start : row.start + 100])
    tokens = torch.tensor(windows)
    context = tokens[:, :50]
    with torch.no_grad():  # independent: decoding by hand, one full forward per step
        for _ in range(50):
            context = torch.cat([context, model(context)[:, -1].argmax(-1, keepdim=True)], 1)
    expected = (context[:, 50:] == tokens[:, 50:]).float().mean(-1)
    assert rows["memorization_score"].tolist() == pytest.approx(expected.tolist())
    # the two scores differ after a first mismatch, and agree where recall is exact
    differs = table["memorization_score"] != table["teacher_forced_match"]
    assert differs.any()
    assert not differs[table["memorized"]].any()


def test_token_files_give_the_same_windows_as_text(
    organism: Organism, texts: list[str], tmp_path: Path
) -> None:
    tokenizer = organism.model.tokenizer
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[:20]]
    seq_len = 200
    rows = [r[:seq_len] for r in rows if len(r) >= seq_len]
    assert len(rows) >= 5
    raw = tmp_path / "tokens.bin"
    np.asarray(rows, dtype=np.uint16).tofile(raw)
    npy = tmp_path / "tokens.npy"
    np.save(npy, np.asarray(rows, dtype=np.uint32))
    config = CorpusConfig(windows="strided", stride=30, docs_per_shard=3)
    tables = []
    for documents in (
        documents_from_token_file(raw, seq_len=seq_len, dtype="uint16"),
        documents_from_token_file(npy, seq_len=seq_len),
        documents_from_texts([tokenizer.decode(r) for r in rows], organism.model),
    ):
        out = tmp_path / f"out{len(tables)}"
        scan_corpus(organism.model, documents, out, config=config, progress=False)
        tables.append(read_corpus_scan(out))
    pd.testing.assert_frame_equal(tables[0], tables[1])
    # decoding and re-encoding a token row gives the same tokens for this tokenizer's text
    assert tables[0][["id", "start", "exact_match"]].equals(
        tables[2][["id", "start", "exact_match"]]
    )
    assert len(tables[0]) == len(rows) * len(range(0, seq_len - 100 + 1, 30))
    with pytest.raises(ValueError, match="not a multiple of seq_len"):
        next(documents_from_token_file(raw, seq_len=7, dtype="uint16"))


def test_a_streaming_dataset_is_scanned_in_bounded_memory(
    organism: Organism, texts: list[str], tmp_path: Path
) -> None:
    """Documents are pulled one shard at a time: the stream is never materialized."""
    pulled = []

    def stream() -> Any:
        for i in range(10_000_000):  # far more than would fit in memory as token windows
            pulled.append(i)
            yield {"text": texts[i % len(texts)], "id": f"doc{i}"}

    config = CorpusConfig(windows="first", docs_per_shard=4, limit=12)
    documents = documents_from_texts(stream(), organism.model, id_column="id", batch=4)
    summary = scan_corpus(organism.model, documents, tmp_path / "s", config=config, progress=False)
    assert summary.documents == 12
    assert len(pulled) <= 12 + 4  # at most one tokenizer batch beyond the limit
    table = read_corpus_scan(tmp_path / "s")
    assert table["id"].tolist()[:2] == ["doc0", "doc1"]


def _jsonl(texts: list[str], path: Path) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    return path


def _torchrun(organism_cache: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "memloc_tl",
        "scan",
        "--model",
        "organism",
        "--tiny",
        "--cache-dir",
        str(organism_cache),
        "--device",
        "cpu",
        "--data",
        str(data),
        "--out-dir",
        str(out),
        "--windows",
        "all",
        *extra,
    ]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_torchrun_two_processes_equal_one_and_resume_after_kill_9(
    organism: Organism, organism_cache: Path, texts: list[str], tmp_path: Path
) -> None:
    many = texts * 3  # enough shards that the kill lands midway
    data = _jsonl(many, tmp_path / "corpus.jsonl")
    single = tmp_path / "single"
    config = CorpusConfig(windows="all", docs_per_shard=2)
    scan_corpus(
        organism.model,
        documents_from_files([data], organism.model, id_column="auto"),
        single,
        config=config,
        progress=False,
    )
    expected = read_corpus_scan(single)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    shards = ("--docs-per-shard", "2")
    # two ranks, one of them killed midway; then two ranks resume: the single-process table
    killed = tmp_path / "killed"
    launcher = subprocess.Popen(
        _torchrun(organism_cache, data, killed, *shards),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while len(list(killed.glob("shard-*.json"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        workers = _children(launcher.pid)
        assert workers, "no torchrun workers found"
        os.kill(max(workers), signal.SIGKILL)  # one rank dies mid-scan
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    finished = len(list(killed.glob("shard-*.json")))
    assert 4 <= finished < len(many) // 2, "the kill did not land midway"
    with pytest.raises(ValueError, match="--resume"):
        read_corpus_scan(killed)
    resumed = subprocess.run(
        _torchrun(organism_cache, data, killed, *shards, "--resume"),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipped" in resumed.stdout
    table = read_corpus_scan(killed)
    assert table["id"].is_unique
    pd.testing.assert_frame_equal(table, expected)


def test_torchrun_scans_the_organisms_checkpoints_like_one_process(
    organism: Organism, organism_cache: Path, texts: list[str], tmp_path: Path
) -> None:
    from memloc_tl.checkpoints import corpus_timeline, read_corpus_series, scan_corpus_checkpoints

    data = _jsonl(texts[:20], tmp_path / "corpus.jsonl")
    single = tmp_path / "single"
    scan_corpus_checkpoints(
        organism.checkpoints,
        documents_from_files([data], organism.model, id_column="auto"),
        single,
        config=CorpusConfig(windows="all", docs_per_shard=3),
        progress=False,
    )
    out, table = tmp_path / "two-ranks", tmp_path / "series.parquet"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*_torchrun(organism_cache, data, out, "--docs-per-shard", "3", "--checkpoints")]
    done = subprocess.run(
        [*command, "--out", str(table)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = read_corpus_series(single)
    pd.testing.assert_frame_equal(read_corpus_series(out), expected)
    pd.testing.assert_frame_equal(pd.read_parquet(table), expected, check_dtype=False)
    timeline = corpus_timeline(out)
    memorized = ", ".join(
        f"{step}: {n}"
        for step, n in zip(timeline.steps, timeline.memorized.sum(-1).tolist(), strict=True)
    )
    assert f"memorized per step: {memorized}" in done.stdout
    assert done.stdout.count(f"step {timeline.steps[-1]}: rank ") == 2  # each rank, every step


def test_bad_corpus_input_is_refused(organism: Organism, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stride goes with"):
        CorpusConfig(windows="strided")
    with pytest.raises(ValueError, match="exceed the model's context"):
        scan_corpus(
            organism.model,
            iter([]),
            tmp_path / "x",
            config=CorpusConfig(prefix_len=200, continuation_len=100),
        )
    out = tmp_path / "once"
    scan_corpus(organism.model, iter([]), out, progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        scan_corpus(organism.model, iter([]), out, progress=False)
    with pytest.raises(ValueError, match="another config"):
        scan_corpus(organism.model, iter([]), out, config=CorpusConfig(windows="all"), resume=True)
    odd = tmp_path / "corpus.xyz"
    odd.write_text("text")
    with pytest.raises(ValueError, match="must all be one of"):
        documents_from_files([odd], organism.model)
    with pytest.raises(FileNotFoundError, match="no such file"):
        documents_from_files([tmp_path / "missing.jsonl"], organism.model)


def test_corpus_command_lines_are_checked_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from memloc_tl.cli import main

    data = _jsonl(["some text"], tmp_path / "c.jsonl")
    cases = [
        (["--token-file", str(data)], "pass --out-dir"),
        (["--data", str(data), "--token-file", str(data), "--out-dir", "o"], "exactly one of"),
        (["--data", str(data), "--out-dir", "o", "--windows", "strided"], "stride goes with"),
        (["--data", str(data), str(data), "--out", "x.csv"], "one file without --out-dir"),
        (["--data", str(data), "--out-dir", "o", "--out", str(tmp_path / "t.txt")], ".parquet"),
        (["--data", str(tmp_path / "none.jsonl"), "--out-dir", "o"], "none.jsonl: no such file"),
    ]
    for extra, message in cases:
        assert main(["scan", "--model", "organism", *extra]) == 2
        assert message in capsys.readouterr().err
    over_training = [
        (["--model", "organism", "--checkpoints", "--data", str(data)], "pass --out-dir"),
        (["--model", "x/y", "--checkpoints", "--data", str(data), "--out-dir", "o"], "name the"),
        (["--model", "organism", "--revisions", "step1", "--data", str(data), "--out-dir", "o"],
         "hub name"),
        (["--model", "x/y", "--revisions", "step1", "--checkpoints", str(tmp_path), "--data",
          str(data), "--out-dir", "o"], "not both"),
        (["--model", "x/y", "--checkpoints", str(tmp_path), "--data", str(data), "--out-dir",
          "o"], "not a checkpoint directory"),
    ]  # fmt: skip
    for argv, message in over_training:
        assert main(["scan", *argv]) == 2
        assert message in capsys.readouterr().err


def test_each_rank_scans_on_its_own_gpu_and_a_cpu_scan_uses_gloo_on_a_gpu_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Seen on an H100 machine: two CPU ranks were put on nccl and rank 1 on a GPU it lacked.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"1 GPU.*nproc_per_node.*--device cpu"):
        local_device()
    with pytest.raises(ValueError, match="nproc_per_node"):
        local_device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert local_device("cuda") == torch.device("cuda", 0)
    assert local_device() == torch.device("cuda", 0)

    calls: list[dict[str, Any]] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append({"set": device}))
    assert init_distributed("cpu") == Placement(rank=1, world_size=2)
    assert calls == [{"backend": "gloo"}]
    calls.clear()
    init_distributed("cuda")  # LOCAL_RANK 0: its own GPU, named to nccl
    gpu = torch.device("cuda", 0)
    assert calls == [{"set": gpu}, {"backend": "nccl", "device_id": gpu}]
