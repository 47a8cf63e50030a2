"""Everything that depends on the TransformerLens version, in one place.

memloc-tl runs on two kinds of TransformerLens model:

- TransformerLens 3's ``HookedTransformer``: its weights (``blocks.0.attn.W_Q``, ...) are its own
  parameters;
- TransformerLens 4's ``TransformerBridge`` in compatibility mode (HookedTransformer's weight
  processing and hook names): it runs the Hugging Face model, and the TransformerLens-named
  weights are *views* of the Hugging Face parameters (``W_Q[h]`` is a slice of ``q_proj.weight``
  transposed and reshaped, for instance).

Analyzers, editing and views never ask which one they have: they use this module. A weight is a
:class:`Weight`, the TransformerLens-named view of the parameter autograd and optimizers see, so
gradients, masks and edits are mapped exactly between the two layouts (``as_strided`` with the
view's own strides: no per-architecture table). What else differs:

- the residual stream after the last block: TransformerLens 3 stops there
  (``stop_at_layer=n_layers``), the bridge has no such stop and returns logits;
- the shared-prefix key/value cache of :class:`memloc_tl.core.forward.PrefixKV` is
  TransformerLens 3's on a HookedTransformer and Hugging Face's on the bridge, whose own
  attention (GPT-2's, Llama's) is shown the cache under the name it reads
  (:func:`_attention_reads_cache`);
- a forward that starts at a layer: TransformerLens 3 has ``start_at_layer``; the bridge's own
  ``start_at_layer`` (TransformerLens 4) still runs the earlier blocks, so :func:`final_residual`
  takes the Hugging Face model's block list down to the blocks from that layer on for the call
  and hands the residual to the first of them (:func:`skips_early_blocks` says whether it can);
- block checkpointing (:func:`checkpointed_final_residual`): TransformerLens 3's blocks are
  called one by one; on the bridge each entry of that block list is wrapped for the call.

Nothing here imports a class that one TransformerLens version lacks: ``HookedModel`` is the type
for annotations (HookedTransformer's interface, which the bridge's compatibility mode provides).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.metadata
import inspect
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from memloc_tl.core.activations import lean_activations
from memloc_tl.core.attention import lean_attention
from memloc_tl.core.selection import is_indices, selected_mask
from memloc_tl.core.validation import check_finite_weights

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer as HookedModel
else:
    HookedModel = torch.nn.Module

__all__ = [
    "Backend",
    "HookedModel",
    "Weight",
    "check_backend",
    "check_model",
    "copy_model",
    "final_residual",
    "gradients",
    "holds_positions",
    "is_bridge",
    "model_parameters",
    "parameter_masks",
    "parameters_of",
    "replaced_weights",
    "shares_prefix_cache",
    "skips_early_blocks",
    "substituted_parameters",
    "tl_major",
    "weights",
    "weights_fingerprint",
]


Backend = Literal["auto", "hooked", "bridge"]
"""How :func:`memloc_tl.load_model` wraps a model: ``"hooked"`` (TransformerLens 3's
HookedTransformer), ``"bridge"`` (TransformerBridge in compatibility mode) or ``"auto"``."""


@functools.cache
def tl_major() -> int:
    """The major version of the installed TransformerLens (3 or 4), without importing it."""
    version = importlib.metadata.version("transformer-lens")
    return int(version.split(".")[0])


def check_backend(backend: str) -> Literal["hooked", "bridge"]:
    """The backend ``"auto"`` stands for here, or a clear error for one this install lacks."""
    if backend not in ("auto", "hooked", "bridge"):
        raise ValueError(f"backend must be 'auto', 'hooked' or 'bridge', got {backend!r}")
    if backend == "auto":
        return "hooked" if tl_major() < 4 else "bridge"
    if backend == "hooked" and tl_major() >= 4:
        raise ValueError(
            "backend='hooked' needs TransformerLens 3 (HookedTransformer was removed in 4.0); "
            "use backend='bridge' or 'auto', or install 'transformer-lens>=3.9,<4'"
        )
    return backend


def is_bridge(model: Any) -> bool:
    """Whether ``model`` is a TransformerLens 4 ``TransformerBridge`` (or a subclass)."""
    return any(cls.__name__ == "TransformerBridge" for cls in type(model).__mro__)


def check_model(model: Any) -> None:
    """A clear error for anything that is not a model memloc-tl can analyze.

    Raises:
        TypeError: not a HookedTransformer or TransformerBridge.
        ValueError: a TransformerBridge outside compatibility mode (hook names and weight
            processing would differ from the paper's HookedTransformer).
    """
    if is_bridge(model):
        if not getattr(model, "compatibility_mode", False):
            raise ValueError(
                "this TransformerBridge is not in compatibility mode: call "
                "model.enable_compatibility_mode() first (memloc_tl.load_model does), so that "
                "hook names and weight processing are HookedTransformer's"
            )
    elif not any(cls.__name__ == "HookedTransformer" for cls in type(model).__mro__):
        raise TypeError(
            f"expected a TransformerLens HookedTransformer or TransformerBridge, got "
            f"{type(model).__name__}; load one with memloc_tl.load_model(...)"
        )
    _check_finite(model)


def weights_fingerprint(model: HookedModel) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes and values).

    What a resumable artefact records as "the model": two checkpoints in directories of the
    same name differ here, and so do a model and its edited copy.
    """
    from memloc_tl.core.files import tensors_sha256

    return tensors_sha256(_torch_module(model).state_dict())


_FINITE_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[int, int], ...]] = (
    weakref.WeakKeyDictionary()
)


