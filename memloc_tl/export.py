"""Edited models back to ``transformers``: :func:`export_hf` writes a standard checkpoint.

Edits must be made where they map back exactly: on a model loaded with
``load_model(..., process_weights=False)``. Then every TransformerLens weight is a rearrangement
of Hugging Face parameters (heads split out, matrices transposed, fused projections cut apart),
and nothing else:

- on a TransformerBridge the weights *are* views of the Hugging Face parameters, so the wrapped
  ``transformers`` model already holds the edit and is saved as it is;
- on a HookedTransformer each weight entry is traced to the Hugging Face entry it came from, by
  converting a copy of the original checkpoint whose entries hold their own positions (with
  TransformerLens's own conversion for the architecture, so no per-architecture table), and the
  edited values are written there.

With processed weights (LayerNorm folded into the next matrices, writing weights centred) an edit
has no exact counterpart in the original parameters, so :func:`export_hf` refuses such a model and
says how to edit in the raw weight space instead.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from memloc_tl.core.backend import HookedModel, is_bridge
from memloc_tl.core.files import atomic_directory
from memloc_tl.models import config_directory


def export_hf(
    edited: Any,
    directory: str | os.PathLike[str],
    *,
    base: Any = None,
) -> Path:
    """Write the edited model as a ``transformers`` checkpoint (``save_pretrained`` layout).

    ``AutoModelForCausalLM.from_pretrained(directory)`` loads it, and its logits equal the edited
    model's (within float rounding). The directory is written atomically; an existing non-empty
    one is a ``FileExistsError`` before anything is written.

    Args:
        edited: the edited model, loaded with ``process_weights=False`` (for an ``EditResult``,
            ``with result.applied(model): export_hf(model, ...)``).
        directory: where to write the checkpoint and the tokenizer.
        base: for a HookedTransformer, the checkpoint it was loaded from: a directory, a hub
            name, or an in-memory ``transformers`` model (its config and every parameter
            TransformerLens does not hold come from there). Not needed for a bridge.

    Raises:
        ValueError: a model with processed weights, or a base that is not the model's origin.
        TypeError: no base for a HookedTransformer, or an object that is not a model.
    """
    if hasattr(edited, "edit") and hasattr(edited, "applied"):
        raise TypeError(
            "export_hf takes the edited model, and an EditResult holds the change, not a model: "
            "with result.applied(model): export_hf(model, directory, base=...)"
        )
    model: HookedModel = edited
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "cfg"):
        raise TypeError(f"expected a TransformerLens model, got {type(edited).__name__}")
    if _processed(model):
        raise ValueError(
            "this model's weights are processed (LayerNorm folded, writing weights centred), so "
            "an edit has no exact counterpart in the original checkpoint: load it with "
            "load_model(..., process_weights=False), edit that model, then export it"
        )
    if is_bridge(model):
        hf_model = _hf_from_bridge(model)
    else:
        if base is None:
            raise TypeError(
                "a HookedTransformer needs base=: the checkpoint it was loaded from (a directory, "
                "a hub name or the transformers model), for its config and untouched parameters"
            )
        hf_model = _hf_with_weights(model, base)
    with atomic_directory(directory) as staging:
        hf_model.save_pretrained(staging)
        tokenizer: Any = getattr(model, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(directory)


def _processed(model: HookedModel) -> bool:
    if is_bridge(model):
        return bool(getattr(model, "_weights_processed", False))
    return model.cfg.normalization_type in ("LNPre", "RMSPre")


def _hf_from_bridge(model: HookedModel) -> Any:
    """A plain ``transformers`` model with the bridge's parameters (which hold the edit).

    The bridge wraps each Hugging Face module (``..._original_component``) and reaches some
    parameters under several names; the names without the wrappers are the checkpoint's.
    """
    from transformers import AutoModelForCausalLM

    wrapped = getattr(model, "original_model")  # noqa: B009
    fresh = AutoModelForCausalLM.from_config(wrapped.config)
    wanted = set(fresh.state_dict())
    state = {}
    for name, param in wrapped.named_parameters(remove_duplicate=False):
        plain = name.replace("._original_component", "")
        if plain in wanted:
            state.setdefault(plain, param.detach().to("cpu").clone())
    missing = [k for k in wanted - set(state) if k not in _tied(fresh)]
    missing = [k for k in missing if k in dict(fresh.named_parameters())]
    if missing:
        raise ValueError(f"the bridge holds no value for {sorted(missing)[:3]}: cannot export it")
    fresh.load_state_dict(state, strict=False)
    return fresh.to(model.cfg.dtype).eval()


def _tied(hf_model: Any) -> set[str]:
    """Parameters that are the same tensor as another (the unembedding tied to the embedding)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in hf_model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.setdefault(id(param), name)
    return tied


