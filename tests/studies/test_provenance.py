"""No silent wrong answer from a resumed, cached or saved artefact: each records what it was made
from, and a mismatch is an error naming both sides (never a table mixing two corpora)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM

from memloc_tl import EditConfig, Paragraphs, export_hf, load_model, sparse_edit
from memloc_tl.core.backend import copy_model, is_bridge, weights_fingerprint
from memloc_tl.core.files import CorruptFileError, atomic_directory, save_safetensors
from memloc_tl.corpus import (
    COLUMNS,
    CorpusConfig,
    Document,
    documents_from_files,
    documents_from_texts,
    documents_from_token_file,
    read_corpus_scan,
    scan_corpus,
)
from memloc_tl.editing import ParamMask, WeightEdit
from memloc_tl.organism import Organism, OrganismConfig, build_organism, organism_dir
from tests.conftest import random_neo

SHARD = 3  # documents per shard


def _documents(texts: list[str], model: Any, prefix: str = "d") -> list[Document]:
    return [
        Document(f"{prefix}{i}", doc.tokens)
        for i, doc in enumerate(documents_from_texts(texts, model))
    ]


@pytest.fixture(scope="module")
def corpora(organism: Organism) -> tuple[list[str], list[str]]:
    """Two corpora of 9 documents each, long enough for one window per document."""
    planted = [organism.tokenizer.decode(row) for row in organism.planted.tokens]
    return planted[:9], planted[9:16] + planted[:2]


def _files(texts: list[str], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_a_resume_with_another_corpus_is_refused(
    organism: Organism, corpora: tuple[list[str], list[str]], tmp_path: Path
) -> None:
    first, second = corpora
    config = CorpusConfig(docs_per_shard=SHARD)
    out = tmp_path / "scan"
    a = _files(first, tmp_path / "a")
    scan_corpus(
        organism.model,
        documents_from_files([a], organism.model),
        out,
        config=config,
        progress=False,
    )
    expected = read_corpus_scan(out)
    for marker in sorted(out.glob("shard-*.json"))[:2]:  # two shards "lost"
        marker.unlink()
    b = _files(second, tmp_path / "b")
    with pytest.raises(ValueError, match=r"another input.*corpus\.jsonl"):
        scan_corpus(
            organism.model,
            documents_from_files([b], organism.model),
            out,
            config=config,
            resume=True,
            progress=False,
        )
    # A plain iterable carries no fingerprint: each shard's input hash still tells them apart
    # (shards 0 and 1 rescored from B would silently join A's shard 2 otherwise).
    plain = tmp_path / "plain"
    scan_corpus(
        organism.model, _documents(first, organism.model), plain, config=config, progress=False
    )
    (plain / "shard-000000.json").unlink()
    with pytest.raises(ValueError, match=r"shard-000001\.parquet.*other documents"):
        scan_corpus(
            organism.model,
            _documents(second, organism.model),
            plain,
            config=config,
            resume=True,
            progress=False,
        )
    # the same input resumes and gives the same table
    scan_corpus(
        organism.model,
        documents_from_files([a], organism.model),
        out,
        config=config,
        resume=True,
        progress=False,
    )
    pd.testing.assert_frame_equal(read_corpus_scan(out), expected)


def test_a_resume_with_another_model_of_the_same_name_is_refused(
    organism: Organism, corpora: tuple[list[str], list[str]], tmp_path: Path
) -> None:
    first, _ = corpora
    out = tmp_path / "scan"
    config = CorpusConfig(docs_per_shard=SHARD)
    scan_corpus(
        organism.model, _documents(first, organism.model), out, config=config, progress=False
    )
    other = copy_model(organism.model)
    with torch.no_grad():
        next(iter(other.parameters())).mul_(1.01)
    assert other.cfg.model_name == organism.model.cfg.model_name
    assert weights_fingerprint(other) != weights_fingerprint(organism.model)
    (out / "shard-000000.json").unlink()
    with pytest.raises(ValueError, match=r"another model.*weights_sha256"):
        scan_corpus(
            other, _documents(first, other), out, config=config, resume=True, progress=False
        )


def test_duplicate_ids_short_shards_and_damaged_markers(
    organism: Organism, corpora: tuple[list[str], list[str]], tmp_path: Path
) -> None:
    first, _ = corpora
    docs = _documents(first[:4], organism.model)
    with pytest.raises(ValueError, match=r"documents 0 and 3 .* share the id 'd0'"):
        scan_corpus(
            organism.model,
            [*docs[:3], Document("d0", docs[3].tokens)],
            tmp_path / "dup",
            progress=False,
        )
    # the first shard holds only documents too short for a window: the columns keep their dtypes
    short = [Document(f"s{i}", np.arange(10)) for i in range(SHARD)]
    out = tmp_path / "short"
    scan_corpus(
        organism.model,
        [*short, *docs],
        out,
        config=CorpusConfig(docs_per_shard=SHARD),
        progress=False,
    )
    table = read_corpus_scan(out)
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == len(docs)
    dtypes = {name: str(dtype) for name, dtype in table.dtypes.items()}
    assert dtypes["exact_match"] == "int64"
    assert dtypes["nll"] == "float32"
    assert dtypes["memorized"] == "bool"
    all_short = tmp_path / "all-short"
    scan_corpus(organism.model, short, all_short, progress=False)
    empty = read_corpus_scan(all_short)
    assert len(empty) == 0
    assert str(empty.dtypes["exact_match"]) == "int64"
    # a marker holding null is a shard to score again, not a TypeError
    (out / "shard-000001.json").write_text("null")
    summary = scan_corpus(
        organism.model,
        [*short, *docs],
        out,
        config=CorpusConfig(docs_per_shard=SHARD),
        resume=True,
        progress=False,
    )
    assert (summary.shards_scored, summary.shards_skipped) == (1, 2)
    pd.testing.assert_frame_equal(read_corpus_scan(out), table)
    (out / "complete.json").write_text("null")
    with pytest.raises(CorruptFileError, match=r"complete\.json"):
        read_corpus_scan(out)


@pytest.mark.parametrize(
    ("array", "message", "error"),
    [
        (np.arange(200, dtype=np.float32), "float32 values; token ids must be integers", TypeError),
        (np.zeros((2, 10, 10), dtype=np.uint16), "3-D array", ValueError),
        (np.arange(150, dtype=np.uint16), "150 tokens, not a multiple of seq_len=100", ValueError),
        (np.zeros((3, 50), dtype=np.int32), "rows of 50 tokens, not seq_len=100", ValueError),
        (np.full(100, -1, dtype=np.int64), "negative token ids", ValueError),
        (np.zeros(0, dtype=np.uint16), "holds no tokens", ValueError),
    ],
)
def test_token_arrays_that_would_be_misread_are_refused(
    array: np.ndarray, message: str, error: type[Exception], tmp_path: Path
) -> None:
    path = tmp_path / "tokens.npy"
    np.save(path, array)
    with pytest.raises(error, match=message) as raised:
        documents_from_token_file(path, seq_len=100)
    assert "tokens.npy" in str(raised.value)  # the message names the file


def test_token_file_fingerprints_record_dtype_shape_and_content(tmp_path: Path) -> None:
    path = tmp_path / "tokens.npy"
    np.save(path, np.arange(300, dtype=np.uint16).reshape(3, 100))
    first = documents_from_token_file(path, seq_len=100).fingerprint
    assert (first["dtype"], first["shape"]) == ("uint16", [3, 100])
    np.save(path, np.arange(1, 301, dtype=np.uint16).reshape(3, 100))
    assert documents_from_token_file(path, seq_len=100).fingerprint != first
    raw = tmp_path / "tokens.bin"
    raw.write_bytes(b"")
    with pytest.raises(ValueError, match=r"tokens\.bin holds no tokens"):
        documents_from_token_file(raw, seq_len=100)


def test_empty_and_undecodable_input_files_name_themselves(
    organism: Organism, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl is empty"):
        documents_from_files([empty], organism.model)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(ValueError, match=r"latin\.txt: it is not UTF-8"):
        list(documents_from_files([latin], organism.model))
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(ValueError, match=r"garbled\.jsonl"):
        list(documents_from_files([garbled], organism.model))
    with pytest.raises(ValueError, match=r"all one kind.*\.jsonl, \.txt"):
        documents_from_files([garbled, latin], organism.model)


def test_an_organism_cache_entry_of_another_build_is_refused(
    organism: Organism, organism_cache: Path, tmp_path: Path
) -> None:
    asked = OrganismConfig.tiny(seed=12345)  # never built: its entry is a link to another build
    entry = organism_dir(asked, tmp_path)
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.symlink_to(organism.path, target_is_directory=True)
    with pytest.raises(ValueError, match=r"another configuration.*'seed': \(0, 12345\)"):
        build_organism(asked, cache_dir=tmp_path, progress=False)
    # the real entry still loads
    assert build_organism(OrganismConfig.tiny(), cache_dir=organism_cache).path == organism.path


def test_a_saved_edit_with_one_flipped_byte_is_refused(organism: Organism, tmp_path: Path) -> None:
    memorized, keep = organism.planted[:1], organism.control[:4]
    config = EditConfig(steps=1, lr=1e-2)
    result = sparse_edit(organism.model, memorized, keep=keep, config=config, progress=False)
    path = tmp_path / "edit.safetensors"
    result.edit.save(path)
    loaded = WeightEdit.load(path)  # intact: loads, with the same values
    for name in result.edit.mask.names:
        assert torch.equal(loaded.after[name], result.edit.after[name])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's values
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="differs from when it was written"):
        WeightEdit.load(path)
    data[10] ^= 0xFF  # inside the header
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"edit\.safetensors"):
        WeightEdit.load(path)


def _wider_neo(tokenizer: Any) -> GPTNeoForCausalLM:
    config = GPTNeoConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        hidden_size=48,
        num_layers=4,
        attention_types=[[["global", "local"], 2]],
        num_heads=4,
        window_size=8,
        architectures=["GPTNeoForCausalLM"],
    )
    return GPTNeoForCausalLM(config).eval()


@pytest.mark.backend  # differs on TransformerLens 4
def test_export_refuses_a_base_that_is_not_the_models_origin(
    tokenizer: Any, neo_checkpoint: Path, tmp_path: Path
) -> None:
    model = load_model(neo_checkpoint, process_weights=False, device="cpu")
    if is_bridge(model):  # a bridge exports its own Hugging Face model: base is not used
        out = export_hf(model, tmp_path / "bridge")
        assert (out / "config.json").is_file()
        return
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=4, n_head=4, n_positions=64)
    )
    cases = [
        (_wider_neo(tokenizer), "model of another size"),
        (gpt2, "GPTNeoForCausalLM, base a GPT2LMHeadModel"),
        (random_neo(tokenizer, seed=7), "base is another checkpoint"),
    ]
    for base, message in cases:
        with pytest.raises(ValueError, match=message):
            export_hf(model, tmp_path / "out", base=base)
        assert not (tmp_path / "out").exists()
    assert (export_hf(model, tmp_path / "out", base=neo_checkpoint) / "config.json").is_file()


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o002)  # a group-shared cache
    try:
        with atomic_directory(tmp_path / "shared") as staging:
            save_safetensors({"x": torch.zeros(3)}, staging / "model.safetensors")
            (staging / "notes.txt").write_text("x")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "notes.txt", "checksums.json"):
        mode = stat.S_IMODE((tmp_path / "shared" / name).stat().st_mode)
        assert mode == 0o664, f"{name}: {oct(mode)}"
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o775


def test_a_full_disk_is_an_os_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    edit = WeightEdit(mask=ParamMask({}), before={}, after={})
    with pytest.raises(OSError, match=r"edit\.safetensors.*No space left"):
        edit.save(tmp_path / "edit.safetensors")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    with pytest.raises(OSError, match="No space left"), atomic_directory(tmp_path / "d") as staging:
        save_safetensors({"x": torch.zeros(1)}, staging / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_paragraphs_of_other_models_stay_refused(organism: Organism) -> None:
    """Sanity for the fingerprints above: the same paragraphs fit only their own model."""
    long = Paragraphs.from_tokens(
        torch.zeros(1, organism.model.cfg.n_ctx + 2, dtype=torch.long), prefix_len=10
    )
    with pytest.raises(ValueError, match="exceed the model's context"):
        long.check_model(organism.model)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    dtype=st.sampled_from(["uint16", "uint32", "int32", "int64", "float32", "float64", "bool"]),
    shape=st.one_of(
        st.tuples(st.integers(0, 450)),
        st.tuples(st.integers(0, 5), st.sampled_from([50, 100, 101])),
        st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 40)),
    ),
    seed=st.integers(0, 2**16),
)
def test_token_arrays_read_exactly_or_are_refused(
    tmp_path_factory: pytest.TempPathFactory, dtype: str, shape: tuple[int, ...], seed: int
) -> None:
    """Any dtype, ndim and length: the rows come back exactly as stored, or one clear error."""
    values = np.random.default_rng(seed).integers(-3, 5000, size=shape)
    array = values.astype(dtype)
    path = tmp_path_factory.mktemp("tokens") / "t.npy"
    np.save(path, array)
    try:
        rows = [doc.tokens for doc in documents_from_token_file(path, seq_len=100)]
    except (ValueError, TypeError) as error:
        assert "t.npy" in str(error)  # noqa: PT017 - any of several errors may come
        return
    assert array.dtype.kind in "iu"
    assert int(array.min()) >= 0
    flat = array.reshape(-1)
    assert len(flat) == 100 * len(rows)  # nothing dropped
    assert np.array_equal(np.concatenate(rows), flat.astype(np.int64))