def _check_finite(model: HookedModel) -> None:
    """Refuse a model holding NaN or infinite parameters (checked again only after a change).

    The parameters' storage and version counters (bumped by every in-place write) tell whether
    anything changed since the last check, so repeated analyses of one model pay it once.
    """
    module = _torch_module(model)
    params = list(module.named_parameters())
    state = tuple((p.data_ptr(), p._version) for _, p in params)
    if _FINITE_CHECKED.get(module) == state:
        return
    check_finite_weights(((name, p.detach()) for name, p in params), "the model")
    _FINITE_CHECKED[module] = state


def model_parameters(model: HookedModel) -> list[torch.nn.Parameter]:
    """Every parameter the model computes with (the Hugging Face ones, on the bridge)."""
    return list(_torch_module(model).parameters())


def _torch_module(model: HookedModel) -> torch.nn.Module:
    """The module whose parameters the model computes with (the Hugging Face model, on a bridge)."""
    return getattr(model, "original_model") if is_bridge(model) else model  # noqa: B009


def copy_model(model: HookedModel) -> HookedModel:
    """A deep copy of the model, sharing nothing with it.

    A bridge keeps some computed tensors (still in an autograd graph) as attributes, which
    ``copy.deepcopy`` refuses; the copy gets them detached.
    """
    memo: dict[int, Any] = {}
    if is_bridge(model):
        for module in model.modules():
            for value in vars(module).values():
                if isinstance(value, Tensor) and not value.is_leaf:
                    memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


class _StopForward(Exception):
    """Raised by a hook to end a bridge's forward pass early, carrying the activation."""

    def __init__(self, activation: Tensor) -> None:
        super().__init__("stopped after the last block")
        self.activation = activation


