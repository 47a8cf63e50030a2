"""A HookedTransformer's attention without the temporaries of its masking, same values.

TransformerLens 3's ``AbstractAttention.forward`` masks the scores with
``torch.where(causal_mask, scores, -inf)`` and then cleans the pattern with
``torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)``: four passes over
``[batch, heads, query, key]`` and four tensors of that size made, per layer and forward, to
guard against a row whose every key is masked. :func:`lean_attention` runs, for a block of code,
a forward that does the same arithmetic with the same hooks and leaves out only those copies:

- the mask is written into the fresh scores in place (``masked_fill_``: the same ``-inf``
  (``IGNORE``) where ``torch.where`` puts it, the scores elsewhere);
- NaN in the pattern becomes 0 in place (``nan_to_num_`` with infinities kept: the values
  ``torch.where`` gives, since a softmax never returns an infinity).

With autograd recording, both run out of place (the softmax's backward needs its output), which
still saves the ``isnan`` and ``zeros_like`` tensors. Everything else is TransformerLens's own
code, called as its forward calls it: the Q/K/V projections (``calculate_qkv_matrices``, with
any QK norm), the key/value cache, rotary embeddings, the scores and their soft cap, the hooks
``hook_q`` ... ``hook_z``, ``hook_attn_scores`` and ``hook_pattern`` (which see the values they
see under TransformerLens's forward), and the output projection. Logits, caches and gradients
are bit-identical to TransformerLens's forward (tested: ``tests/core/test_attention.py``).

Only attention modules whose path is the plain one are changed, on the TransformerLens versions
this was checked on (:data:`CHECKED_VERSIONS`); the others (ALiBi, relative position bias,
attention sinks, log-n scaling, clipped Q/K/V, OLMo's norms, 4-bit weights, ``use_attn_result``,
bidirectional attention, Apple's MPS device, a subclass with its own ``forward``) keep
TransformerLens's forward. On the default organism (d_model 128) the corpus scan ran 1.10-1.39x
faster with it; at GPT-Neo 125M's width the masking is a small share of a block and the gain is
not measurable (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

import einops
import torch
import torch.nn.functional as F
from torch import Tensor

from memloc_tl.core.versions import checked_class

#: TransformerLens versions (major.minor) whose ``AbstractAttention.forward`` the lean forward
#: was checked against bit for bit; on others the model's own forward runs.
CHECKED_VERSIONS = ("3.9",)

#: Set to False to run TransformerLens's own attention forward everywhere (the benchmarks time
#: both in one run: ``benchmarks/corpus.py --compare-attention``).
ENABLED = True

_OLMO = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
_PLAIN_POSITIONS = ("standard", "shortformer", "rotary")


@functools.cache
def _abstract_attention() -> type[torch.nn.Module] | None:
    """TransformerLens's ``AbstractAttention``, where its version is one of the checked ones."""
    return checked_class(
        CHECKED_VERSIONS, "transformer_lens.components.abstract_attention", "AbstractAttention"
    )


