"""load_model: local checkpoints, in-memory models and the hub path, against transformers."""

from __future__ import annotations

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

from memloc_tl.models import (
    DEFAULT_MODEL,
    HubUnavailableError,
    hooked_config_from_neo,
    load_model,
)
from tests.conftest import random_neo

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
    model = load_model(neo_checkpoint, device="cpu")
    assert model.cfg.normalization_type == "LNPre"  # fold_ln happened
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


def test_config_mapping_equals_transformer_lens(neo_checkpoint: Path) -> None:
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformers import AutoConfig

    theirs = convert_hf_model_config(str(neo_checkpoint))
    ours = hooked_config_from_neo(
        AutoConfig.from_pretrained(neo_checkpoint), model_name="x", process_weights=False
    )
    for key in (
        "d_model",
        "d_head",
        "n_heads",
        "d_mlp",
        "n_layers",
        "n_ctx",
        "eps",
        "d_vocab",
        "attn_types",
        "act_fn",
        "use_attn_scale",
        "use_local_attn",
        "window_size",
        "normalization_type",
        "original_architecture",
    ):
        assert getattr(ours, key) == theirs[key], key


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
    gpt2_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(
        gpt2_dir
    )
    with pytest.raises(ValueError, match="GPT-Neo"):
        load_model(gpt2_dir)
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
    from memloc_tl.files import CorruptFileError
    from memloc_tl.models import save_hooked_model

    model = load_model(neo_checkpoint)
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