def _hf_with_weights(model: HookedModel, base: Any) -> Any:
    """The base checkpoint with every entry the HookedTransformer holds set to its value."""
    from transformers import AutoModelForCausalLM

    if isinstance(base, torch.nn.Module):
        if not hasattr(base, "config"):
            raise TypeError(f"base must be a transformers model, got {type(base).__name__}")
        hf_model = copy.deepcopy(base)
    else:
        hf_model = AutoModelForCausalLM.from_pretrained(base, dtype=model.cfg.dtype)
    _check_architecture(model, hf_model)
    positions = _positions(model, hf_model)
    params = dict(hf_model.named_parameters())
    flat = torch.cat([p.detach().flatten().to(torch.float64) for p in params.values()])
    written = torch.zeros(len(flat), dtype=torch.bool)
    state = model.state_dict()
    _check_origin(model, positions, flat)
    with torch.no_grad():
        for name, where in positions.items():
            value = state[name].detach().to("cpu", torch.float64).flatten()
            where = where.flatten()
            held = where > 0
            index = where[held] - 1
            conflicting = written[index] & (flat[index] != value[held])
            if bool(conflicting.any()):
                raise ValueError(
                    f"{name} and another weight hold the same checkpoint entry with different "
                    "values (tied weights edited apart): the model cannot be written back"
                )
            flat[index] = value[held]
            written[index] = True
        start = 0
        for param in params.values():
            param.copy_(flat[start : start + param.numel()].view_as(param).to(param.dtype))
            start += param.numel()
    return hf_model


NOT_THE_ORIGIN = (
    "base must be the checkpoint this model was loaded from (load_model(base, "
    "process_weights=False)); "
)


def _check_architecture(model: HookedModel, hf_model: Any) -> None:
    """The base is of the model's architecture (a GPT-2 base for a GPT-Neo model is refused)."""
    ours = getattr(model.cfg, "original_architecture", None)
    theirs = list(getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__])
    if ours is not None and ours not in theirs:
        raise ValueError(f"{NOT_THE_ORIGIN}the model is a {ours}, base a {theirs[0]}")


def _check_origin(
    model: HookedModel, positions: dict[str, torch.Tensor], flat: torch.Tensor
) -> None:
    """Every weight an edit never changes (embeddings, LayerNorm, biases) equals the base's.

    memloc-tl edits only the attributed matrices, so the others still hold the values the model
    was loaded with; a base of the same shape but other values (another checkpoint) differs there.
    """
    from memloc_tl.core.objectives import attributed_names

    edited = {name.rsplit(".", 1)[1] for name in attributed_names(model)}  # W_Q, ..., W_out
    state = model.state_dict()
    for name, where in positions.items():
        if name.rsplit(".", 1)[-1].lstrip("_") in edited:  # also GQA's _W_K, _W_V
            continue
        held = where.flatten() > 0
        if not bool(held.any()):
            continue
        ours = state[name].detach().to("cpu", torch.float64).flatten()[held]
        theirs = flat[where.flatten()[held] - 1]
        if not torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6):
            worst = float((ours - theirs).abs().max())
            raise ValueError(
                f"{NOT_THE_ORIGIN}{name}, which no edit changes, differs from base's by up to "
                f"{worst:.3g}: base is another checkpoint"
            )


def _positions(model: HookedModel, hf_model: Any) -> dict[str, torch.Tensor]:
    """Per TransformerLens tensor, the 1-based flat index of the checkpoint entry of each entry.

    0 marks an entry that comes from no checkpoint parameter (a zero bias TransformerLens adds).
    """
    from transformer_lens.loading_from_pretrained import get_pretrained_state_dict

    probe = copy.deepcopy(hf_model).to(torch.float64)
    start = 1
    with torch.no_grad():
        for param in probe.parameters():
            count = param.numel()
            param.copy_(torch.arange(start, start + count, dtype=torch.float64).view_as(param))
            start += count
    cfg = copy.copy(model.cfg)
    cfg.dtype = torch.float64
    with config_directory(probe.config) as neutral:
        traced = get_pretrained_state_dict(neutral, cfg, hf_model=probe, dtype=torch.float64)
    state = model.state_dict()
    positions = {}
    for name, value in traced.items():
        if name not in state:
            continue
        if state[name].shape != value.shape:
            raise ValueError(
                f"{NOT_THE_ORIGIN}{name} has shape {tuple(state[name].shape)} in the model, "
                f"{tuple(value.shape)} in base: base is a model of another size"
            )
        if not torch.equal(value, value.round()) or bool((value < 0).any()):
            continue  # computed, not copied: not a rearrangement of checkpoint entries
        positions[name] = value.round().long()
    return positions
