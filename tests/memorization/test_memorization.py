"""scan_memorization: the teacher-forced EM equals real greedy decoding; the NLL is exact."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from memloc_tl.core import forward
from memloc_tl.core.forward import exact_match_length, greedy_continuations
from memloc_tl.core.paragraphs import Paragraphs
from memloc_tl.memorization import scan_memorization, summarize
from memloc_tl.organism import Organism


def greedy_em(model: Any, paragraphs: Paragraphs) -> torch.Tensor:
    """The paper's EM: generate 50 tokens with the KV cache, count matches until the first miss."""
    generated = greedy_continuations(model, paragraphs.prefix, paragraphs.continuation_len)
    matches = generated == paragraphs.continuation
    leading = []
    for row in matches.tolist():
        count = 0
        for hit in row:
            if not hit:
                break
            count += 1
        leading.append(count)
    return torch.tensor(leading)


def perturbed(paragraphs: Paragraphs, d_vocab: int, seed: int = 0) -> Paragraphs:
    """One random prefix token replaced per paragraph (never by itself)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = paragraphs.tokens.clone()
    n = len(tokens)
    positions = torch.randint(1, paragraphs.prefix_len, (n,), generator=generator)
    offsets = torch.randint(1, d_vocab, (n,), generator=generator)
    rows = torch.arange(n)
    tokens[rows, positions] = (tokens[rows, positions] + offsets) % d_vocab
    return Paragraphs.from_tokens(
        tokens,
        ids=[f"{i}-perturbed" for i in paragraphs.ids],
        vocab_fingerprint=paragraphs.vocab_fingerprint,
    )


def test_fast_em_equals_greedy_decoding(organism: Organism) -> None:
    model = organism.model
    sets = {
        "planted": organism.planted,
        "control": organism.control,
        "perturbed": perturbed(organism.planted, model.cfg.d_vocab),
    }
    all_em = []
    for name, paragraphs in sets.items():
        scan = scan_memorization(model, paragraphs, progress=False)
        expected = greedy_em(model, paragraphs)
        assert torch.equal(scan.exact_match, expected), name
        all_em.append(expected)
    em = torch.cat(all_em)
    # The comparison covers full, partial and no memorization, not only one regime.
    assert (em == 50).any()
    assert (em == 0).any()
    assert ((em > 0) & (em < 50)).any()


def test_nll_equals_full_forward(organism: Organism) -> None:
    model, paragraphs = organism.model, organism.planted
    scan = scan_memorization(model, paragraphs, batch_size=5, progress=False)
    with torch.no_grad():
        logprobs = model(paragraphs.tokens).log_softmax(-1)
    # position t predicts token t + 1; the continuation is tokens 50..99
    token_nll = -logprobs[:, 49:99].gather(-1, paragraphs.tokens[:, 50:, None]).squeeze(-1)
    torch.testing.assert_close(scan.token_nll, token_nll, atol=1e-4, rtol=0)
    torch.testing.assert_close(scan.nll, token_nll.mean(-1), atol=1e-4, rtol=0)
    argmax_match = logprobs[:, 49:99].argmax(-1) == paragraphs.tokens[:, 50:]
    assert torch.equal(scan.greedy_match, argmax_match)


def test_batch_size_does_not_matter(organism: Organism) -> None:
    one = scan_memorization(organism.model, organism.control, batch_size=1, progress=False)
    many = scan_memorization(organism.model, organism.control, batch_size=64, progress=False)
    assert torch.equal(one.exact_match, many.exact_match)
    torch.testing.assert_close(one.nll, many.nll, atol=1e-5, rtol=0)


def test_a_cpu_forward_takes_at_most_its_token_budget(
    organism: Organism, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, paragraphs = organism.model, organism.control
    monkeypatch.setattr(forward, "CPU_FORWARD_TOKENS", 3 * paragraphs.seq_len + 7)
    rows: list[int] = []

    def count(activation: torch.Tensor, hook: Any) -> None:
        rows.append(activation.shape[0])

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", count)]):
        capped = scan_memorization(model, paragraphs, batch_size=64, progress=False)
    assert len(paragraphs) > 3
    assert max(rows) == 3
    assert sum(rows) == len(paragraphs)
    one = scan_memorization(model, paragraphs, batch_size=1, progress=False)
    assert torch.equal(capped.exact_match, one.exact_match)
    torch.testing.assert_close(capped.token_nll, one.token_nll, atol=1e-5, rtol=0)
    gpu = SimpleNamespace(cfg=SimpleNamespace(device="cuda"))  # a GPU takes the batch whole
    for device, cpu in [
        (None, True),
        ("cpu", True),
        (torch.device("cpu"), True),
        ("cuda:1", False),
    ]:
        assert forward.on_cpu(SimpleNamespace(cfg=SimpleNamespace(device=device))) is cpu  # type: ignore[arg-type]
    assert forward.forward_rows(gpu, 512, 100) == 512  # type: ignore[arg-type]
    assert forward.forward_rows(model, 512, 10_000) == 1
    # and rows whose largest activation fits 32 MiB: GPT-Neo 125M's MLP, [rows, 100, 3072]
    monkeypatch.undo()  # the real token budget, 3,200
    cfg = SimpleNamespace(device="cpu", d_mlp=3072, d_model=768, n_heads=12, dtype=None)
    neo: Any = SimpleNamespace(cfg=cfg)
    assert forward.forward_rows(neo, 512, 100) == (32 << 20) // (100 * 3072 * 4) == 27
    # 300 tokens: the attention's [rows, 12, 300, 300] (3600 per token) outgrows the MLP's
    assert forward.forward_rows(neo, 512, 300) == (32 << 20) // (300 * 3600 * 4) == 7
    cfg.dtype = torch.float16  # half the bytes per row: the token budget binds again
    assert forward.forward_rows(neo, 512, 100) == 32


def test_scoring_in_place_equals_scoring_a_copy(organism: Organism) -> None:
    model, paragraphs = organism.model, organism.planted
    with torch.no_grad():
        logits = forward.continuation_logits(model, paragraphs.tokens, paragraphs.prefix_len)
    target = paragraphs.continuation
    kept = forward.scores_from_logits(logits, target)
    scratch = logits.clone()
    overwritten = forward.scores_from_logits(scratch, target, overwrite=True)
    assert torch.equal(kept[0], overwritten[0])
    torch.testing.assert_close(kept[1], overwritten[1], atol=1e-6, rtol=0)
    assert not torch.equal(scratch, logits)  # the copy was used as scratch space
    # a hook that reads the logits leaving the unembedding keeps them: no overwrite then
    seen: list[torch.Tensor] = []
    with model.hooks(fwd_hooks=[("unembed.hook_out", lambda a, hook: seen.append(a))]):
        match, _ = forward.score_continuations(model, paragraphs.tokens, paragraphs.prefix_len)
    torch.testing.assert_close(seen[0], logits)  # the continuation positions' logits
    assert torch.equal(match, kept[0])


def test_exact_match_length_counts_until_first_mismatch() -> None:
    matches = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert exact_match_length(matches).tolist() == [2, 0, 4]


def test_scan_splits_and_frames(organism: Organism) -> None:
    paragraphs = Paragraphs.concat(organism.planted, organism.control)
    scan = scan_memorization(organism.model, paragraphs, progress=False)
    em = scan.exact_match
    assert len(scan.memorized()) == int((em == 50).sum())
    assert len(scan.non_memorized()) == int((em <= 10).sum())
    assert len(scan.partly_memorized()) == int(((em >= 11) & (em <= 49)).sum())
    buckets = scan.buckets()
    assert list(buckets) == ["0-10", "11-29", "30-49", "50"]
    assert sum(len(b) for b in buckets.values()) == len(paragraphs)
    assert set(scan.memorized().ids) <= set(organism.planted.ids)
    frame = scan.to_frame()
    assert frame["exact_match"].tolist() == em.tolist()
    assert frame["memorized"].sum() == len(scan.memorized())
    assert "memorized=" in repr(scan)
    sub = scan.subset(em == 50)
    assert torch.equal(sub.exact_match, em[em == 50])
    table = summarize({"all": scan})
    assert table.loc[0, "memorized"] == len(scan.memorized())


def test_scan_leaves_model_unchanged(organism: Organism, unchanged: Any) -> None:
    with unchanged(organism.model):
        scan_memorization(organism.model, organism.heldout, progress=False)
    bad = organism.heldout.tokens.clone()
    bad[0, 3] = organism.model.cfg.d_vocab
    with unchanged(organism.model), pytest.raises(ValueError, match="vocabulary"):
        scan_memorization(organism.model, Paragraphs.from_tokens(bad), progress=False)


def test_scan_rejects_bad_input(organism: Organism, tokenizer: Any) -> None:
    with pytest.raises(TypeError, match=r"Paragraphs\.from_tokens"):
        scan_memorization(organism.model, organism.planted.tokens, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        scan_memorization(organism.model, organism.planted, batch_size=0)
    foreign = Paragraphs.from_tokens(
        organism.planted.tokens % len(tokenizer), vocab_fingerprint="not-the-model-tokenizer"
    )
    with pytest.raises(ValueError, match="different tokenizer"):
        scan_memorization(organism.model, foreign, progress=False)
    too_long = Paragraphs.from_tokens(
        torch.zeros(1, organism.model.cfg.n_ctx + 1, dtype=torch.long)
    )
    with pytest.raises(ValueError, match="context"):
        scan_memorization(organism.model, too_long, progress=False)
