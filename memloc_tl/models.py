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
import copy
import json
import logging
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from memloc_tl.core.backend import Backend, HookedModel, check_backend, is_bridge
from memloc_tl.core.files import (
    CorruptFileError,
    atomic_directory,
    read_json,
    save_safetensors,
    verify_checksums,
)
from memloc_tl.core.quiet import quietly
from memloc_tl.core.validation import check_device

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "EleutherAI/gpt-neo-125M"
"""The model the paper studies."""

HOOKED_CONFIG = "hooked_transformer_config.json"
HOOKED_WEIGHTS = "hooked_transformer.safetensors"


class HubUnavailableError(OSError):
    """A hub model was asked for, but the hub cannot be reached and the model is not cached."""


@quietly
def load_model(
    source: str | os.PathLike[str] | Any = DEFAULT_MODEL,
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    process_weights: bool = True,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    backend: Backend = "auto",
) -> HookedModel:
    """Load a language model as a TransformerLens model, with no BOS prepended to text.

    Args:
        source: a hub name (default ``"EleutherAI/gpt-neo-125M"``), a local Hugging Face
            checkpoint directory of any architecture TransformerLens supports (GPT-Neo, GPT-2,
            GPT-NeoX/Pythia, Llama-family, ...), or an in-memory ``transformers`` model.
        tokenizer: the tokenizer of an in-memory model (required then); for a directory, one
            that overrides the tokenizer files saved there.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA if available, else CPU.
        process_weights: apply TransformerLens's default weight processing (fold_ln,
            center_writing_weights, center_unembed, fold_value_biases), as the paper does.
            Gradients and edits are then on the processed weights.
        dtype: parameter dtype.
        revision: a hub revision (branch, tag or commit), e.g. ``"step143000"`` for a Pythia
            training checkpoint. Hub names only.
        backend: ``"hooked"`` (TransformerLens 3's ``HookedTransformer``), ``"bridge"``
            (``TransformerBridge`` in compatibility mode, TransformerLens 4 or 3.9+) or
            ``"auto"``: the HookedTransformer where it exists, else the bridge.

    Returns:
        The model, in eval mode, with ``cfg.default_prepend_bos = False``.

    Raises:
        HubUnavailableError: a hub name that is neither cached nor reachable.
        FileNotFoundError: a directory without ``config.json``, weights or tokenizer files.
        ValueError: a checkpoint TransformerLens cannot load, or a backend this installation
            lacks.
        TypeError: a source of another type, or an in-memory model without tokenizer.
    """
    chosen = check_backend(backend)
    check_device(device)
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision must be a string such as 'step143000', got {revision!r}")
    if isinstance(source, torch.nn.Module):
        if tokenizer is None:
            raise TypeError(
                "an in-memory transformers model needs its tokenizer: "
                "load_model(hf_model, tokenizer=tokenizer)"
            )
        if revision is not None:
            raise ValueError("revision applies to hub names only, not to an in-memory model")
        name = getattr(source.config, "name_or_path", "") or "model"
        return _from_hf(
            source,
            tokenizer,
            name=name,
            backend=chosen,
            device=device,
            process_weights=process_weights,
            dtype=dtype,
        )
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "source must be a hub name, a checkpoint directory or a transformers model, "
            f"got {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if path.exists() and revision is not None:
        raise ValueError(f"revision applies to hub names only, not to the directory {path}")
    if path.is_dir() and (path / HOOKED_CONFIG).is_file():
        if chosen != "hooked":
            raise ValueError(
                f"{path} holds a saved HookedTransformer, which needs backend='hooked' "
                "(TransformerLens 3)"
            )
        return _load_hooked(path, tokenizer=tokenizer, device=device)
    if path.is_dir():
        return _load_local(
            path,
            tokenizer=tokenizer,
            backend=chosen,
            device=device,
            process_weights=process_weights,
            dtype=dtype,
        )
    if path.exists() or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{str(source)!r} is not a checkpoint directory; pass a directory holding config.json, "
            "the weights and the tokenizer files, or a hub name such as 'EleutherAI/gpt-neo-125M'"
        )
    return _load_from_hub(
        str(source),
        backend=chosen,
        device=device,
        process_weights=process_weights,
        dtype=dtype,
        revision=revision,
    )