def final_residual(
    model: HookedModel, tokens: Tensor, *, start_at_layer: int | None = None, **kwargs: Any
) -> Tensor:
    """The residual stream after the last block, ``[batch, pos, d_model]``: no unembedding.

    A HookedTransformer stops there (``stop_at_layer=n_layers``), its plain attention modules
    masking in place (:func:`~memloc_tl.core.attention.lean_attention`: TransformerLens's
    values and hooks, fewer temporaries). On both backends, outside autograd, a ``gelu_new``
    MLP activation runs chunk by chunk in place
    (:func:`~memloc_tl.core.activations.lean_activations`, the same values). A
    TransformerBridge has no such stop, so a hook on ``blocks.{n-1}.hook_resid_post``
    (registered after any hooks in scope, so it sees their changes) ends the forward pass
    there. Either way the caller applies ``model.ln_final`` and ``model.unembed`` to the
    positions it reads only.

    With ``start_at_layer=k``, ``tokens`` is the residual stream entering block ``k`` and only
    blocks ``k..n-1`` run, on both backends (the bridge: see :func:`_blocks_from`); hooks in
    scope on blocks below ``k`` do not fire, as on a HookedTransformer.
    """
    # the same values and hooks, fewer temporaries: gelu_new chunk by chunk outside autograd
    # (TransformerLens's own function when recording, so gradients stay bit for bit)
    activations = lean_activations(model, backward=False)
    if not is_bridge(model):
        with lean_attention(model), activations:
            return model(
                tokens, start_at_layer=start_at_layer, stop_at_layer=model.cfg.n_layers, **kwargs
            )
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"

    def stop(activation: Tensor, hook: Any) -> Tensor:
        raise _StopForward(activation)

    scope: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if start_at_layer is not None:
        residual = tokens
        if residual.ndim != 3 or not residual.is_floating_point():
            raise ValueError(
                "with start_at_layer, pass the residual stream [batch, pos, d_model] entering "
                f"that layer, got a tensor of shape {tuple(residual.shape)} ({residual.dtype})"
            )
        # placeholder ids of the residual's batch and length: the embedding they feed is
        # replaced by the residual at the first block that runs
        tokens = torch.zeros(residual.shape[:2], dtype=torch.long, device=residual.device)
        kwargs.setdefault("attention_mask", torch.ones_like(tokens))
        scope = _blocks_from(model, start_at_layer, residual)
    cache = kwargs.get("past_key_values")
    before = 0 if cache is None else int(cache.get_seq_length())
    try:
        with (
            scope,
            activations,
            model.hooks(fwd_hooks=[(last, stop)]),
            _quiet_cache_rename(kwargs),
            _attention_reads_cache(model, cache is not None),
        ):
            model(tokens, **kwargs)
    except _StopForward as stopped:
        length = before + tokens.shape[1]
        if before and not holds_positions(cache, length, first_layer=start_at_layer or 0):
            # the forward computed attention over the new positions alone: wrong numbers
            raise RuntimeError(
                f"the bridge's attention ignored the key/value cache it was given ({before} "
                "positions): recompute every position (pass no past_kv_cache)"
            ) from None
        return stopped.activation
    raise RuntimeError(f"the forward pass never reached {last}")  # pragma: no cover


def holds_positions(
    cache: Any, length: int, *, first_layer: int = 0, n_layers: int | None = None
) -> bool:
    """Whether a Hugging Face cache holds ``length`` positions' keys and values at each layer
    from ``first_layer`` on (the layers a forward ran), and ``n_layers`` layers in all if given."""
    layers = list(getattr(cache, "layers", ()))
    if n_layers is not None and len(layers) != n_layers:
        return False
    return len(layers) > first_layer and all(
        getattr(layer, "keys", None) is not None and layer.keys.shape[-2] == length
        for layer in layers[first_layer:]
    )


@contextlib.contextmanager
def _attention_reads_cache(model: HookedModel, active: bool = True) -> Iterator[None]:
    """For the call: a bridge's own attention sees Hugging Face's cache under either name.

    Where TransformerLens 4 computes attention itself (``JointQKVAttentionBridge`` for GPT-2,
    ``PositionEmbeddingsAttentionBridge`` for Llama), its ``_update_kv_cache`` reads the cache
    from the keyword ``past_key_values`` (or ``layer_past``). Newer ``transformers`` hand it
    to the attention as ``cache``, which TransformerLens 4.3 does not read: the keys and values
    would be neither stored nor extended, so a forward over a cached prefix would attend to
    the new positions alone. Here each such module's ``_update_kv_cache`` is given the cache
    by its old name too, for the call only (an attribute of the instance, removed after); a
    bridge whose attention is Hugging Face's own (GPT-Neo's, Pythia's) is left as it is.
    """
    patched: list[torch.nn.Module] = []
    try:
        if active and is_bridge(model):
            for module in model.modules():
                update = getattr(module, "_update_kv_cache", None)
                if not callable(update) or "_update_kv_cache" in vars(module):
                    continue
                vars(module)["_update_kv_cache"] = functools.partial(_cache_by_old_name, update)
                patched.append(module)
        yield
    finally:
        for module in patched:
            del vars(module)["_update_kv_cache"]


