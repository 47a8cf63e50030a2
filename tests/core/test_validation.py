"""Bad input is a clear ValueError/TypeError before any work: never NaN, a traceback or a
half-edited model. The property tests throw arbitrary input at the input layer."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from memloc_tl.analysis import (
    PerturbConfig,
    ablate_heads,
    activation_gradients,
    attribution_patching,
    contrastive_gradient_norms,
    gradient_norms,
    patch_heads,
    patching_sweep,
    perturb_prefixes,
)
from memloc_tl.analysis.gradients import attributed_parameters
from memloc_tl.core.files import tensors_sha256
from memloc_tl.core.heads import HeadRef
from memloc_tl.core.paragraphs import Paragraphs, corpus_token_counts
from memloc_tl.core.validation import check_positions
from memloc_tl.editing import EditConfig, ParamMask, WeightEdit, sparse_edit
from memloc_tl.memorization import scan_memorization
from memloc_tl.organism import Organism

EXAMPLES = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def test_empty_sets_are_refused_by_name(organism: Organism, unchanged: Any) -> None:
    model = organism.model
    empty = organism.control[[]]
    some = organism.control[[0, 1]]
    calls = {
        "patching_sweep": lambda: patching_sweep(model, empty, empty, progress=False),
        "attribution_patching": lambda: attribution_patching(model, empty, empty, progress=False),
        "patch_heads": lambda: patch_heads(model, empty, empty, ["L0H0"], progress=False),
        "ablate_heads": lambda: ablate_heads(model, empty, ["L0H0"], progress=False),
        "mean ablation": lambda: ablate_heads(
            model, some, ["L0H0"], kind="mean", mean_over=empty, progress=False
        ),
        "sparse_edit": lambda: sparse_edit(model, empty, keep=some, progress=False),
        "contrastive_gradient_norms": lambda: contrastive_gradient_norms(
            model, empty, some, progress=False
        ),
        "gradient_norms": lambda: gradient_norms(model, empty, progress=False),
        "perturb_prefixes": lambda: perturb_prefixes(model, empty, progress=False),
    }
    with unchanged(model):
        for name, call in calls.items():
            with pytest.raises(ValueError, match="is empty") as error:
                call()
            assert "pass at least one paragraph" in str(error.value), name
    with pytest.raises(ValueError, match="no paragraphs"):
        corpus_token_counts(empty)
    with pytest.raises(ValueError, match="no tokens were counted"):
        corpus_token_counts([""], model)


def test_misaligned_source_says_how_to_pair(organism: Organism) -> None:
    target, source = organism.planted[[0, 1, 2]], organism.control[[0, 1]]
    with pytest.raises(ValueError, match=r"pair them row by row.*perturbed"):
        patching_sweep(organism.model, target, source, progress=False)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_batch_sizes_must_be_positive_ints(organism: Organism, batch_size: Any) -> None:
    model, some = organism.model, organism.planted[[0]]
    calls = [
        lambda: scan_memorization(model, some, batch_size=batch_size, progress=False),
        lambda: patching_sweep(model, some, some, batch_size=batch_size, progress=False),
        lambda: gradient_norms(model, some, batch_size=batch_size, progress=False),
        lambda: activation_gradients(model, some, batch_size=batch_size, progress=False),
        lambda: perturb_prefixes(
            model, some, config=PerturbConfig(batch_size=batch_size), progress=False
        ),
        lambda: ablate_heads(model, some, ["L0H0"], batch_size=batch_size, progress=False),
    ]
    for call in calls:
        with pytest.raises((ValueError, TypeError), match="batch_size"):
            call()


def test_silent_wrong_answers_are_now_errors(organism: Organism) -> None:
    model, some = organism.model, organism.planted[[0, 1]]
    keep = organism.control[[0, 1]]
    with pytest.raises(ValueError, match="kl_reduction must be one of"):
        EditConfig(kl_reduction="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kl_reduction"):
        contrastive_gradient_norms(model, some, keep, kl_reduction="sum", progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="integers"):
        patch_heads(model, some, keep, ["L0H0"], positions=[1.7], progress=False)  # type: ignore[list-item]
    grads = {n: torch.full_like(p, torch.nan) for n, p in attributed_parameters(model).items()}
    with pytest.raises(ValueError, match="NaN or Inf"):
        ParamMask.from_gradients(grads)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    scores = activation_gradients(model, some, progress=False)
    with pytest.raises(ValueError, match=f"L{n_layers}H0 does not exist"):
        scores.token_scores(f"L{n_layers}H0")
    with pytest.raises(ValueError, match="does not exist"):
        scores.head_scores()[f"L0H{n_heads}"]


def test_weight_edits_are_whole_or_refused(organism: Organism, tmp_path: Path) -> None:
    model = organism.model
    params = attributed_parameters(model)
    first, second = list(params)[:2]
    masks = {n: torch.zeros(params[n].shape, dtype=torch.bool) for n in (first, second)}
    for mask in masks.values():
        mask.view(-1)[:3] = True
    before = {n: params[n].detach()[masks[n]].clone() for n in masks}
    after = {n: v + 1 for n, v in before.items()}
    # a matrix the model lacks, listed after one it has: nothing may be written
    masks_bad = {first: masks[first], "blocks.99.attn.W_Q": masks[second]}
    bad = WeightEdit(
        mask=ParamMask(masks_bad),
        before={first: before[first], "blocks.99.attn.W_Q": before[second]},
        after={first: after[first], "blocks.99.attn.W_Q": after[second]},
    )
    original = {n: p.detach().clone() for n, p in params.items()}
    with pytest.raises(ValueError, match=r"blocks\.99\.attn\.W_Q"):
        bad.apply(model)
    for name, value in original.items():
        assert torch.equal(params[name], value), name
    with pytest.raises(ValueError, match="one value per masked entry"):
        WeightEdit(mask=ParamMask(masks), before=before, after={n: v[:2] for n, v in after.items()})
    with pytest.raises(TypeError, match="mask must be a ParamMask, got dict"):
        WeightEdit(mask=masks, before=before, after=after)  # type: ignore[arg-type]
    # files: not an edit, and an edit with too few values
    other = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(3)}, str(other))
    with pytest.raises(ValueError, match="not a memloc-tl weight edit"):
        WeightEdit.load(other)
    good = tmp_path / "edit.safetensors"
    WeightEdit(mask=ParamMask(masks), before=before, after=after).save(good)
    assert WeightEdit.load(good).count == 6
    short = tmp_path / "short.safetensors"
    tensors = {f"{first}.mask": masks[first].to(torch.uint8)}
    tensors |= {f"{first}.before": before[first][:1], f"{first}.after": after[first][:1]}
    metadata = {"format": "memloc-tl weight edit v1", "sha256": tensors_sha256(tensors)}
    save_file(tensors, str(short), metadata=metadata)
    with pytest.raises(ValueError, match="one value per masked entry"):
        WeightEdit.load(short)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        WeightEdit.load(tmp_path / "garbage.safetensors")


def test_texts_are_checked_before_tokenizing(organism: Organism, tmp_path: Path) -> None:
    model = organism.model
    with pytest.raises(ValueError, match="no texts given"):
        Paragraphs.from_texts([], model)
    with pytest.raises(TypeError, match=r"NoneType, not str.*empty cell"):
        Paragraphs.from_texts(["fine text", None], model)  # type: ignore[list-item]
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"\n')
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    for name, pattern in [
        ("empty.jsonl", "empty file"),
        ("broken.jsonl", "cannot read"),
        ("latin1.jsonl", "cannot read"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            Paragraphs.from_files(tmp_path / name, model)


# ---------------------------------------------------------------- property-based
@EXAMPLES
@given(st.text(alphabet=string.printable + "äé\u200b", max_size=12))
def test_head_labels_parse_or_raise_value_error(label: str) -> None:
    try:
        ref = HeadRef.parse(label)
    except ValueError:
        return
    assert HeadRef.parse(str(ref)) == ref


@EXAMPLES
@given(
    st.lists(st.one_of(st.integers(-5, 120), st.floats(allow_nan=True), st.booleans()), max_size=6)
)
def test_positions_are_ints_in_range_or_refused(values: list[Any]) -> None:
    try:
        positions = check_positions(values, 100)
    except (ValueError, TypeError):
        return
    assert positions.dtype == torch.long
    assert positions.tolist() == values
    assert all(type(v) is int and 0 <= v < 100 for v in values)


@EXAMPLES
@given(
    rows=st.integers(0, 3),
    width=st.integers(0, 103),
    prefix_len=st.integers(-2, 104),
    high=st.integers(1, 5000),
)
def test_paragraphs_from_tokens_valid_or_refused(
    rows: int, width: int, prefix_len: int, high: int
) -> None:
    tokens = torch.randint(0, high, (rows, width))
    try:
        paragraphs = Paragraphs.from_tokens(tokens, prefix_len=prefix_len, vocab_size=4096)
    except (ValueError, TypeError):
        return
    assert 0 < paragraphs.prefix_len < paragraphs.seq_len
    assert len(paragraphs) == rows  # an empty set is a valid (filtered) set
    if rows:
        assert int(tokens.max()) < 4096


@EXAMPLES
@given(st.lists(st.one_of(st.text(max_size=400), st.none(), st.integers()), max_size=4))
def test_paragraphs_from_texts_valid_or_refused(organism: Organism, texts: list[Any]) -> None:
    try:
        paragraphs = Paragraphs.from_texts(texts, organism.model, on_short="skip")
    except TypeError:
        assert any(not isinstance(t, str) for t in texts)
        return
    except ValueError:
        return
    assert all(isinstance(t, str) for t in texts)
    assert paragraphs.seq_len == 100
    assert len(paragraphs) + paragraphs.n_too_short == len(texts)


@EXAMPLES
@given(fraction=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 3)))
def test_mask_fractions_valid_or_refused(organism: Organism, fraction: Any) -> None:
    try:
        mask = ParamMask.random(organism.model, fraction=fraction, seed=0)
    except (ValueError, TypeError):
        return
    total = sum(p.numel() for p in attributed_parameters(organism.model).values())
    assert 0 < fraction <= 1
    assert mask.count == int(fraction * total)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    content=st.binary(max_size=300),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]),
)
def test_files_read_or_refused_never_another_error(
    organism: Organism, tmp_path_factory: pytest.TempPathFactory, content: bytes, suffix: str
) -> None:
    path = tmp_path_factory.mktemp("input") / f"data{suffix}"
    path.write_bytes(content)
    try:
        paragraphs = Paragraphs.from_files(path, organism.model, on_short="skip")
    except (ValueError, TypeError):
        return
    assert paragraphs.seq_len == 100
