"""Scans in bf16/fp16: the windows near a flip, re-scored in float32, give float32's EM."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from memloc_tl import Paragraphs, scan_memorization
from memloc_tl.core.forward import continuation_logits, exact_match_length
from memloc_tl.core.precision import Precision, decision_margins, near_flip
from memloc_tl.organism import Organism


@pytest.fixture(scope="module")
def paragraphs(organism: Organism) -> Paragraphs:
    return Paragraphs.concat(organism.planted, organism.control, organism.heldout)


def test_decision_margins_are_the_reference_logit_minus_the_best_other() -> None:
    logits = torch.tensor([[[2.0, 5.0, 1.0], [4.0, 3.9, 0.0], [0.0, 0.0, 0.0]]])
    target = torch.tensor([[1, 1, 2]])
    margins = decision_margins(logits, target)
    assert margins[0].tolist() == pytest.approx([3.0, -0.1, 0.0])
    # EM 1: positions 0 (matched) and 1 (the first mismatch) decide it; position 2 does not
    em = torch.tensor([1])
    assert near_flip(margins, em, 0.05).tolist() == [False]
    assert near_flip(margins, em, 0.2).tolist() == [True]  # position 1, |-0.1| < 0.2
    assert near_flip(margins, torch.tensor([0]), 0.2).tolist() == [False]  # only position 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_verified_reduced_precision_scans_have_the_float32_em(
    organism: Organism, paragraphs: Paragraphs, dtype: torch.dtype, unchanged: Any
) -> None:
    model = organism.model
    exact = scan_memorization(model, paragraphs, progress=False)
    with unchanged(model):
        loose = scan_memorization(
            model, paragraphs, precision=Precision(dtype, verify="none"), progress=False
        )
        checked = scan_memorization(model, paragraphs, precision=Precision(dtype), progress=False)
    assert not torch.is_autocast_enabled("cpu")
    assert torch.equal(checked.exact_match, exact.exact_match)
    assert checked.verified
    assert not loose.verified
    assert loose.dtype == checked.dtype == str(dtype).removeprefix("torch.")
    # the flags, by hand: autocast logits, margins at the positions that decide EM
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        logits = continuation_logits(model, paragraphs.tokens, paragraphs.prefix_len)
    target = paragraphs.continuation
    margins = decision_margins(logits, target)
    em = exact_match_length(logits.argmax(-1) == target)
    threshold = Precision(dtype).threshold
    positions = torch.arange(target.shape[1])
    by_hand = ((margins.abs() < threshold) & (positions <= em[:, None])).any(-1)
    assert loose.near_flip is not None
    assert checked.near_flip is not None
    assert torch.equal(loose.near_flip, by_hand)
    assert torch.equal(checked.near_flip, by_hand)
    assert torch.equal(loose.exact_match, em)
    assert not torch.equal(logits, continuation_logits(model, paragraphs.tokens, 50))  # reduced
    # re-scored windows carry float32's numbers exactly; the others keep the reduced ones
    flagged = by_hand.nonzero().flatten()
    assert len(flagged) > 0
    assert torch.equal(checked.token_nll[flagged], exact.token_nll[flagged])
    kept = (~by_hand).nonzero().flatten()
    assert torch.equal(checked.token_nll[kept], loose.token_nll[kept])
    assert "near_flip" in checked.to_frame().columns
    assert f"{int(by_hand.sum())} near a flip" in repr(checked)
    subset = checked.subset(flagged[:2])
    assert subset.near_flip is not None
    assert bool(subset.near_flip.all())


def test_margins_at_the_extremes(organism: Organism, paragraphs: Paragraphs) -> None:
    model = organism.model
    exact = scan_memorization(model, paragraphs, progress=False)
    everything = scan_memorization(
        model, paragraphs, precision=Precision("bfloat16", margin=1e9), progress=False
    )
    assert everything.near_flip is not None
    assert bool(everything.near_flip.all())
    assert torch.equal(everything.token_nll, exact.token_nll)  # all re-scored in float32
    nothing = scan_memorization(
        model, paragraphs, precision=Precision("bfloat16", margin=0.0), progress=False
    )
    assert nothing.near_flip is not None
    assert not bool(nothing.near_flip.any())
    as_is = scan_memorization(model, paragraphs, precision=Precision("float32"), progress=False)
    assert as_is.near_flip is None
    assert torch.equal(as_is.token_nll, exact.token_nll)


def test_bad_precisions_are_refused(organism: Organism, paragraphs: Paragraphs) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        Precision("int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype must be one of"):
        Precision(torch.int8)
    with pytest.raises(ValueError, match="verify must be one of"):
        Precision(verify="maybe")  # type: ignore[arg-type]
    for margin in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="margin"):
            Precision(margin=margin)
    with pytest.raises(TypeError, match="precision must be a Precision"):
        scan_memorization(organism.model, paragraphs, precision="bfloat16")  # type: ignore[arg-type]


def test_corpus_scans_and_the_command_in_bf16_keep_float32s_em(
    organism: Organism, paragraphs: Paragraphs, tmp_path: Any
) -> None:
    import json

    import pandas as pd

    from memloc_tl.cli import main
    from memloc_tl.corpus import CorpusConfig, documents_from_texts, read_corpus_scan, scan_corpus

    texts = [organism.tokenizer.decode(row) for row in paragraphs.tokens[:40]]
    documents = list(documents_from_texts(texts, organism.model))
    tables = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        config = CorpusConfig(docs_per_shard=16, dtype=dtype)
        scan_corpus(organism.model, documents, out, config=config, progress=False)
        tables[dtype] = read_corpus_scan(out)
    exact, reduced = tables["float32"], tables["bfloat16"]
    assert "near_flip" not in exact.columns
    assert reduced["near_flip"].dtype == bool
    assert reduced["exact_match"].tolist() == exact["exact_match"].tolist()
    flagged = reduced["near_flip"]
    pd.testing.assert_series_equal(reduced.loc[flagged, "nll"], exact.loc[flagged, "nll"])
    with pytest.raises(ValueError, match="dtype must be one of"):
        CorpusConfig(dtype="int8")
    # the command: a file scan in bf16 writes float32's EM and the near_flip column
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    table = tmp_path / "scan.csv"
    cache = str(organism.path.parent)
    argv = ["scan", "--model", "organism", "--tiny", "--cache-dir", cache, "--data", str(data)]
    assert main([*argv, "--out", str(table), "--dtype", "bfloat16"]) == 0
    written = pd.read_csv(table)
    assert written["exact_match"].tolist() == exact["exact_match"].tolist()
    assert written["near_flip"].tolist() == flagged.tolist()