def _cache_by_old_name(update: Any, keys: Tensor, values: Tensor, **kwargs: Any) -> Any:
    """``update(keys, values, **kwargs)`` with ``cache`` also passed as ``past_key_values``."""
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs["past_key_values"] = kwargs["cache"]
    return update(keys, values, **kwargs)


@contextlib.contextmanager
def _quiet_cache_rename(kwargs: Mapping[str, Any]) -> Iterator[None]:
    """Where a forward is given ``past_key_values``: without the FutureWarning newer
    ``transformers`` give for it (they rename a forward's ``past_key_values`` to ``cache``)."""
    if "past_key_values" not in kwargs:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        yield


def checkpointed_final_residual(model: HookedModel, tokens: Tensor) -> Tensor:
    """:func:`final_residual` of ``tokens``, each block under activation checkpointing.

    With gradients on, the backward pass keeps only the residual entering each block and
    recomputes one block's activations at a time (one more forward of the blocks, in exchange
    for not holding every block's attention patterns and MLP activations at once). The values
    are those of :func:`final_residual`; hooks in scope inside a block fire again when it is
    recomputed. On a HookedTransformer the blocks run as its own forward runs them (the same
    embedding, attention mask and positional inputs), with a ``gelu_new`` MLP activation that
    saves only its input (:mod:`memloc_tl.core.activations`: the same values; gradients
    equal to float rounding). On a TransformerBridge the Hugging Face
    model's own forward runs, without its key/value cache (a recompute would append to it a
    second time), each entry of its block list run under checkpointing for the call
    (:func:`_checkpointed_blocks`), with the same lean activation; a bridge whose blocks are
    not one such list keeps every block's activations.
    """
    if not torch.is_grad_enabled():
        return final_residual(model, tokens)
    if is_bridge(model):
        block_list = _hf_block_list(model)
        if block_list is None:
            return final_residual(model, tokens)
        with _checkpointed_blocks(block_list):
            return final_residual(model, tokens, use_cache=False)
    residual, _, shortformer_pos_embed, attention_mask = model.input_to_embed(tokens)
    for block in model.blocks:
        device = next(block.parameters()).device
        residual = checkpoint(
            _lean_block,
            block,
            residual.to(device),
            shortformer_pos_embed=None
            if shortformer_pos_embed is None
            else shortformer_pos_embed.to(device),
            attention_mask=attention_mask,
            use_reentrant=False,
        )
    return residual


def _lean_block(block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``block(*args, **kwargs)`` with its MLP's ``gelu_new`` saving only its input
    (:func:`~memloc_tl.core.activations.lean_activations`) and, on a HookedTransformer, its
    attention masking in place (:func:`~memloc_tl.core.attention.lean_attention`); the same
    values. Run inside the checkpointed function, so the backward pass's recompute runs it
    too."""
    with lean_activations(block), lean_attention(block):
        return block(*args, **kwargs)


class _CheckpointedBlock(torch.nn.Module):
    """A block that runs under activation checkpointing; other attributes are the block's.

    Early stop: the recompute ends once it has every tensor the backward pass needs, so a hook
    that ended the original forward inside the block (:class:`_StopForward`) and is gone by
    the backward pass changes nothing.
    """

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(
            _lean_block, self.block, *args, use_reentrant=False, early_stop=True, **kwargs
        )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


@contextlib.contextmanager
def _checkpointed_blocks(block_list: torch.nn.ModuleList) -> Iterator[None]:
    """Inside the block every entry of ``block_list`` runs under activation checkpointing
    (:class:`_CheckpointedBlock`, in its place, so each block keeps its index); the list is
    restored on exit, also after an error."""
    saved = block_list._modules
    wrapped: dict[str, torch.nn.Module] = {k: _CheckpointedBlock(b) for k, b in saved.items()}
    block_list._modules = wrapped
    try:
        yield
    finally:
        block_list._modules = saved


def _hf_block_list(model: HookedModel) -> torch.nn.ModuleList | None:
    """The Hugging Face module list whose entries are the bridge's blocks, in order, or None."""
    blocks = list(getattr(model, "blocks", ()))
    if not blocks:
        return None
    for module in _torch_module(model).modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module) == len(blocks)
            and all(a is b for a, b in zip(module, blocks, strict=True))
        ):
            return module
    return None