def _from_hf(
    hf_model: Any,
    tokenizer: Any,
    *,
    name: str,
    backend: str,
    device: str | torch.device | None,
    process_weights: bool,
    dtype: torch.dtype,
    tokenizer_is_saved: bool = False,
    owned: bool = False,
) -> HookedModel:
    """The TransformerLens model of an in-memory Hugging Face model (never changed unless owned)."""
    vocab = len(tokenizer)
    d_vocab = getattr(hf_model.config, "vocab_size", None)
    if d_vocab is None:
        d_vocab = hf_model.get_output_embeddings().weight.shape[0]
    if vocab > d_vocab:
        raise ValueError(
            f"the tokenizer has {vocab} tokens but the model's vocabulary has {d_vocab}: "
            "they do not belong together; pass the tokenizer the model was trained with"
        )
    if backend == "bridge":
        return _bridge_from_hf(
            hf_model if owned else copy.deepcopy(hf_model),
            tokenizer,
            name=name,
            device=device,
            process_weights=process_weights,
            dtype=dtype,
            tokenizer_is_saved=tokenizer_is_saved,
        )
    return _hooked_from_hf(
        hf_model,
        tokenizer,
        name=name,
        device=device,
        process_weights=process_weights,
        dtype=dtype,
        tokenizer_is_saved=tokenizer_is_saved,
    )


def _bridge_from_hf(
    hf_model: Any,
    tokenizer: Any,
    *,
    name: str,
    device: str | torch.device | None,
    process_weights: bool,
    dtype: torch.dtype,
    tokenizer_is_saved: bool,
) -> HookedModel:
    """A TransformerBridge in compatibility mode around ``hf_model`` (which it processes)."""
    from transformer_lens.model_bridge import TransformerBridge

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf_model = hf_model.to(device=device, dtype=dtype)
    with _reloadable(tokenizer, is_saved=tokenizer_is_saved) as reloadable:
        bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf_model, tokenizer=reloadable, device=device, dtype=dtype
        )
    return _compatible(bridge, process_weights)


def _compatible(bridge: Any, process_weights: bool) -> HookedModel:
    """HookedTransformer's weight processing and hook names on the bridge; no BOS for text."""
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not process_weights)
    bridge.cfg.default_prepend_bos = False
    bridge.eval()
    # The bridge registers module hooks of its own on its first forward and its first cached
    # run; one tiny run of each here, so that the first analysis leaves the model exactly as it
    # found it.
    with torch.no_grad():
        token = torch.zeros(1, 1, dtype=torch.long, device=bridge.cfg.device)
        bridge(token, attention_mask=torch.ones_like(token))
        bridge.run_with_cache(token, attention_mask=torch.ones_like(token))
    return bridge