def takes_lean_forward(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a TransformerLens attention that :func:`lean_attention` changes."""
    base = _abstract_attention()
    if base is None or not isinstance(module, base):
        return False
    if type(module).forward is not base.forward or "forward" in module.__dict__:
        return False
    cfg: Any = getattr(module, "cfg", None)
    direction = getattr(module, "_attention_dir_override", None) or cfg.attention_dir
    ignore = getattr(module, "IGNORE", None)
    return (
        direction == "causal"
        and cfg.positional_embedding_type in _PLAIN_POSITIONS
        and cfg.original_architecture not in _OLMO
        and cfg.clip_qkv is None
        and not cfg.use_logn_attn
        and not cfg.use_attention_sinks
        and not cfg.load_in_4bit
        and not cfg.use_attn_result
        and isinstance(ignore, Tensor)  # written where TransformerLens writes it, any value
        and ignore.numel() == 1
        and module.W_O.device.type != "mps"
    )


@contextlib.contextmanager
def lean_attention(model: torch.nn.Module) -> Iterator[int]:
    """Inside the block, each plain TransformerLens attention module of ``model`` (a
    HookedTransformer, a block, or any module holding them) runs the lean forward described
    above: the same values and hooks, fewer temporaries. The modules' own ``forward`` is back on
    exit, also after an error. Yields how many modules were changed (0 on a TransformerBridge,
    whose attention is Hugging Face's)."""
    changed: list[torch.nn.Module] = []
    try:
        for module in model.modules() if ENABLED else ():
            if takes_lean_forward(module):
                module.__dict__["forward"] = functools.partial(_lean_forward, module)
                changed.append(module)
        yield len(changed)
    finally:
        for module in changed:
            del module.__dict__["forward"]


def _lean_forward(
    self: Any,
    query_input: Tensor,
    key_input: Tensor,
    value_input: Tensor,
    past_kv_cache_entry: Any = None,
    additive_attention_mask: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_bias: Tensor | None = None,
) -> Tensor:
    """TransformerLens 3.9's ``AbstractAttention.forward`` on its plain path
    (:func:`takes_lean_forward`), masking in place."""
    if attention_mask is not None and attention_mask.device != query_input.device:
        # TransformerLens moves the scores to the mask's device: its own forward, untouched
        return type(self).forward(
            self, query_input, key_input, value_input, past_kv_cache_entry,
            additive_attention_mask, attention_mask, position_bias,
        )  # fmt: skip
    q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
    if past_kv_cache_entry is not None:
        offset = past_kv_cache_entry.past_keys.size(1)
        k, v = past_kv_cache_entry.append(k, v)
    else:
        offset = 0
    if self.cfg.positional_embedding_type == "rotary":
        q = self.hook_rot_q(self.apply_rotary(q, offset, attention_mask))
        k = self.hook_rot_k(self.apply_rotary(k, 0, attention_mask))  # keys: cached unrotated
    scores = self.calculate_attention_scores(q, k)  # [batch, head, query_pos, key_pos]
    query_length, key_length = scores.size(-2), scores.size(-1)
    if query_length + offset != key_length:
        raise ValueError(
            f"query length {query_length} + cached length {offset} != key length {key_length}"
        )
    keep = self._make_causal_mask(
        query_ctx_length=query_length,
        key_ctx_length=key_length,
        past_kv_pos_offset=offset,
        device=scores.device,
    )
    if attention_mask is not None:
        keep = keep & einops.rearrange(attention_mask, "batch key -> batch 1 1 key").bool()
    recording = torch.is_grad_enabled() and scores.requires_grad
    ignore = self.IGNORE.to(scores.device)
    scores = scores.masked_fill(~keep, ignore) if recording else scores.masked_fill_(~keep, ignore)
    if additive_attention_mask is not None:
        scores += additive_attention_mask  # in place, as TransformerLens adds it
    scores = self.hook_attn_scores(scores)
    pattern = F.softmax(scores, dim=-1)
    pattern = (
        pattern.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)
        if recording
        else pattern.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    )
    pattern = self.hook_pattern(pattern)  # [batch, head, query_pos, key_pos]
    pattern = pattern.to(device=v.device, dtype=v.dtype)
    z = self.calculate_z_scores(v, pattern)  # [batch, pos, head, d_head]
    w = einops.rearrange(self.W_O, "head d_head d_model -> d_model (head d_head)").contiguous()
    b_o: Tensor = self.b_O
    if w.device != z.device:
        w = w.to(z.device)
    if b_o.device != z.device:
        b_o = b_o.to(z.device)
    if z.dtype != w.dtype:
        z = z.to(w.dtype)
    z = z.reshape(z.shape[0], z.shape[1], self.cfg.d_head * self.cfg.n_heads)
    return F.linear(z, w, b_o)
