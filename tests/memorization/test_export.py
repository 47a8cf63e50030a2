"""export_hf: an edited model back to transformers, with the edited model's logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from memloc_tl import EditConfig, Paragraphs, export_hf, load_model, sparse_edit
from memloc_tl.core.backend import check_backend, tl_major
from tests.memorization.test_models import tiny_checkpoint

pytestmark = pytest.mark.backend  # run 2 (TransformerLens 4) runs it: tests/docs/test_ci.py

BACKENDS = ["bridge"] if tl_major() >= 4 else ["hooked", "bridge"]


def checkpoint(kind: str, tokenizer: Any, neo_checkpoint: Path, tmp_path: Path) -> Path:
    if kind == "gpt-neo":
        return neo_checkpoint
    directory = tmp_path / kind
    tiny_checkpoint(kind, tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["gpt-neo", "pythia"])
def test_an_edited_model_exports_with_its_own_logits(
    kind: str, backend: str, tokenizer: Any, neo_checkpoint: Path, tmp_path: Path
) -> None:
    source = checkpoint(kind, tokenizer, neo_checkpoint, tmp_path)
    model = load_model(source, process_weights=False, device="cpu", backend=check_backend(backend))
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, len(tokenizer), (6, 40), generator=generator)
    target = Paragraphs.from_tokens(tokens[:2], prefix_len=20, vocab_size=model.cfg.d_vocab)
    keep = Paragraphs.from_tokens(tokens[2:], prefix_len=20, vocab_size=model.cfg.d_vocab)
    config = EditConfig(steps=3, lr=0.05, fraction=0.01)
    result = sparse_edit(model, target, keep=keep, config=config, progress=False)
    with pytest.raises(TypeError, match=r"result\.applied\(model\)"):
        export_hf(result, tmp_path / "exported", base=source)
    with result.applied(model), torch.no_grad():
        out = export_hf(model, tmp_path / "exported", base=source)
        ours = model(tokens)
    exported = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    original = AutoModelForCausalLM.from_pretrained(source, local_files_only=True).eval()
    with torch.no_grad():
        theirs = exported(tokens).logits
        before = original(tokens).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert (theirs - before).abs().max() > 1e-3  # the edit reached the checkpoint
    # only the entries the mask chose changed
    changed = sum(
        int((a != b).sum())
        for a, b in zip(exported.parameters(), original.parameters(), strict=True)
    )
    assert 0 < changed <= result.mask.count
    assert (out / "tokenizer.json").is_file() or (out / "vocab.json").is_file()


def test_export_refuses_what_cannot_map_back(
    tokenizer: Any, neo_checkpoint: Path, tmp_path: Path
) -> None:
    processed = load_model(neo_checkpoint, device="cpu")
    with pytest.raises(ValueError, match="process_weights=False"):
        export_hf(processed, tmp_path / "out", base=neo_checkpoint)
    assert not (tmp_path / "out").exists()
    if tl_major() < 4:
        raw = load_model(neo_checkpoint, process_weights=False, device="cpu")
        with pytest.raises(TypeError, match="base="):
            export_hf(raw, tmp_path / "out")
    with pytest.raises(TypeError, match="expected a TransformerLens model"):
        export_hf(torch.nn.Linear(2, 2), tmp_path / "out")