def _hooked_from_hf(
    hf_model: Any,
    tokenizer: Any,
    *,
    name: str,
    device: str | torch.device | None,
    process_weights: bool,
    dtype: torch.dtype,
    tokenizer_is_saved: bool = False,
) -> HookedModel:
    """TransformerLens 3's own config mapping and weight conversion, for any architecture."""
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )

    with config_directory(hf_model.config) as neutral:
        try:
            cfg = get_pretrained_model_config(
                neutral,
                fold_ln=process_weights,
                device=device,
                dtype=dtype,
                default_prepend_bos=False,
            )
        except (KeyError, NotImplementedError, ValueError) as error:
            architectures = getattr(hf_model.config, "architectures", None)
            raise ValueError(
                f"TransformerLens cannot load this checkpoint (architectures {architectures}): "
                f"{error}"
            ) from error
        cfg.model_name = name
        # Clone: the conversion returns views of the HF tensors, and weight processing must
        # never write into the caller's model.
        with torch.no_grad():
            state_dict = {
                key: value.detach().to(dtype).clone()
                for key, value in get_pretrained_state_dict(
                    neutral, cfg, hf_model=hf_model, dtype=dtype
                ).items()
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


@contextlib.contextmanager
def config_directory(hf_config: Any) -> Iterator[str]:
    """A temporary checkpoint directory holding only ``hf_config``, for TransformerLens 3.

    TransformerLens 3 reads a local model's config from a directory, and guesses some
    architectures from the directory's *name* (anything named "llama..."), so the directory it
    gets has a neutral one.
    """
    with tempfile.TemporaryDirectory(prefix="memloc-config-") as directory:
        neutral = Path(directory) / "checkpoint"
        hf_config.save_pretrained(neutral)
        yield str(neutral)


def _hooked_transformer(cfg: Any, tokenizer: Any, *, is_saved: bool = False) -> HookedModel:
    """``HookedTransformer(cfg, tokenizer)`` for any tokenizer object, offline."""
    from transformer_lens import HookedTransformer

    with _reloadable(tokenizer, is_saved) as reloadable:
        return HookedTransformer(
            cfg, reloadable, move_to_device=False, default_padding_side="right"
        )


@contextlib.contextmanager
def _reloadable(tokenizer: Any, is_saved: bool) -> Iterator[Any]:
    """The tokenizer, as one TransformerLens can re-load from its ``name_or_path``, offline.

    TransformerLens re-loads the tokenizer from its path (to set add_bos_token; the bridge also
    reads ``name_or_path``). One just read from a checkpoint directory (``is_saved``) is found
    there again. One given in memory may have no such path, or a hub name: it is handed over
    through a temporary directory, so that nothing touches the network.
    """
    from transformers import AutoTokenizer

    if is_saved:
        yield tokenizer
        return
    with tempfile.TemporaryDirectory(prefix="memloc-tokenizer-") as directory:
        tokenizer.save_pretrained(directory)
        yield AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _load_local(
    path: Path,
    *,
    tokenizer: Any,
    backend: str,
    device: str | torch.device | None,
    process_weights: bool,
    dtype: torch.dtype,
) -> HookedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: it is not a Hugging Face checkpoint")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        if pickled:
            raise ValueError(
                f"{path} holds only pickle weights ({', '.join(pickled)}), which memloc-tl does "
                "not load (unpickling can run code, and torch's safe mode refuses many); convert "
                "them once where you trust the file: AutoModelForCausalLM.from_pretrained(path, "
                "use_safetensors=False).save_pretrained(path) writes model.safetensors"
            )
        raise FileNotFoundError(f"{path} has no weights (no model.safetensors)")
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path / 'config.json'} cannot be read: {error}") from error
    except Exception as error:  # transformers' config validators raise their own types
        if type(error).__module__.startswith(("transformers", "huggingface_hub")):
            raise ValueError(f"{path / 'config.json'} is not a valid config: {error}") from error
        raise
    _check_architecture(hf_config, path)
    _check_weight_headers(weights, hf_config, path)
    tokenizer_is_saved = tokenizer is None
    if tokenizer is None:
        tokenizer = _local_tokenizer(path)
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype, output_loading_info=True
        )
    except Exception as error:
        if type(error).__name__ == "SafetensorError":
            raise CorruptFileError(
                f"the weights in {path} cannot be read ({error}): the file is truncated or "
                "damaged; copy or save the checkpoint again"
            ) from error
        if isinstance(error, RuntimeError) and "mismatch" in str(error):
            raise ValueError(
                f"the weights in {path} do not fit its config.json ({str(error)[:300]}): "
                "its config.json belongs to another model"
            ) from error
        raise
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
    return _from_hf(
        hf_model,
        tokenizer,
        name=path.name,
        backend=backend,
        device=device,
        process_weights=process_weights,
        dtype=dtype,
        tokenizer_is_saved=tokenizer_is_saved,
        owned=True,
    )


