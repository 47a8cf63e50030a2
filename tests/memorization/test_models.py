"""load_model: local checkpoints, in-memory models and the hub path, against transformers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from memloc_tl.core.backend import is_bridge, tl_major
from memloc_tl.models import (
    DEFAULT_MODEL,
    HubUnavailableError,
    load_model,
)
from tests.conftest import random_neo

pytestmark = pytest.mark.backend  # run 2 (TransformerLens 4) runs it: tests/docs/test_ci.py

SEQ = 40  # longer than the window of 8, so local attention matters


def tokens_for(model_vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, model_vocab, (3, SEQ), generator=torch.Generator().manual_seed(seed))


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    with torch.no_grad():
        return hf(tokens).logits


def test_local_checkpoint_matches_transformers_unprocessed(neo_checkpoint: Path) -> None:
    model = load_model(neo_checkpoint, process_weights=False, device="cpu")
    tokens = tokens_for(model.cfg.d_vocab)
    with torch.no_grad():
        ours = model(tokens)
    torch.testing.assert_close(ours, hf_logits(neo_checkpoint, tokens), atol=1e-4, rtol=0)


def test_local_checkpoint_matches_transformers_processed(neo_checkpoint: Path) -> None:
    from memloc_tl.core.objectives import attributed_parameters

    model = load_model(neo_checkpoint, device="cpu")
    raw = load_model(neo_checkpoint, process_weights=False, device="cpu")
    folded, unfolded = (attributed_parameters(m)["blocks.0.attn.W_Q"] for m in (model, raw))
    assert (folded - unfolded).abs().max() > 1e-3  # fold_ln happened
    tokens = tokens_for(model.cfg.d_vocab)
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
    theirs = hf_logits(neo_checkpoint, tokens).log_softmax(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_local_window_matters(tokenizer: Any, neo_checkpoint: Path) -> None:
    """Forcing global attention with the same weights changes the output; we match local."""
    local = random_neo(tokenizer, attention="alternating")
    forced_global = random_neo(tokenizer, attention="global")
    forced_global.load_state_dict(local.state_dict(), strict=False)
    tokens = tokens_for(len(tokenizer))
    with torch.no_grad():
        local_logits = local(tokens).logits
        global_logits = forced_global(tokens).logits
        ours = load_model(neo_checkpoint, process_weights=False, device="cpu")(tokens)
    assert (local_logits - global_logits).abs().max() > 1e-2
    # Within the window both agree; beyond it they differ.
    torch.testing.assert_close(local_logits[:, :8], global_logits[:, :8], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, local_logits, atol=1e-4, rtol=0)


def tiny_checkpoint(kind: str, tokenizer: Any) -> torch.nn.Module:
    """A random checkpoint of another architecture family, small enough for the tests."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = len(tokenizer)
    if kind == "gpt2":
        # n_ctx as in the hub's GPT-2 config.json (TransformerLens 3 reads it)
        config: Any = GPT2Config(
            n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=64, n_ctx=64
        )
        model: torch.nn.Module = GPT2LMHeadModel(config)
    elif kind == "pythia":  # GPT-NeoX: rotary on part of each head, parallel attention and MLP
        config = GPTNeoXConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=vocab,
            max_position_embeddings=64,
            rotary_pct=0.25,
            use_parallel_residual=True,
        )
        model = GPTNeoXForCausalLM(config)
    else:  # Llama-family: RMSNorm, gated MLP, rotary, grouped-query attention (4 heads, 2 kv)
        config = LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=vocab,
            max_position_embeddings=64,
        )
        model = LlamaForCausalLM(config)
    with torch.no_grad():  # random norm gains, so that weight processing has something to fold
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


