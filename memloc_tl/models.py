"""Load GPT-Neo as a TransformerLens HookedTransformer: from the hub, a directory or memory.

The paper (Stoehr et al. 2024, section 3) studies GPT-Neo 125M loaded with
``HookedTransformer.from_pretrained`` and TransformerLens's default weight processing
(fold_ln, center_writing_weights, center_unembed, fold_value_biases). :func:`load_model`
gives the same model from three kinds of source, the last two with no network at all:

- a hub name such as ``"EleutherAI/gpt-neo-125M"`` (or TransformerLens's alias ``"gpt-neo-125M"``);
- a local Hugging Face GPT-Neo checkpoint directory (``config.json``, weights, tokenizer files);
- an in-memory ``transformers`` ``GPTNeoForCausalLM`` together with its tokenizer.

Paragraph windows are raw 100-token windows, so every model is configured with
``default_prepend_bos=False``: ``model.to_tokens(text)`` never prepends a BOS token.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.neo import convert_neo_weights

from memloc_tl.files import atomic_directory, read_json, verify_checksums

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "EleutherAI/gpt-neo-125M"
"""The model the paper studies."""

NEO_ARCHITECTURE = "GPTNeoForCausalLM"
HOOKED_CONFIG = "hooked_transformer_config.json"
HOOKED_WEIGHTS = "hooked_transformer.safetensors"


class HubUnavailableError(OSError):
    """A hub model was asked for, but the hub cannot be reached and the model is not cached."""


def hooked_config_from_neo(
    hf_config: Any,
    *,
    model_name: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    process_weights: bool = True,
) -> HookedTransformerConfig:
    """Map a ``transformers`` ``GPTNeoConfig`` to a ``HookedTransformerConfig``.

    The mapping is TransformerLens's own for ``GPTNeoForCausalLM``: ``d_mlp`` is
    ``4 * hidden_size``, attention is unscaled (no ``1/sqrt(d_head)``), and layers alternate
    global and local attention with ``window_size``.

    Args:
        hf_config: the ``GPTNeoConfig`` (``model.config`` or ``AutoConfig.from_pretrained``).
        model_name: name stored in ``cfg.model_name``.
        device: device of the model; default CUDA if available, else CPU.
        dtype: parameter dtype.
        process_weights: whether the weights will be processed (fold_ln): sets ``LNPre``.

    Raises:
        ValueError: the config is not GPT-Neo's, or uses an MLP width TransformerLens
            cannot represent.
    """
    architectures = list(getattr(hf_config, "architectures", None) or [NEO_ARCHITECTURE])
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "gpt_neo" or NEO_ARCHITECTURE not in architectures:
        raise ValueError(
            f"expected a GPT-Neo checkpoint (model_type 'gpt_neo', architecture "
            f"{NEO_ARCHITECTURE!r}), got model_type {model_type!r} with architectures "
            f"{architectures}; memloc-tl loads local checkpoints of GPT-Neo only"
        )
    d_model = int(hf_config.hidden_size)
    intermediate = getattr(hf_config, "intermediate_size", None)
    if intermediate not in (None, 4 * d_model):
        raise ValueError(
            f"intermediate_size={intermediate} is not 4 * hidden_size = {4 * d_model}; "
            "TransformerLens's GPT-Neo mapping always uses d_mlp = 4 * hidden_size"
        )
    cfg_dict: dict[str, Any] = {
        "d_model": d_model,
        "d_head": d_model // int(hf_config.num_heads),
        "n_heads": int(hf_config.num_heads),
        "d_mlp": 4 * d_model,
        "n_layers": int(hf_config.num_layers),
        "n_ctx": int(hf_config.max_position_embeddings),
        "eps": float(hf_config.layer_norm_epsilon),
        "d_vocab": int(hf_config.vocab_size),
        "attn_types": list(hf_config.attention_layers),
        "act_fn": hf_config.activation_function,
        "use_attn_scale": False,
        "use_local_attn": True,
        "window_size": int(hf_config.window_size),
        "scale_attn_by_inverse_layer_idx": False,
        "normalization_type": "LNPre" if process_weights else "LN",
        "original_architecture": NEO_ARCHITECTURE,
        "model_name": model_name,
        "tokenizer_prepends_bos": False,
        "default_prepend_bos": False,
        "init_weights": False,
        "device": device,
        "dtype": dtype,
    }
    return HookedTransformerConfig.from_dict(cfg_dict)


def load_model(
    source: str | os.PathLike[str] | Any = DEFAULT_MODEL,
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    process_weights: bool = True,
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """Load GPT-Neo as a ``HookedTransformer``, with no BOS prepended to text.

    Args:
        source: a hub name (default ``"EleutherAI/gpt-neo-125M"``), a local GPT-Neo
            checkpoint directory, or an in-memory ``transformers`` GPT-Neo model.
        tokenizer: the tokenizer of an in-memory model (required then); for a directory, one
            that overrides the tokenizer files saved there.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA if available, else CPU.
        process_weights: apply TransformerLens's default weight processing (fold_ln,
            center_writing_weights, center_unembed, fold_value_biases), as the paper does.
            Gradients and edits are then on the processed weights.
        dtype: parameter dtype.

    Returns:
        The model, in eval mode, with ``cfg.default_prepend_bos = False``.

    Raises:
        HubUnavailableError: a hub name that is neither cached nor reachable.
        FileNotFoundError: a directory without ``config.json``, weights or tokenizer files.
        ValueError: a checkpoint that is not GPT-Neo.
        TypeError: a source of another type, or an in-memory model without tokenizer.
    """
    if isinstance(source, torch.nn.Module):
        if tokenizer is None:
            raise TypeError(
                "an in-memory transformers model needs its tokenizer: "
                "load_model(hf_model, tokenizer=tokenizer)"
            )
        name = getattr(source.config, "name_or_path", "") or "gpt-neo"
        return _hooked_from_hf(
            source,
            tokenizer,
            name=name,
            device=device,
            process_weights=process_weights,
            dtype=dtype,
        )
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "source must be a hub name, a checkpoint directory or a transformers GPT-Neo model, "
            f"got {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if path.is_dir() and (path / HOOKED_CONFIG).is_file():
        return _load_hooked(path, tokenizer=tokenizer, device=device)
    if path.is_dir():
        return _load_local(
            path, tokenizer=tokenizer, device=device, process_weights=process_weights, dtype=dtype
        )
    if path.exists() or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{str(source)!r} is not a checkpoint directory; pass a directory holding config.json, "
            "the weights and the tokenizer files, or a hub name such as 'EleutherAI/gpt-neo-125M'"
        )
    return _load_from_hub(str(source), device=device, process_weights=process_weights, dtype=dtype)


def _hooked_from_hf(
    hf_model: Any,
    tokenizer: Any,
    *,
    name: str,
    device: str | torch.device | None,
    process_weights: bool,
    dtype: torch.dtype,
    tokenizer_is_saved: bool = False,
) -> HookedTransformer:
    cfg = hooked_config_from_neo(
        hf_model.config,
        model_name=name,
        device=device,
        dtype=dtype,
        process_weights=process_weights,
    )
    vocab = len(tokenizer)
    if vocab > cfg.d_vocab:
        raise ValueError(
            f"the tokenizer has {vocab} tokens but the model's vocabulary has {cfg.d_vocab}: "
            "they do not belong together; pass the tokenizer the model was trained with"
        )
    # Clone: TransformerLens's conversion returns views of the HF tensors, and weight
    # processing must never write into the caller's model.
    with torch.no_grad():
        state_dict = {
            key: value.detach().to(dtype).clone()
            for key, value in convert_neo_weights(hf_model, cfg).items()
        }
    model = _hooked_transformer(cfg, tokenizer, is_saved=tokenizer_is_saved)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=process_weights,
        center_writing_weights=process_weights,
        center_unembed=process_weights,
        fold_value_biases=process_weights,
    )
    model.move_model_modules_to_device()
    return model.eval()


def _hooked_transformer(
    cfg: HookedTransformerConfig, tokenizer: Any, *, is_saved: bool = False
) -> HookedTransformer:
    """``HookedTransformer(cfg, tokenizer)`` for any tokenizer object, offline.

    TransformerLens re-loads the tokenizer from its ``name_or_path`` (to set add_bos_token).
    One just read from a checkpoint directory (``is_saved``) is found there again. One given
    in memory may have no such path, or a hub name: it is handed over through a temporary
    directory, so that nothing touches the network.
    """
    from transformers import AutoTokenizer

    if is_saved:
        return HookedTransformer(cfg, tokenizer, move_to_device=False, default_padding_side="right")
    with tempfile.TemporaryDirectory(prefix="memloc-tokenizer-") as directory:
        tokenizer.save_pretrained(directory)
        saved = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        return HookedTransformer(cfg, saved, move_to_device=False, default_padding_side="right")


def _load_local(
    path: Path,
    *,
    tokenizer: Any,
    device: str | torch.device | None,
    process_weights: bool,
    dtype: torch.dtype,
) -> HookedTransformer:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: it is not a Hugging Face checkpoint")
    weights = [*path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")]
    if not weights:
        raise FileNotFoundError(f"{path} has no weights (model.safetensors or pytorch_model.bin)")
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path / 'config.json'} cannot be read: {error}") from error
    except Exception as error:  # transformers' config validators raise their own types
        if type(error).__module__.startswith(("transformers", "huggingface_hub")):
            raise ValueError(f"{path / 'config.json'} is not a valid config: {error}") from error
        raise
    # Validate before loading weights, so a wrong architecture fails fast and clearly.
    hooked_config_from_neo(hf_config, model_name=path.name, process_weights=process_weights)
    tokenizer_is_saved = tokenizer is None
    if tokenizer is None:
        tokenizer = _local_tokenizer(path)
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=dtype, output_loading_info=True
    )
    hf_model, info = loaded
    # Weights the config expects but the files lack (or of another shape) would be left at
    # their random initialization; tensors beyond the config would be dropped. Either way the
    # checkpoint is not what it claims to be. (GPT-Neo's causal-mask buffers do not count.)
    unexpected = [k for k in info.get("unexpected_keys", ()) if not k.endswith(MASK_BUFFERS)]
    problems = {
        "missing": list(info.get("missing_keys", ())),
        "unexpected": unexpected,
        "mismatched": [str(k) for k in info.get("mismatched_keys", ())],
        "errors": list(info.get("error_msgs", ())),
    }
    if any(problems.values()):
        found = {k: v[:5] for k, v in problems.items() if v}
        raise ValueError(
            f"the weights in {path} do not fit its config.json ({found}): the checkpoint is "
            "incomplete, or its config.json belongs to another model"
        )
    return _hooked_from_hf(
        hf_model,
        tokenizer,
        name=path.name,
        device=device,
        process_weights=process_weights,
        dtype=dtype,
        tokenizer_is_saved=tokenizer_is_saved,
    )


MASK_BUFFERS = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias")
"""Buffers that older GPT-Neo checkpoints store and ``transformers`` rebuilds."""

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer_config.json")
"""Any one of these marks a directory that holds a tokenizer."""


def _local_tokenizer(path: Path) -> Any:
    """The tokenizer saved in ``path``, or a clear error saying how to provide one."""
    from transformers import AutoTokenizer

    fix = (
        "save it with tokenizer.save_pretrained(directory) or pass load_model(path, tokenizer=...)"
    )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); {fix}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise FileNotFoundError(f"{path} has no usable tokenizer ({error}); {fix}") from error
    if len(tokenizer) < 2:
        raise FileNotFoundError(f"the tokenizer in {path} has {len(tokenizer)} token(s); {fix}")
    return tokenizer


def save_hooked_model(model: HookedTransformer, directory: str | os.PathLike[str]) -> Path:
    """Save a HookedTransformer as it is (processed and possibly edited weights) for load_model.

    An edited model cannot always go back to a Hugging Face GPT-Neo checkpoint: weight
    processing folds LayerNorm into biases GPT-Neo's q/k/v projections do not have. This writes
    the TransformerLens config, state dict and tokenizer instead; ``load_model(directory)``
    reloads them exactly, after checking the files' SHA-256 (``checksums.json``). Files are
    written to a temporary directory that is then renamed; an existing non-empty ``directory``
    is a ``FileExistsError`` before anything is written.
    """
    from safetensors.torch import save_file

    with atomic_directory(directory) as staging:
        config = dict(model.cfg.to_dict())  # to_dict returns the live __dict__: copy it
        config["dtype"] = str(config["dtype"]).removeprefix("torch.")
        config.pop("device", None)
        (staging / HOOKED_CONFIG).write_text(json.dumps(config, indent=1, default=list))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(staging / HOOKED_WEIGHTS))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(staging)
    return Path(directory)


def _load_hooked(
    path: Path, *, tokenizer: Any, device: str | torch.device | None
) -> HookedTransformer:
    from safetensors.torch import load_file

    fix = "save the model again (save_hooked_model) or restore the directory from a backup"
    verify_checksums(path, fix=fix, required=False)  # directories saved before 0.2 have none
    config = read_json(path / HOOKED_CONFIG, fix=fix)
    config["dtype"] = getattr(torch, config["dtype"])
    config["device"] = device
    cfg = HookedTransformerConfig.from_dict(config)
    tokenizer_is_saved = tokenizer is None
    if tokenizer is None:
        tokenizer = _local_tokenizer(path)
    model = _hooked_transformer(cfg, tokenizer, is_saved=tokenizer_is_saved)
    try:
        model.load_state_dict(load_file(str(path / HOOKED_WEIGHTS)))
    except RuntimeError as error:  # missing, unexpected or mis-shaped tensors
        raise ValueError(
            f"{path / HOOKED_WEIGHTS} does not match {path / HOOKED_CONFIG}: {error}"
        ) from error
    model.move_model_modules_to_device()
    return model.eval()


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    parsed = urlparse(constants.ENDPOINT)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make huggingface_hub and transformers read only their cache, then restore."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _load_from_hub(
    name: str, *, device: str | torch.device | None, process_weights: bool, dtype: torch.dtype
) -> HookedTransformer:
    from huggingface_hub import constants, try_to_load_from_cache
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError as error:
        raise ValueError(
            f"{name!r} is neither a local checkpoint directory nor a model TransformerLens "
            f"knows ({error}); for GPT-Neo 125M pass {DEFAULT_MODEL!r}"
        ) from error
    cached = isinstance(try_to_load_from_cache(official, "config.json"), str)
    how_to = (
        f"Load a local GPT-Neo checkpoint directory instead: load_model('/path/to/checkpoint') "
        f"(config.json, model.safetensors, tokenizer files; create one on a machine with network "
        f"via transformers: AutoModelForCausalLM.from_pretrained({official!r})"
        f".save_pretrained(dir) and the same for AutoTokenizer), or use the offline organism: "
        f"memloc_tl.build_organism() in Python, --model organism on the command line."
    )
    offline = bool(constants.HF_HUB_OFFLINE)
    if not cached and offline:
        raise HubUnavailableError(
            f"{official} is not in the Hugging Face cache and HF_HUB_OFFLINE is set. {how_to}"
        )
    reachable = not offline and _hub_reachable()
    if not cached and not reachable:
        raise HubUnavailableError(
            f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached and {official} is not "
            f"in the cache. {how_to}"
        )
    pw = process_weights
    kwargs: dict[str, Any] = {
        "device": device,
        "dtype": dtype,
        "fold_ln": pw,
        "center_writing_weights": pw,
        "center_unembed": pw,
        "fold_value_biases": pw,
        "default_prepend_bos": False,
    }
    scope = contextlib.nullcontext() if reachable else _hub_offline()
    try:
        with scope:
            model = HookedTransformer.from_pretrained(official, **kwargs)
    except OSError as error:
        raise HubUnavailableError(
            f"loading {official} from the hub failed: {error}. {how_to}"
        ) from error
    return model.eval()
