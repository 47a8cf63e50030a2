"""Paragraphs: windows from texts, tensors, datasets and files; the paper's filters; counts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from memloc_tl.core.paragraphs import Paragraphs, corpus_token_counts, tokenizer_fingerprint
from memloc_tl.models import load_model
from memloc_tl.organism import corpus_texts


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus_texts()[:12]


def test_from_texts_windows_without_bos(texts: list[str], tokenizer: Any) -> None:
    paragraphs = Paragraphs.from_texts(texts, tokenizer)
    assert paragraphs.tokens.shape == (len(texts), 100)
    assert paragraphs.prefix.shape == (len(texts), 50)
    assert paragraphs.continuation.shape == (len(texts), 50)
    for row, text in zip(paragraphs.tokens, texts, strict=True):
        assert row.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"][:100]
    assert paragraphs.ids == tuple(str(i) for i in range(len(texts)))
    assert paragraphs.vocab_fingerprint == tokenizer_fingerprint(tokenizer)


def test_from_texts_all_windows(texts: list[str], tokenizer: Any) -> None:
    paragraphs = Paragraphs.from_texts(
        texts[:2], tokenizer, ids=["a", "b"], windows="all", prefix_len=10, continuation_len=20
    )
    first = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    n_first = len(first) // 30
    assert paragraphs.ids[:n_first] == tuple(f"a:{k}" for k in range(n_first))
    assert paragraphs.tokens[1].tolist() == first[30:60]
    assert paragraphs.continuation_len == 20


def test_short_texts_raise_or_are_counted(texts: list[str], tokenizer: Any) -> None:
    with pytest.raises(ValueError, match=r"1 of 3 texts are shorter .*text '1'"):
        Paragraphs.from_texts([texts[0], "too short", texts[1]], tokenizer)
    skipped = Paragraphs.from_texts([texts[0], "too short", texts[1]], tokenizer, on_short="skip")
    assert len(skipped) == 2
    assert skipped.n_too_short == 1
    assert skipped.ids == ("0", "2")


@pytest.mark.parametrize(
    ("tokens", "error", "match"),
    [
        (torch.zeros(2, 100), TypeError, "integer"),
        (torch.zeros(100, dtype=torch.long), ValueError, "shape"),
        (-torch.ones(1, 100, dtype=torch.long), ValueError, ">= 0"),
    ],
)
def test_bad_tokens_raise(tokens: torch.Tensor, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Paragraphs.from_tokens(tokens)


def test_bad_layout_and_ids_raise() -> None:
    tokens = torch.zeros(2, 100, dtype=torch.long)
    with pytest.raises(ValueError, match="prefix_len"):
        Paragraphs.from_tokens(tokens, prefix_len=100)
    with pytest.raises(ValueError, match="unique"):
        Paragraphs.from_tokens(tokens, ids=["a", "a"])
    with pytest.raises(ValueError, match="2 ids"):
        Paragraphs.from_tokens(torch.zeros(3, 100, dtype=torch.long), ids=["a", "b"])
    with pytest.raises(ValueError, match="outside the model's vocabulary of 10"):
        Paragraphs.from_tokens(torch.full((1, 100), 10), vocab_size=10)


def test_tokenizer_mismatch_is_detected(
    texts: list[str], tokenizer: Any, neo_checkpoint: Path
) -> None:
    from memloc_tl.organism import train_tokenizer

    model = load_model(neo_checkpoint, device="cpu")
    fits = {"prefix_len": 30, "continuation_len": 30}  # the checkpoint's context is 64
    Paragraphs.from_texts(texts, model, **fits).check_model(model)  # same tokenizer: fine
    other = train_tokenizer(corpus_texts()[:20], vocab_size=300)
    with pytest.raises(ValueError, match="different tokenizer"):
        Paragraphs.from_texts(texts, other, **fits).check_model(model)
    with pytest.raises(ValueError, match="100 tokens exceed the model's context of 64"):
        Paragraphs.from_texts(texts, model).check_model(model)


def test_keep_unique_is_strict() -> None:
    fifty = torch.arange(100) % 50  # exactly 50 unique of 100: dropped
    fifty_one = torch.cat([torch.arange(51), torch.zeros(49, dtype=torch.long)])
    paragraphs = Paragraphs.from_tokens(torch.stack([fifty, fifty_one]), ids=["50", "51"])
    assert paragraphs.keep_unique().ids == ("51",)
    assert paragraphs.keep_unique(0.4).ids == ("50", "51")


def test_drop_keywords_token_set_and_text(tokenizer: Any) -> None:
    body = " The quick brown fox jumps over the lazy dog again and again." * 12
    plain = body
    with_keyword = "Read the LICENSE file first." + body
    paragraphs = Paragraphs.from_texts([plain, with_keyword], tokenizer, ids=["plain", "kw"])
    assert paragraphs.drop_keywords(tokenizer).ids == ("plain",)
    assert paragraphs.drop_keywords(tokenizer, mode="text").ids == ("plain",)
    assert paragraphs.drop_keywords(tokenizer, ["zebra"]).ids == ("plain", "kw")
    # Bag of tokens: a variant's tokens scattered anywhere in the paragraph count as a match.
    variant_ids = tokenizer(" software", add_special_tokens=False)["input_ids"]
    scattered = paragraphs.tokens[0].clone()
    scattered[torch.arange(len(variant_ids)) * 10 + 3] = torch.tensor(variant_ids)
    bag = Paragraphs.from_tokens(scattered[None])
    assert len(bag.drop_keywords(tokenizer)) == 0
    assert len(bag.drop_keywords(tokenizer, mode="text")) == 1  # not a substring


def test_from_files_and_dataset(tmp_path: Path, texts: list[str], tokenizer: Any) -> None:
    import datasets

    expected = Paragraphs.from_texts(texts[:3], tokenizer)
    csv = tmp_path / "texts.csv"
    import pandas as pd

    pd.DataFrame({"id": ["x", "y", "z"], "text": texts[:3]}).to_csv(csv, index=False)
    from_csv = Paragraphs.from_files(csv, tokenizer, id_column="id")
    assert torch.equal(from_csv.tokens, expected.tokens)
    assert from_csv.ids == ("x", "y", "z")
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[:3]))
    assert torch.equal(
        Paragraphs.from_files([jsonl], tokenizer, text_column="body").tokens, expected.tokens
    )
    dataset = datasets.Dataset.from_dict({"text": texts[:3]})
    assert torch.equal(Paragraphs.from_dataset(dataset, tokenizer).tokens, expected.tokens)
    with pytest.raises(ValueError, match="no column 'body'"):
        Paragraphs.from_dataset(dataset, tokenizer, text_column="body")
    with pytest.raises(ValueError, match="must all be one of"):
        Paragraphs.from_files(tmp_path / "texts.parquet", tokenizer)
    with pytest.raises(FileNotFoundError):
        Paragraphs.from_files(tmp_path / "missing.csv", tokenizer)


def test_select_concat_and_meta(texts: list[str], tokenizer: Any) -> None:
    paragraphs = Paragraphs.from_texts(texts[:4], tokenizer).with_meta(group=["a", "b", "a", "b"])
    picked = paragraphs.select(torch.tensor([True, False, True, False]))
    assert picked.ids == ("0", "2")
    assert picked.meta["group"] == ("a", "a")
    assert torch.equal(paragraphs[1:3].tokens, paragraphs.tokens[1:3])
    joined = Paragraphs.concat(picked, paragraphs[[1]])
    assert joined.ids == ("0", "2", "1")
    with pytest.raises(ValueError, match="unique"):
        Paragraphs.concat(paragraphs, paragraphs)
    frame = paragraphs.to_frame(tokenizer)
    assert list(frame.columns) == ["id", "group", "prefix", "continuation"]
    assert frame.loc[0, "prefix"] + frame.loc[0, "continuation"] == tokenizer.decode(
        paragraphs.tokens[0].tolist()
    )


def test_corpus_token_counts_equal_a_counter(texts: list[str], tokenizer: Any) -> None:
    expected = Counter(
        i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]
    )
    counts = corpus_token_counts(texts, tokenizer, batch_size=5)
    assert counts.shape == (len(tokenizer),)
    assert counts.dtype == torch.int64
    assert {i: int(c) for i, c in enumerate(counts) if c} == dict(expected)
    import datasets

    from_dataset = corpus_token_counts(datasets.Dataset.from_dict({"text": texts}), tokenizer)
    assert torch.equal(from_dataset, counts)
    paragraphs = Paragraphs.from_texts(texts, tokenizer)
    from_paragraphs = corpus_token_counts(paragraphs, d_vocab=len(tokenizer))
    assert int(from_paragraphs.sum()) == paragraphs.tokens.numel()
    with pytest.raises(TypeError, match="not one string"):
        corpus_token_counts("one text", tokenizer)


def test_a_txt_file_is_one_document_everywhere(
    texts: list[str], tokenizer: Any, tmp_path: Path
) -> None:
    """`memloc scan --data f.txt --out` and `--out-dir` read a .txt file the same way."""
    from memloc_tl.corpus import documents_from_files

    document = "\n\n".join(texts[:3])  # blank lines and line breaks inside one document
    path = tmp_path / "doc.txt"
    path.write_text(document, encoding="utf-8")
    paragraphs = Paragraphs.from_files(path, tokenizer, windows="all")
    expected = Paragraphs.from_texts([document], tokenizer, windows="all")
    assert torch.equal(paragraphs.tokens, expected.tokens)
    assert {pid.split(":")[0] for pid in paragraphs.ids} == {"doc.txt"}
    (corpus_document,) = list(documents_from_files([path], tokenizer))
    assert corpus_document.id == "doc.txt"
    assert torch.equal(torch.from_numpy(corpus_document.tokens)[:100], expected.tokens[0])
    path.write_bytes("caf\xe9".encode("latin-1") * 40)
    with pytest.raises(ValueError, match=r"doc\.txt: it is not UTF-8"):
        Paragraphs.from_files(path, tokenizer)