@pytest.mark.parametrize("kind", ["gpt2", "pythia", "llama"])
def test_local_checkpoints_of_other_architectures_match_transformers(
    kind: str, tmp_path: Path, tokenizer: Any
) -> None:
    # The directory's name says "llama": TransformerLens 3 guesses configs from such names.
    directory = tmp_path / f"{kind}-llama-like-name"
    tiny_checkpoint(kind, tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tokens = tokens_for(len(tokenizer))
    theirs = hf_logits(directory, tokens).log_softmax(-1)
    for process in (False, True):
        model = load_model(directory, process_weights=process, device="cpu")
        assert model.cfg.n_layers == 2
        assert model.cfg.n_heads == 4
        with torch.no_grad():
            ours = model(tokens).log_softmax(-1)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_in_memory_model_matches_directory_and_is_not_modified(
    tokenizer: Any, neo_checkpoint: Path
) -> None:
    hf = AutoModelForCausalLM.from_pretrained(neo_checkpoint, local_files_only=True).eval()
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    from_memory = load_model(hf, tokenizer=tokenizer, device="cpu")
    from_directory = load_model(neo_checkpoint, device="cpu")
    for key, value in hf.state_dict().items():
        assert torch.equal(value, before[key]), f"load_model changed the caller's {key}"
    tokens = tokens_for(from_memory.cfg.d_vocab)
    with torch.no_grad():
        torch.testing.assert_close(from_memory(tokens), from_directory(tokens))


def test_no_bos_is_prepended(neo_checkpoint: Path, tokenizer: Any) -> None:
    model = load_model(neo_checkpoint, device="cpu")
    assert model.cfg.default_prepend_bos is False
    text = "The with statement is used to wrap the execution of a block"
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert model.to_tokens(text)[0].tolist() == expected


def test_bad_sources_raise_clear_errors(
    tmp_path: Path, tokenizer: Any, neo_checkpoint: Path
) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_model(tmp_path / "missing")
    with pytest.raises(TypeError, match="hub name"):
        load_model(42)  # type: ignore[arg-type]
    hf = AutoModelForCausalLM.from_pretrained(neo_checkpoint, local_files_only=True)
    with pytest.raises(TypeError, match="tokenizer"):
        load_model(hf)
    from transformers import GPT2Config as Config
    from transformers import GPT2Model

    encoder_dir = tmp_path / "no-lm-head"  # a base model without a language-model head
    GPT2Model(Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(encoder_dir)
    with pytest.raises(ValueError, match="not a causal language model"):
        load_model(encoder_dir)
    with pytest.raises(ValueError, match="backend must be"):
        load_model(neo_checkpoint, backend="jax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hub names only"):
        load_model(neo_checkpoint, revision="step1000")
    small = random_neo(tokenizer)
    small.config.vocab_size = 10  # claims fewer ids than the tokenizer has
    with pytest.raises(ValueError, match="do not belong together"):
        load_model(small, tokenizer=tokenizer)


def test_hub_offline_and_uncached_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE") as error:
        load_model(DEFAULT_MODEL)
    assert "load_model('/path/to/checkpoint')" in str(error.value)
    assert time.perf_counter() - started < 5


def test_hub_unreachable_and_uncached_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    import memloc_tl.models as models

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(HubUnavailableError, match="cannot be reached"):
        load_model("gpt-neo-125M")


def test_hub_name_loads_from_the_cache(tmp_path: Path, neo_checkpoint: Path) -> None:
    """The hub path, offline: a checkpoint we built, laid out as the hub cache holds it."""
    snapshot = tmp_path / "models--EleutherAI--gpt-neo-125M" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in neo_checkpoint.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    refs = tmp_path / "models--EleutherAI--gpt-neo-125M" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    tokens = tokens_for(512)
    script = textwrap.dedent(
        f"""
        import json, torch
        from memloc_tl.models import load_model
        model = load_model("EleutherAI/gpt-neo-125M", device="cpu")
        tokens = torch.tensor({tokens.tolist()})
        with torch.no_grad():
            print(json.dumps({{"prepend_bos": model.cfg.default_prepend_bos,
                              "logits": model(tokens).log_softmax(-1)[:, -5:].tolist()}}))
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["prepend_bos"] is False
    expected = hf_logits(neo_checkpoint, tokens).log_softmax(-1)[:, -5:]
    torch.testing.assert_close(torch.tensor(output["logits"]), expected, atol=1e-4, rtol=0)


def _gpt_neo_125m_available() -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(DEFAULT_MODEL, "config.json"), str)


@pytest.mark.needs_hub
@pytest.mark.skipif(
    not _gpt_neo_125m_available(),
    reason="GPT-Neo 125M is not in the Hugging Face cache (no hub access here); run "
    '`python -c "from memloc_tl import load_model; load_model()"` where the hub is reachable',
)
def test_gpt_neo_125m_matches_transformers() -> None:
    model = load_model(DEFAULT_MODEL, device="cpu")
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model) == (12, 12, 768)
    hf = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL).eval()
    tokens = model.to_tokens("The quick brown fox jumps over the lazy dog. " * 5)
    assert tokens[0, 0] != 50256  # no BOS
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens).log_softmax(-1), hf(tokens).logits.log_softmax(-1), atol=1e-3, rtol=0
        )


def test_checkpoints_that_do_not_hold_together_are_refused(
    tmp_path: Path, tokenizer: Any, neo_checkpoint: Path
) -> None:
    import shutil

    # config.json claims more (or fewer) layers than the weights hold
    for name, change in (("deeper", 2), ("shallower", -2)):
        directory = tmp_path / name
        shutil.copytree(neo_checkpoint, directory)
        config = json.loads((directory / "config.json").read_text())
        config["num_layers"] += change
        config["attention_types"] = [[["global", "local"], config["num_layers"] // 2]]
        config["attention_layers"] = ["global", "local"] * (config["num_layers"] // 2)
        (directory / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=r"do not fit its config\.json"):
            load_model(directory)
    # no tokenizer files: a clear error, not a 1-token tokenizer
    bare = tmp_path / "bare"
    random_neo(tokenizer).save_pretrained(bare)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files.*save_pretrained"):
        load_model(bare)
    assert load_model(bare, tokenizer=tokenizer).cfg.n_layers == 4  # the documented fix


def test_saved_hooked_models_are_checked_on_load(tmp_path: Path, neo_checkpoint: Path) -> None:
    from memloc_tl.core.files import CorruptFileError
    from memloc_tl.models import save_hooked_model

    model = load_model(neo_checkpoint)
    if tl_major() >= 4:  # a bridge is refused with the fix, and nothing is written
        with pytest.raises(TypeError, match=r"edit\.save"):
            save_hooked_model(model, tmp_path / "saved")
        assert list(tmp_path.iterdir()) == []
        return
    directory = save_hooked_model(model, tmp_path / "saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]
    with pytest.raises(FileExistsError, match="not empty"):
        save_hooked_model(model, directory)
    weights = next(directory.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=weights.name):
        load_model(directory)


@pytest.mark.parametrize("kind", ["gpt2", "pythia", "llama"])
def test_the_analyses_run_on_other_architectures(
    kind: str, tmp_path: Path, tokenizer: Any, unchanged: Any
) -> None:
    from memloc_tl import (
        EditConfig,
        HeadRef,
        Paragraphs,
        ablate_heads,
        activation_gradients,
        attribution_patching,
        gradient_norms,
        patching_sweep,
        rare_token_attention,
        scan_memorization,
        sparse_edit,
    )
    from memloc_tl.core.forward import greedy_continuations

    directory = tmp_path / kind
    tiny_checkpoint(kind, tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    model = load_model(directory, device="cpu")
    generator = torch.Generator().manual_seed(0)
    texts = torch.randint(0, len(tokenizer), (4, 40), generator=generator)
    target = Paragraphs.from_tokens(texts, prefix_len=20, vocab_size=model.cfg.d_vocab)
    # the model's own continuations: EM 20 by construction, which the scan must find
    own = target.with_continuation(greedy_continuations(model, target.prefix, 20))
    with unchanged(model):
        assert scan_memorization(model, own, progress=False).exact_match.tolist() == [20] * 4
        assert scan_memorization(model, target, progress=False).exact_match.max() < 20
        # patching a paragraph into itself changes nothing; zeroing a head changes something
        same = patching_sweep(model, own, own, progress=False)
        assert same.delta_nll.abs().max() < 1e-5
        zeroed = ablate_heads(model, own, [HeadRef(1, 0)], progress=False)
        assert (zeroed.nll - zeroed.baseline_nll).abs().max() > 0
        counts = torch.arange(model.cfg.d_vocab, dtype=torch.float)
        rare = rare_token_attention(model, own, counts, progress=False)
        assert rare.rare_mass.scores.shape == (2, 4)
        grads = activation_gradients(model, own, progress=False)
        assert grads.scores.shape[:3] == (4, 2, 4)
        assert torch.isfinite(grads.scores).all()
        estimate = attribution_patching(model, own, target, progress=False).estimate
        assert torch.isfinite(estimate).all()
    # shared keys and values, TransformerLens 3's cache or Hugging Face's (a bridge's own
    # attention, GPT-2's and Llama's under TransformerLens 4, is shown it by the name it reads):
    # a forward over a cached prefix gives the full forward's logits, greedy decoding too
    from memloc_tl.core.forward import PrefixKV, continuation_logits

    shared = PrefixKV.build(model, own.tokens)
    assert len(shared.keys) == model.cfg.n_layers
    assert shared.keys[0].shape[:2] == (4, own.seq_len)
    full = continuation_logits(model, own.tokens, 20)
    rows = torch.arange(4)
    for cached in (1, 12, 19):
        prefix = shared.cache(rows, cached)
        logits = continuation_logits(model, own.tokens, 20, past_kv_cache=prefix)
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
    text = target.prefix.clone()
    with torch.no_grad():  # greedy decoding by hand: a full forward over the text so far
        for _ in range(20):
            step = model(text, attention_mask=torch.ones_like(text))[:, -1]
            text = torch.cat([text, step.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(own.continuation, text[:, 20:])
    # and transformers' own greedy decoding of the checkpoint (TransformerLens 4.3's bridge
    # `generate` differs from it on GPT-2 and Llama: its attention misses the cache there)
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    expected = hf.generate(
        target.prefix,
        attention_mask=torch.ones_like(target.prefix),
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
    )
    assert torch.equal(own.continuation, expected[:, 20:])
    assert not any("_update_kv_cache" in vars(module) for module in model.modules())
    # the sweep from sources equal to the target up to position 15 (causal reuse) equals
    # the sweep that recomputes every position
    late = torch.cat([own.tokens[:, :15], target.tokens[:, 15:]], dim=1)
    pmp = Paragraphs.from_tokens(late, prefix_len=20, vocab_size=model.cfg.d_vocab)
    lengths: list[int] = []
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with model.hooks(fwd_hooks=[(last, lambda resid, hook: lengths.append(resid.shape[1]))]):
        reused = patching_sweep(model, own, pmp, progress=False)
    assert min(lengths) < own.seq_len  # the later positions only: the reuse ran
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("memloc_tl.analysis.patching.shares_prefix_cache", lambda model: False)
        plain = patching_sweep(model, own, pmp, progress=False)
    torch.testing.assert_close(reused.delta_nll, plain.delta_nll, atol=1e-5, rtol=0)
    assert torch.equal(reused.delta_em, plain.delta_em)
    if is_bridge(model):  # never a silently wrong number: an ignored cache is an error
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(
                "memloc_tl.core.backend._attention_reads_cache",
                lambda model, active=True: contextlib.nullcontext(),
            )
            error: RuntimeError | None = None
            try:
                ignored = continuation_logits(
                    model, own.tokens, 20, past_kv_cache=shared.cache(rows, 12)
                )
            except RuntimeError as caught:  # transformers that name it `cache`
                error = caught
        if error is not None:
            assert "ignored the key/value cache" in str(error)
        else:  # a bridge (or transformers) that passes it by the name the attention reads
            torch.testing.assert_close(ignored, full, atol=1e-5, rtol=0)
    if kind == "llama":  # grouped-query attention: weight-level analyses say why not
        with pytest.raises(ValueError, match="grouped-query attention"):
            gradient_norms(model, own, progress=False)
        return
    if kind == "gpt2" and is_bridge(model):  # the bridge splits GPT-2's fused c_attn in copies
        with pytest.raises(ValueError, match="not a view"):
            gradient_norms(model, own, progress=False)
        return
    norms = gradient_norms(model, own, progress=False)
    assert norms.l2.scores.shape == (2, 4 * 4 + 2)
    config = EditConfig(steps=2, lr=1e-2, fraction=0.01)
    edit = sparse_edit(model, own[:2], keep=target, config=config, progress=False)
    assert 0 < edit.mask.count <= 0.01 * sum(m.numel() for m in edit.mask.masks.values()) + 1


def test_loading_prints_no_third_party_progress_bars(
    neo_checkpoint: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.utils.logging as hf_logging

    monkeypatch.delenv("MEMLOC_VERBOSE", raising=False)
    load_model(neo_checkpoint)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the library's own setting is given back
    monkeypatch.setenv("MEMLOC_VERBOSE", "1")  # memloc --verbose
    load_model(neo_checkpoint)
    assert "Loading weights" in capfd.readouterr().err
