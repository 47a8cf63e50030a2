"""Hook names and hook factories. Hooks are registered only inside ``model.hooks(...)`` scopes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.utilities.components_utils import get_act_name  # TransformerLens 3 and 4


def hook_name(kind: str, layer: int) -> str:
    """TransformerLens hook name: ``hook_name("pattern", 1) == "blocks.1.attn.hook_pattern"``."""
    if layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")
    return get_act_name(kind, layer)


def has_hooks(model: Any, name: str) -> bool:
    """Whether a forward hook is registered on the hook point ``name`` (e.g. in a scope)."""
    point = model.hook_dict.get(name)
    return point is not None and bool(point._forward_hooks)


def position_mask(n_pos: int, positions: Tensor | None, device: torch.device | str) -> Tensor:
    """Boolean ``[n_pos]``: the chosen positions, or all when ``positions`` is None."""
    mask = torch.zeros(n_pos, dtype=torch.bool, device=device)
    if positions is None:
        mask[:] = True
    else:
        mask[positions.to(device)] = True
    return mask


def make_head_replace_hook(
    heads: Sequence[int],
    replacement: Float[Tensor, "*batch pos head_index d_head"],
    positions: Tensor | None = None,
) -> Callable[[Tensor, Any], Tensor]:
    """A ``hook_z`` hook that replaces the chosen heads' outputs at the chosen positions.

    ``replacement`` is the source run's ``hook_z`` (patching), zeros (zero ablation) or a mean
    over reference paragraphs (mean ablation, broadcast over the batch). A new tensor is
    returned; the activation is never written in place.
    """
    head_index = torch.as_tensor(list(heads), dtype=torch.long)

    def replace_heads(z: Tensor, hook: Any) -> Tensor:
        select = torch.zeros(z.shape[-2], dtype=torch.bool, device=z.device)
        select[head_index.to(z.device)] = True
        where = position_mask(z.shape[1], positions, z.device)[:, None] & select[None, :]
        return torch.where(where[..., None], replacement.to(z.device, z.dtype), z)

    return replace_heads


def make_each_head_replace_hook(
    replacement: Float[Tensor, "*batch pos head_index d_head"],
    positions: Tensor | None = None,
) -> Callable[[Tensor, Any], Tensor]:
    """A ``hook_z`` hook for ``n_heads`` stacked copies of a batch: copy h has head h replaced.

    The batch dimension of the activation is ``n_heads * batch`` (copy-major), as built by
    ``tokens.repeat(n_heads, 1)``; this is how a patching sweep runs every head at once.
    """

    def replace_each_head(z: Tensor, hook: Any) -> Tensor:
        n_heads = z.shape[-2]
        copies = z.view(n_heads, -1, *z.shape[1:])
        own_head = torch.eye(n_heads, dtype=torch.bool, device=z.device)[:, None, None, :, None]
        chosen = position_mask(z.shape[1], positions, z.device)[None, None, :, None, None]
        replaced = torch.where(own_head & chosen, replacement.to(z.device, z.dtype), copies)
        return replaced.view_as(z)

    return replace_each_head


def make_store_hook(store: dict[str, Tensor]) -> Callable[[Tensor, Any], Tensor]:
    """A hook that keeps the activation itself (still in the autograd graph) under its name.

    It returns the activation, so that the kept tensor is the one the rest of the forward uses:
    a TransformerBridge's ``hook_q/k/v/z`` see reshaped copies, which a hook returning None
    would leave outside the graph (their gradients would then not exist).
    """

    def keep_activation(activation: Tensor, hook: Any) -> Tensor:
        store[hook.name] = activation
        return activation

    return keep_activation


def make_graph_start_hook() -> Callable[[Tensor, Any], Tensor]:
    """A hook on an embedding that makes it a leaf requiring grad (the same values).

    Gradients then reach every later activation even when no parameter requires grad.
    """

    def start_graph(embedding: Tensor, hook: Any) -> Tensor:
        return embedding.detach().requires_grad_(True)

    return start_graph


def make_unit_scale_hook(scale: Tensor) -> Callable[[Tensor, Any], Tensor]:
    """A ``hook_z`` or ``hook_post`` hook that multiplies each head's or neuron's output.

    ``scale`` is ``[n_units]`` (every row alike) or ``[batch, n_units]`` (one scale per row,
    e.g. stacked variants that each silence another unit); ``n_units`` is ``n_heads`` on
    ``hook_z`` and ``d_mlp`` on ``hook_post``. Differentiable in ``scale`` (gates, integrated
    gradients); a new tensor is returned.
    """

    def scale_units(activation: Tensor, hook: Any) -> Tensor:
        factor = scale.to(activation.device, activation.dtype)
        if factor.ndim == 2:  # per row: insert the position axis
            factor = factor[:, None]
        if activation.ndim == 4:  # hook_z: [batch, pos, head_index, d_head]
            factor = factor[..., None]
        return activation * factor

    return scale_units