def _block_list(model: HookedModel) -> torch.nn.ModuleList | None:
    """The bridge's Hugging Face block list (:func:`_hf_block_list`) where a forward can start
    at a layer by cutting it, or None: no such list, or a model whose config has several
    ``layer_types`` (sliding and full attention, say: its forward picks each block's mask by
    the block's place in the list, which the cut would shift)."""
    layer_types = getattr(getattr(_torch_module(model), "config", None), "layer_types", None)
    if layer_types is not None and len(set(layer_types)) > 1:
        return None
    return _hf_block_list(model)


@contextlib.contextmanager
def _blocks_from(model: HookedModel, layer: int, residual: Tensor) -> Iterator[None]:
    """Inside the block a bridge's forward runs only blocks ``layer..n-1``, from ``residual``.

    The Hugging Face model loops over its block list (``transformer.h``, ``model.layers``, ...,
    whose entries are the bridge's blocks); for the call it holds only the blocks from
    ``layer`` on, and a forward hook on ``blocks.{layer}.hook_resid_pre``, placed before any
    hook in scope there (so those see the residual, as on a HookedTransformer), replaces what
    the embedding gave with ``residual``. The list and the hook are restored on exit, also
    after an error.
    """
    n_layers = model.cfg.n_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"start_at_layer={layer} must be in [0, {n_layers})")
    block_list = _block_list(model)
    if block_list is None:
        raise ValueError(
            "a forward cannot start at a layer on this bridge: its blocks are not one Hugging "
            "Face module list, or its config has several layer_types (each block's attention "
            "mask depends on its place in that list); run from the tokens instead "
            "(skips_early_blocks(model) says which)"
        )
    point = model.hook_dict[f"blocks.{layer}.hook_resid_pre"]

    def enter(module: torch.nn.Module, inputs: Any, output: Tensor) -> Tensor:
        if output.shape != residual.shape:
            raise ValueError(
                f"the residual entering layer {layer} has shape {tuple(residual.shape)}, "
                f"the forward {tuple(output.shape)}"
            )
        return residual.to(output.dtype)

    saved = block_list._modules
    block_list._modules = {str(i): b for i, b in enumerate(list(saved.values())[layer:])}
    handle = point.register_forward_hook(enter, prepend=True)
    try:
        yield
    finally:
        handle.remove()
        block_list._modules = saved


def shares_prefix_cache(model: HookedModel) -> bool:
    """Whether :class:`memloc_tl.core.forward.PrefixKV` works: on a HookedTransformer
    (TransformerLens 3's cache), and on a TransformerBridge whose Hugging Face model takes a
    key/value cache (``past_key_values``, or ``cache`` as newer ``transformers`` name it)."""
    if not is_bridge(model):
        return True
    forward = getattr(getattr(model, "original_model", None), "forward", None)
    try:
        parameters = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return False
    return "past_key_values" in parameters or "cache" in parameters


def skips_early_blocks(model: HookedModel) -> bool:
    """Whether ``start_at_layer=k`` really skips blocks ``0..k-1``: on a HookedTransformer, and
    on a bridge whose blocks run from one Hugging Face module list (see :func:`final_residual`)."""
    return not is_bridge(model) or _block_list(model) is not None