def _check_weight_headers(files: list[Path], hf_config: Any, path: Path) -> None:
    """Read only the safetensors headers: complete files, and as many layers as the config says.

    Runs before any model is built, so a config that claims a million layers is refused at
    once instead of allocating them, and a truncated file names itself.
    """
    fix = "copy or save the checkpoint again"
    layers: set[int] = set()
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        size = file.stat().st_size
        try:
            with open(file, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                if not 0 < length <= size - 8:
                    raise ValueError(f"a header of {length} bytes in a file of {size}")
                header = json.loads(handle.read(length))
            ends = [
                entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"
            ]
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as error:
            raise CorruptFileError(
                f"{file} is not a readable safetensors file ({error}); {fix}"
            ) from error
        described = 8 + length + max(ends, default=0)
        if described != size:
            raise CorruptFileError(
                f"{file} holds {size} bytes, its header describes {described}: the file is "
                f"truncated or damaged; {fix}"
            )
        for key, entry in header.items():
            if key != "__metadata__":
                shapes[key] = tuple(entry.get("shape", ()))
            match = re.search(r"\.(?:h|layers|layer|blocks)\.(\d+)\.", key)
            if match:
                layers.add(int(match.group(1)))
    expected = getattr(hf_config, "num_hidden_layers", None)
    if layers and isinstance(expected, int) and expected != len(layers):
        raise ValueError(
            f"the weights in {path} do not fit its config.json: it says {expected} layers, the "
            f"weights hold {len(layers)}; the config.json belongs to another model"
        )
    # Shapes: the model the config describes, built on the meta device (no memory), against
    # the headers. transformers would otherwise fail with a RuntimeError deep in loading.
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    wanted = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    mismatched = [
        f"{name}: {shape} in the file, {wanted[name]} by the config"
        for name, shape in shapes.items()
        if name in wanted and wanted[name] != shape
    ]
    if mismatched:
        raise ValueError(
            f"the weights in {path} do not fit its config.json ({'; '.join(mismatched[:3])}): "
            "the config.json belongs to another model"
        )


def _check_architecture(hf_config: Any, path: Path) -> None:
    """Fail fast, before any weight is read, on a checkpoint TransformerLens cannot load."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if not architectures:
        raise ValueError(
            f"{path / 'config.json'} names no architecture ('architectures' is empty); save the "
            "checkpoint with transformers' save_pretrained, which writes it"
        )
    if not architectures[0].endswith(("ForCausalLM", "LMHeadModel")):
        raise ValueError(
            f"{path} is a {architectures[0]} checkpoint, not a causal language model "
            "(...ForCausalLM or ...LMHeadModel): memorization is measured by greedy decoding"
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


def save_hooked_model(model: HookedModel, directory: str | os.PathLike[str]) -> Path:
    """Save a HookedTransformer as it is (processed and possibly edited weights) for load_model.

    An edited model cannot always go back to a Hugging Face GPT-Neo checkpoint: weight
    processing folds LayerNorm into biases GPT-Neo's q/k/v projections do not have. This writes
    the TransformerLens config, state dict and tokenizer instead; ``load_model(directory)``
    reloads them exactly, after checking the files' SHA-256 (``checksums.json``). Files are
    written to a temporary directory that is then renamed; an existing non-empty ``directory``
    is a ``FileExistsError`` before anything is written.
    """
    if is_bridge(model):
        raise TypeError(
            "save_hooked_model saves a HookedTransformer; for a TransformerBridge save the "
            "edit instead (EditResult.edit.save(path)) and apply it to the loaded model"
        )
    with atomic_directory(directory) as staging:
        config = dict(model.cfg.to_dict())  # to_dict returns the live __dict__: copy it
        config["dtype"] = str(config["dtype"]).removeprefix("torch.")
        config.pop("device", None)
        (staging / HOOKED_CONFIG).write_text(json.dumps(config, indent=1, default=list))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_safetensors(state, staging / HOOKED_WEIGHTS)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(staging)
    return Path(directory)


def _load_hooked(path: Path, *, tokenizer: Any, device: str | torch.device | None) -> HookedModel:
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformerConfig

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
    name: str,
    *,
    backend: str,
    device: str | torch.device | None,
    process_weights: bool,
    dtype: torch.dtype,
    revision: str | None,
) -> HookedModel:
    import transformer_lens.supported_models as supported
    from huggingface_hub import constants, try_to_load_from_cache

    # where TransformerLens keeps its name resolver: supported_models (4), else loading (3)
    if hasattr(supported, "get_official_model_name"):
        get_official_model_name = getattr(supported, "get_official_model_name")  # noqa: B009
    else:
        from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError as error:
        raise ValueError(
            f"{name!r} is neither a local checkpoint directory nor a model TransformerLens "
            f"knows ({error}); for GPT-Neo 125M pass {DEFAULT_MODEL!r}"
        ) from error
    cached = isinstance(try_to_load_from_cache(official, "config.json", revision=revision), str)
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
    scope = contextlib.nullcontext() if reachable else _hub_offline()
    try:
        with scope:
            if backend == "bridge":
                from transformer_lens.model_bridge import TransformerBridge

                bridge = TransformerBridge.boot_transformers(
                    official, device=device, dtype=dtype, revision=revision
                )
                return _compatible(bridge, process_weights)
            from transformer_lens import HookedTransformer

            pw = process_weights
            extra: dict[str, Any] = {"dtype": dtype}
            if revision is not None:
                extra["revision"] = revision
            model = HookedTransformer.from_pretrained(
                official,
                device=device,
                fold_ln=pw,
                center_writing_weights=pw,
                center_unembed=pw,
                fold_value_biases=pw,
                default_prepend_bos=False,
                **extra,
            )
    except OSError as error:
        raise HubUnavailableError(
            f"loading {official} from the hub failed: {error}. {how_to}"
        ) from error
    return model.eval()