@dataclass(frozen=True, eq=False)
class Weight:
    """A TransformerLens-named weight and the parameter it lives in.

    On a HookedTransformer the weight is the parameter (``layout`` None). On a bridge it is a
    view of a Hugging Face parameter: ``layout`` is the view's ``(size, stride, offset)``
    within that (contiguous) parameter, so any tensor laid out like the parameter (its
    gradient, a mask) has the same view.

    Attributes:
        name: e.g. ``"blocks.1.attn.W_Q"``.
        param: the parameter autograd and optimizers see.
        param_name: its name in ``named_parameters()`` of the module that owns it.
        layout: ``None``, or ``(size, stride, offset)`` of the view.
    """

    name: str
    param: torch.nn.Parameter
    param_name: str
    layout: tuple[tuple[int, ...], tuple[int, ...], int] | None = None

    @property
    def shape(self) -> torch.Size:
        return self.param.shape if self.layout is None else torch.Size(self.layout[0])

    def of(self, tensor: Tensor) -> Tensor:
        """The weight's view of ``tensor``, a tensor shaped like ``param`` (writes go through)."""
        if self.layout is None:
            return tensor
        if tensor.shape != self.param.shape or not tensor.is_contiguous():
            raise ValueError(
                f"expected a contiguous tensor of shape {tuple(self.param.shape)} for "
                f"{self.name}, got {tuple(tensor.shape)}"
            )
        size, stride, offset = self.layout
        return tensor.as_strided(size, stride, tensor.storage_offset() + offset)

    @property
    def value(self) -> Tensor:
        """The weight itself (a view of the parameter: in-place writes reach the model)."""
        return self.of(self.param)

    def scatter(self, base: Tensor, value: Tensor) -> Tensor:
        """``base`` (shaped like ``param``) with this weight's entries replaced, differentiably."""
        if self.layout is None:
            return value
        size, stride, offset = self.layout
        return torch.as_strided_scatter(base.contiguous(), value, size, stride, offset)


def weights(model: HookedModel, names: Sequence[str]) -> dict[str, Weight]:
    """The weights ``names`` (TransformerLens names) of ``model``, each with its parameter.

    Raises:
        ValueError: a name the model does not have, a key or value matrix of grouped-query
            attention, or (bridge) a weight that is not a view of one of the model's parameters.
    """
    n_kv = getattr(model.cfg, "n_key_value_heads", None)
    if n_kv is not None and n_kv != model.cfg.n_heads:
        grouped = [name for name in names if name.endswith((".W_K", ".W_V"))]
        if grouped:
            raise ValueError(
                f"{grouped[0]}: with grouped-query attention ({model.cfg.n_heads} query heads, "
                f"{n_kv} key/value heads) W_K and W_V belong to key/value heads, not to the "
                "heads the paper's per-head analyses name; weight-level analyses (gradient maps, "
                "masks, sparse editing, injection) support models without it. The head-level "
                "analyses (attention, patching, ablation, activation gradients) work."
            )
    if not is_bridge(model):
        params = dict(model.named_parameters())
        missing = [name for name in names if name not in params]
        if missing:
            raise ValueError(f"the model has no {missing[0]}: not a standard HookedTransformer")
        return {name: Weight(name, params[name], name) for name in names}
    views: dict[str, Tensor] = getattr(model, "tl_parameters")()  # noqa: B009
    owners: dict[int, tuple[str, torch.nn.Parameter]] = {}
    for param_name, param in _torch_module(model).named_parameters():
        owners.setdefault(param.untyped_storage().data_ptr(), (param_name, param))
    found: dict[str, Weight] = {}
    for name in names:
        view = views.get(name)
        if view is None:
            raise ValueError(f"the model has no {name}: not a standard TransformerLens model")
        owner = owners.get(view.untyped_storage().data_ptr())
        if owner is None or not owner[1].is_contiguous():
            raise ValueError(
                f"{name} is not a view of one of the model's parameters (the bridge computes it), "
                "so its gradient and edits cannot reach the model; memloc-tl supports "
                "architectures whose weights the bridge exposes as views"
            )
        param_name, param = owner
        layout = (tuple(view.shape), tuple(view.stride()), int(view.storage_offset()))
        found[name] = Weight(name, param, param_name, layout)
    return found


def parameters_of(chosen: Mapping[str, Weight]) -> list[torch.nn.Parameter]:
    """The distinct parameters the weights live in (several weights may share one)."""
    return list({id(w.param): w.param for w in chosen.values()}.values())


def gradients(loss: Tensor, chosen: Mapping[str, Weight]) -> dict[str, Tensor]:
    """``d loss / d weight`` for each weight, in the weight's (TransformerLens) layout."""
    params = parameters_of(chosen)
    grads = torch.autograd.grad(loss, params)
    by_param = {id(p): g.contiguous() for p, g in zip(params, grads, strict=True)}
    return {name: w.of(by_param[id(w.param)]) for name, w in chosen.items()}


def parameter_masks(
    chosen: Mapping[str, Weight], masks: Mapping[str, Tensor]
) -> dict[torch.nn.Parameter, Tensor]:
    """Selections by parameter from selections by weight name (entries outside every weight:
    off). Each selection is a boolean mask or sorted flat indices
    (:mod:`memloc_tl.core.selection`); a parameter whose weights are all given as indices gets
    indices (into the parameter), any other a boolean mask of the parameter's shape."""
    by_param: dict[int, list[tuple[Weight, Tensor]]] = {}
    for name, mask in masks.items():
        w = chosen[name]
        by_param.setdefault(id(w.param), []).append((w, mask.to(w.param.device)))
    out: dict[torch.nn.Parameter, Tensor] = {}
    for parts in by_param.values():
        param = parts[0][0].param
        if len(parts) == 1 and parts[0][0].layout is None:
            out[param] = parts[0][1]
        elif all(is_indices(mask) for _, mask in parts):  # each view's indices, mapped
            out[param] = torch.cat([_indices_in_param(w, mask) for w, mask in parts]).sort().values
        else:
            full = torch.zeros_like(param, dtype=torch.bool)
            for w, mask in parts:
                w.of(full).copy_(selected_mask(mask, w.shape))
            out[param] = full
    return out


def _indices_in_param(w: Weight, flat: Tensor) -> Tensor:
    """Flat indices into weight ``w`` (row-major in its shape) as flat indices into its
    (contiguous) parameter."""
    if w.layout is None:
        return flat
    size, stride, offset = w.layout
    place = torch.full_like(flat, offset)
    for coordinate, step in zip(torch.unravel_index(flat, size), stride, strict=True):
        place += coordinate * step
    return place


def substituted_parameters(model: HookedModel, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Replacement parameters by ``named_parameters()`` name of the module that computes.

    ``values`` replaces weights by TransformerLens name; on the bridge each replaced parameter
    is the model's own with those entries scattered in (differentiable in the values).
    """
    chosen = weights(model, list(values))
    out: dict[str, Tensor] = {}
    for name, value in values.items():
        w = chosen[name]
        base = out.get(w.param_name, w.param)
        out[w.param_name] = w.scatter(base, value.to(w.param.dtype))
    return out


@contextlib.contextmanager
def replaced_weights(model: HookedModel, values: Mapping[str, Tensor]) -> Iterator[None]:
    """Inside the block the model computes with ``values`` (by TransformerLens name).

    Nothing is written into the model's parameters: the owning modules see the given tensors
    (still in their autograd graph) instead of their parameters, and get those back on exit,
    also after an error. (``torch.func.functional_call`` does not restore a bridge's
    parameters, so it is not used.)
    """
    module = _torch_module(model)
    saved: list[tuple[torch.nn.Module, str, torch.nn.Parameter | None]] = []
    try:
        for param_name, tensor in substituted_parameters(model, values).items():
            owner_name, _, attribute = param_name.rpartition(".")
            owner = module.get_submodule(owner_name)
            saved.append((owner, attribute, owner._parameters[attribute]))
            owner._parameters[attribute] = tensor  # pyright: ignore[reportArgumentType]
        yield
    finally:
        for owner, attribute, param in reversed(saved):
            owner._parameters[attribute] = param
