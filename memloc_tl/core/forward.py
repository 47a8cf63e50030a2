"""The teacher-forced kernel: continuation logits, scores, EM length, layer starts, prefix keys
and values, greedy decoding.

Every analysis and edit reads the model through these. A paragraph's exact-match length (EM)
comes from one teacher-forced pass, with no generation: up to the first mismatch, greedy
decoding sees exactly the reference context, so the EM equals the leading run of continuation
positions where the teacher-forced argmax equals the reference token (tests prove this against
real greedy generation). :mod:`memloc_tl.memorization` builds the scan on top.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformer_lens import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from memloc_tl.core.backend import (
    HookedModel,
    checkpointed_final_residual,
    final_residual,
    holds_positions,
    is_bridge,
    replaced_weights,
    skips_early_blocks,
)
from memloc_tl.core.hooks import has_hooks, hook_name
from memloc_tl.core.unembedding import unembed

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32

CPU_FORWARD_TOKENS = 3200
"""Tokens (rows x positions) one teacher-forced scan forward takes at once on a CPU. Past
about this many, TransformerLens's forward runs slower per window there: its ``[batch, heads,
pos, pos]`` attention tensors and ``[batch, pos, d_mlp]`` activations leave the cache. Measured
with 100-token windows on 2 CPU cores, a bare forward ran faster per window in rows of 16-32
than in larger ones: 2.5x faster than in rows of 512 on the organism, 1.3x faster than in rows
of 128 on GPT-Neo 125M's layout. A GPU takes the batch as given."""


CPU_ACTIVATION_BYTES = 32 * 2**20
"""The largest activation (one ``[rows, pos, d_mlp]`` MLP tensor, or ``[rows, heads, pos, pos]``
attention scores) one forward makes at once on a CPU: 32 MiB, the largest block glibc's
``malloc`` hands out again after it is freed (its mmap threshold grows to at most that). A
larger tensor is mapped fresh by every allocation and its pages faulted in as it is first
written, which a forward pays for each of its temporaries: on GPT-Neo 125M's layout (2 CPU
cores), 48 rows of 100 tokens ran 1.2x slower per row than 32, and 1.2x faster once glibc was
told to keep such blocks (``MALLOC_MMAP_THRESHOLD_``), while 16-32 rows ran alike."""


def on_cpu(model: HookedModel) -> bool:
    """Whether ``model`` runs on the CPU (a ``cfg.device`` of None means the CPU): the one test
    behind every CPU-only budget and default."""
    return torch.device(model.cfg.device or "cpu").type == "cpu"


def forward_rows(model: HookedModel, batch_size: int, seq_len: int) -> int:
    """Rows per teacher-forced forward for a batch of ``batch_size`` windows of ``seq_len``
    tokens: the batch, but on a CPU at most :data:`CPU_FORWARD_TOKENS` tokens and rows whose
    largest activation fits :data:`CPU_ACTIVATION_BYTES` (and at least 1 row)."""
    if not on_cpu(model):
        return batch_size
    return max(1, min(batch_size, CPU_FORWARD_TOKENS // max(seq_len, 1), cpu_rows(model, seq_len)))


def cpu_rows(model: HookedModel, seq_len: int) -> int:
    """How many rows of ``seq_len`` tokens keep a forward's largest activation (an MLP's
    ``[rows, pos, d_mlp]`` or the attention's ``[rows, heads, pos, pos]``, in the model's
    dtype) within :data:`CPU_ACTIVATION_BYTES`; at least 1."""
    cfg = model.cfg
    width = max(int(getattr(cfg, "d_mlp", None) or 4 * cfg.d_model), cfg.n_heads * seq_len)
    itemsize = torch.empty((), dtype=getattr(cfg, "dtype", None) or torch.float32).element_size()
    return max(1, CPU_ACTIVATION_BYTES // (max(seq_len, 1) * width * itemsize))


def check_tokens(model: HookedModel, tokens: Tensor, prefix_len: int) -> None:
    """``tokens`` is a 2-D id tensor in the model's vocabulary, longer than ``prefix_len``."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, pos], got {tuple(tokens.shape)}")
    if not 0 < prefix_len < tokens.shape[1]:
        raise ValueError(f"prefix_len={prefix_len} must be inside windows of {tokens.shape[1]}")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(
            f"windows of {tokens.shape[1]} tokens exceed the model's context of {model.cfg.n_ctx}"
        )


def continuation_logits(
    model: HookedModel,
    tokens: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
    prefix_len: int,
    *,
    start_at_layer: int | None = None,
    weights: Mapping[str, Tensor] | None = None,
    past_kv_cache: Any = None,
) -> Float[Tensor, "batch continuation_pos d_vocab"]:
    """Logits (float32) at the positions that predict the continuation, teacher-forced.

    Position ``prefix_len - 1 + i`` predicts continuation token ``i``. Only those positions
    pass through ``ln_final`` and the unembedding, so this costs less than a full forward.
    Hooks in scope (``model.hooks(...)``) apply, which is how analyzers patch this pass.

    Args:
        model: the model.
        tokens: token ids, or with ``start_at_layer`` the residual stream entering that layer.
        prefix_len: prefix length.
        start_at_layer: run only the blocks from this layer on (TransformerLens semantics).
        weights: parameters to use instead of the model's own for this call, by name (e.g.
            ``{"blocks.0.attn.W_V": gated}``; see :func:`memloc_tl.core.backend.replaced_weights`);
            the model is not changed.
        past_kv_cache: the keys and values of the first ``m`` positions of ``tokens``
            (``m < prefix_len``): :meth:`PrefixKV.cache`, a frozen TransformerLens cache on a
            HookedTransformer or an :class:`HFPrefix` on a TransformerBridge; only positions
            ``m`` onwards are computed. With ``start_at_layer``, ``tokens`` is the residual
            stream of every position and the cache's layers from ``start_at_layer`` on are
            read.
    """
    tokens, kwargs = _forward_arguments(
        model, tokens, prefix_len, start_at_layer, weights, past_kv_cache
    )
    # all positions in one chunk: the logits come back as they are, with no copy
    [logits] = _over_continuation(
        model, tokens, prefix_len, lambda logits, positions: logits, None, weights, kwargs
    )
    return logits


def _forward_arguments(
    model: HookedModel,
    tokens: Tensor,
    prefix_len: int,
    start_at_layer: int | None,
    weights: Mapping[str, Tensor] | None,
    past_kv_cache: Any,
) -> tuple[Tensor, dict[str, Any]]:
    """The input and keyword arguments of the blocks' forward (see continuation_logits)."""
    # The forward stops at the residual after the last block (backend.final_residual), so that
    # only the continuation positions pass through ln_final and the unembedding.
    kwargs: dict[str, Any] = {"start_at_layer": start_at_layer}
    if past_kv_cache is None:
        return tokens, kwargs
    if weights is not None:
        raise ValueError("past_kv_cache cannot be combined with weights")
    hugging_face = isinstance(past_kv_cache, HFPrefix) or callable(
        getattr(past_kv_cache, "get_seq_length", None)  # a Hugging Face cache (a recorder)
    )
    if not hugging_face and not isinstance(past_kv_cache, TransformerLensKeyValueCache):
        raise TypeError(
            "past_kv_cache must be a key/value cache (PrefixKV.cache makes one), got "
            f"{type(past_kv_cache).__name__}"
        )
    if hugging_face != is_bridge(model):
        raise ValueError(
            "past_kv_cache must be the model's own kind of cache: TransformerLens 3's on a "
            "HookedTransformer, Hugging Face's on a TransformerBridge (PrefixKV.cache makes "
            f"the right one), got {type(past_kv_cache).__name__} for a {type(model).__name__}"
        )
    skipped = cached_length(past_kv_cache)
    if not 0 <= skipped < prefix_len:
        raise ValueError(f"the cache holds {skipped} positions; it must hold < {prefix_len}")
    tokens = tokens[:, skipped:]
    if hugging_face:
        # Hugging Face's caches grow with every forward given them: each forward reads a
        # fresh one (a recorder, still empty, is filled by its forward), over the mask of the
        # cached positions and the new ones
        fresh = past_kv_cache.fresh() if isinstance(past_kv_cache, HFPrefix) else past_kv_cache
        kwargs.update(past_key_values=fresh, use_cache=True)
        kwargs["attention_mask"] = torch.ones(
            len(tokens), skipped + tokens.shape[1], dtype=torch.long, device=tokens.device
        )
        return tokens, kwargs
    kwargs["past_kv_cache"] = past_kv_cache
    if start_at_layer is None:
        # An explicit all-ones mask: TransformerLens would otherwise guess padding from the
        # tokenizer's pad token, which may occur in real text. (From a residual stream it
        # guesses nothing: the blocks apply the causal mask over the cache and the rest.)
        kwargs["attention_mask"] = torch.ones_like(tokens, device=model.cfg.device)
    return tokens, kwargs


def holds(cache: Any, n_layers: int, length: int) -> bool:
    """Whether a recorder (:meth:`PrefixKV.recorder`) holds ``length`` positions' keys and
    values for each of ``n_layers`` layers after a forward: always for TransformerLens's
    cache; for Hugging Face's only where the bridge's attention wrote it."""
    if isinstance(cache, TransformerLensKeyValueCache):
        return True
    return holds_positions(cache, length, n_layers=n_layers)


def cached_length(cache: Any) -> int:
    """Positions a key/value cache holds: TransformerLens 3's, Hugging Face's, or an
    :class:`HFPrefix`."""
    if isinstance(cache, TransformerLensKeyValueCache):
        return int(cache.entries[0].past_keys.shape[1]) if cache.entries else 0
    if isinstance(cache, HFPrefix):
        return cache.length
    return int(cache.get_seq_length())


def _unembed_without_copy(model: HookedModel, normalized: Tensor) -> Tensor:
    """``model.unembed(normalized)``, on a HookedTransformer without the copy of ``W_U`` that
    its forward makes at every call (TransformerLens 3.9 multiplies by ``W_U.T.contiguous()``:
    a vocabulary-sized matrix, a quarter of GPT-Neo 125M, allocated per chunk of positions and
    again when the backward pass recomputes it). The hooks on ``unembed.hook_in`` and
    ``unembed.hook_out`` fire as there; the logits equal its logits to float rounding (another
    matmul layout), and gradients flow to ``W_U``. A bridge's unembedding (Hugging Face's)
    makes no copy and runs as it is."""
    module = model.unembed
    if is_bridge(model) or not all(hasattr(module, a) for a in ("W_U", "b_U", "hook_in")):
        return module(normalized)
    logits = torch.nn.functional.linear(module.hook_in(normalized), module.W_U.T, module.b_U)
    return module.hook_out(logits)


def continuation_residual(
    model: HookedModel, tokens: Int[Tensor, "batch pos"], prefix_len: int
) -> Float[Tensor, "batch continuation_pos d_model"]:
    """The residual stream after the last block at the positions that predict the
    continuation, no grad: what :func:`continuation_logits` unembeds, ``d_model`` floats per
    position instead of ``d_vocab`` (finish it with :func:`head_logprobs`)."""
    with torch.no_grad():
        return final_residual(model, tokens.to(model.cfg.device))[:, prefix_len - 1 : -1]


def head_logprobs(
    model: HookedModel, residual: Float[Tensor, "batch pos d_model"]
) -> Float[Tensor, "batch pos d_vocab"]:
    """Log-probabilities (float32) from the residual after the last block: ``ln_final``, the
    unembedding (without TransformerLens 3.9's copy of ``W_U``) and a log-softmax."""
    return _unembed_without_copy(model, model.ln_final(residual)).float().log_softmax(-1)


def _over_continuation(
    model: HookedModel,
    tokens: Tensor,
    prefix_len: int,
    head: Callable[[Tensor, slice], Any],
    chunk: int | None,
    weights: Mapping[str, Tensor] | None,
    kwargs: dict[str, Any],
    checkpointed: bool = False,
    checkpoint_blocks: bool = False,
) -> list[Any]:
    """``head(logits, positions)`` on the float32 logits of every ``chunk`` continuation
    positions (all at once for ``None``), after one forward of the blocks (``kwargs``: what
    :func:`continuation_logits` passes to it; a cache's positions are not among ``tokens``).

    ``checkpointed``: with gradients on, ``ln_final``, the unembedding and ``head`` run under
    activation checkpointing, so the backward pass recomputes one chunk at a time instead of
    keeping every chunk's vocabulary-sized tensors. ``checkpoint_blocks``: the blocks too
    (:func:`~memloc_tl.core.backend.checkpointed_final_residual`; ``kwargs`` must be empty).
    """
    if (checkpointed or checkpoint_blocks) and weights is not None:  # a recompute would miss them
        raise ValueError("a checkpointed pass cannot use replaced weights")
    cache = kwargs.get("past_kv_cache", kwargs.get("past_key_values"))
    skipped = 0 if cache is None else cached_length(cache)  # before the forward extends it

    project = _unembed_without_copy if checkpointed else unembed

    def piece(residual: Tensor, positions: slice) -> Any:
        return head(project(model, model.ln_final(residual)).float(), positions)

    # with ``weights``: the same forward with some parameters replaced for this call only
    scope = contextlib.nullcontext() if weights is None else replaced_weights(model, weights)
    with scope:
        tokens = tokens.to(model.cfg.device)
        if checkpoint_blocks:
            if kwargs:
                raise ValueError(f"a block-checkpointed pass takes no {sorted(kwargs)}")
            output = checkpointed_final_residual(model, tokens)
        else:
            output = final_residual(model, tokens, **kwargs)
        output = output[:, prefix_len - 1 - skipped : -1]
        size = max(output.shape[1] if chunk is None else chunk, 1)
        pieces = []
        for first in range(0, output.shape[1], size):
            positions = slice(first, first + size)
            if checkpointed and torch.is_grad_enabled():
                pieces.append(
                    checkpoint(piece, output[:, positions], positions, use_reentrant=False)
                )
            else:
                pieces.append(piece(output[:, positions], positions))
        return pieces


POSITION_CHUNK = 10
"""Continuation positions whose ``[batch, positions, d_vocab]`` logits a differentiable
objective holds at once (see :func:`per_position_loss`)."""


def per_position_loss(
    model: HookedModel,
    tokens: Tensor,
    prefix_len: int,
    loss: Callable[[Float[Tensor, "batch chunk d_vocab"], slice], Float[Tensor, "batch chunk"]],
    *,
    checkpoint_blocks: bool = False,
) -> Float[Tensor, "batch continuation_pos"]:
    """``loss(logits, positions)`` at every continuation position, a few positions at a time.

    The blocks run once; ``ln_final``, the unembedding and ``loss`` run on chunks of
    :data:`POSITION_CHUNK` positions under activation checkpointing when gradients are on, so
    the backward pass recomputes one chunk's vocabulary-sized tensors at a time instead of
    keeping every chunk's (with a 50,257-token vocabulary those tensors are a large share of
    a backward pass's memory). The values are those of one pass over all positions.

    Args:
        model: the model.
        tokens: ``[batch, pos]`` token ids.
        prefix_len: prefix length; continuation position ``i`` is predicted at
            ``prefix_len - 1 + i``.
        loss: maps the float32 logits of a chunk and the chunk's continuation positions (a
            slice) to a ``[batch, chunk]`` loss.
        checkpoint_blocks: with gradients on, also run each block under activation
            checkpointing (:func:`~memloc_tl.core.backend.checkpointed_final_residual`): the
            backward pass then holds one block's activations at a time, for one more forward
            of the blocks. Same values.
    """
    kwargs: dict[str, Any] = {}
    pieces = _over_continuation(
        model,
        tokens,
        prefix_len,
        loss,
        POSITION_CHUNK,
        None,
        kwargs,
        checkpointed=True,
        checkpoint_blocks=checkpoint_blocks,
    )
    return torch.cat(pieces, dim=1)


@dataclass(frozen=True)
class PrefixKV:
    """Every layer's keys and values for a batch of token windows, to share among variants.

    A variant that differs from its window only from position ``m`` on has the same keys and
    values at positions ``< m`` (attention is causal), so those need not be computed again:
    :meth:`cache` hands them to the next forwards, as a frozen ``past_kv_cache`` of
    TransformerLens 3 on a HookedTransformer or, on a TransformerBridge, as Hugging Face's
    cache (:class:`HFPrefix`). This is what makes prefix perturbation cheaper than one full
    forward per variant, and a patching sweep from PMPs cheaper than recomputing every position.

    Attributes:
        keys: per layer, ``[batch, pos, n_key_value_heads, d_head]``.
        values: per layer, the same shape.
        hugging_face: recorded by a bridge's Hugging Face model (its caches are Hugging Face's).
    """

    keys: tuple[Float[Tensor, "batch pos kv_head d_head"], ...]
    values: tuple[Float[Tensor, "batch pos kv_head d_head"], ...]
    hugging_face: bool = False

    @classmethod
    @torch.no_grad()
    def build(cls, model: HookedModel, tokens: Int[Tensor, "batch pos"]) -> PrefixKV:
        """One forward pass over ``tokens`` (no unembedding) that records the keys and values."""
        shared = cls.try_build(model, tokens)
        if shared is None:
            raise ValueError(
                "this bridge's forward does not fill a Hugging Face key/value cache (for "
                f"{type(getattr(model, 'original_model', model)).__name__}), so no keys and "
                "values can be shared; recompute every position "
                "(PerturbConfig(shared_prefix=False))"
            )
        return shared

    @classmethod
    @torch.no_grad()
    def try_build(cls, model: HookedModel, tokens: Int[Tensor, "batch pos"]) -> PrefixKV | None:
        """:meth:`build`, or None where the forward left the cache unfilled (a bridge whose
        attention writes no Hugging Face cache; GPT-2's and Llama's under TransformerLens 4.3
        do, shown it by the name they read: see the backend's ``_attention_reads_cache``)."""
        tokens = tokens.to(model.cfg.device)
        cache = cls.recorder(model, len(tokens))
        # the blocks' forward with the recorder, as every scoring forward passes a cache
        inputs, kwargs = _forward_arguments(model, tokens, tokens.shape[1], None, None, cache)
        final_residual(model, inputs, **kwargs)
        return cls.from_cache(cache) if holds(cache, model.cfg.n_layers, tokens.shape[1]) else None

    @staticmethod
    def recorder(model: HookedModel, batch: int) -> Any:
        """An empty cache for ``batch`` windows, which a forward given it fills with every
        position's keys and values (then :meth:`from_cache`): TransformerLens 3's on a
        HookedTransformer, a Hugging Face ``DynamicCache`` on a TransformerBridge."""
        if is_bridge(model):
            from transformers import DynamicCache

            return DynamicCache()
        return TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)

    @classmethod
    def from_cache(cls, cache: Any) -> PrefixKV:
        """The keys and values a forward recorded in ``cache`` (see :meth:`recorder`)."""
        if isinstance(cache, TransformerLensKeyValueCache):
            return cls(
                keys=tuple(entry.past_keys for entry in cache.entries),
                values=tuple(entry.past_values for entry in cache.entries),
            )
        # Hugging Face's layers hold [batch, kv_head, pos, d_head]
        return cls(
            keys=tuple(layer.keys.transpose(1, 2) for layer in cache.layers),
            values=tuple(layer.values.transpose(1, 2) for layer in cache.layers),
            hugging_face=True,
        )

    def cache(self, rows: Int[Tensor, " batch"], length: int) -> Any:
        """The first ``length`` positions of the windows ``rows``, as the model's cache: a
        frozen TransformerLens cache, or an :class:`HFPrefix` (each forward reads a fresh
        Hugging Face cache of it)."""
        if self.hugging_face:
            return HFPrefix(
                keys=tuple(k[rows.to(k.device), :length].transpose(1, 2) for k in self.keys),
                values=tuple(v[rows.to(v.device), :length].transpose(1, 2) for v in self.values),
            )
        cache = TransformerLensKeyValueCache(
            entries=[],
            previous_attention_mask=torch.ones(
                len(rows), length, dtype=torch.int, device=self.keys[0].device
            ),
        )
        for keys, values in zip(self.keys, self.values, strict=True):
            entry = TransformerLensKeyValueCacheEntry(
                past_keys=keys[rows.to(keys.device), :length],
                past_values=values[rows.to(values.device), :length],
            )
            cache.entries.append(entry)
        cache.freeze()
        return cache


@dataclass(frozen=True)
class HFPrefix:
    """The first positions' keys and values of some windows, for a TransformerBridge.

    Hugging Face's caches grow with every forward given them, so this one is not handed over
    itself: each forward given it (``past_kv_cache=`` of :func:`continuation_logits` and
    :func:`score_continuations`) reads a fresh ``DynamicCache`` of it (:meth:`fresh`), which
    that forward then extends; the tensors here are never written.

    Attributes:
        keys: per layer, ``[batch, kv_head, pos, d_head]`` (Hugging Face's layout).
        values: per layer, the same shape.
    """

    keys: tuple[Float[Tensor, "batch kv_head pos d_head"], ...]
    values: tuple[Float[Tensor, "batch kv_head pos d_head"], ...]

    @property
    def length(self) -> int:
        """Positions held."""
        return int(self.keys[0].shape[2])

    def fresh(self) -> Any:
        """A new Hugging Face ``DynamicCache`` holding these keys and values."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
            cache.update(keys, values, layer)
        return cache


def continuation_logprobs(
    model: HookedModel,
    tokens: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
    prefix_len: int,
    *,
    start_at_layer: int | None = None,
) -> Float[Tensor, "batch continuation_pos d_vocab"]:
    """Log-probabilities at the continuation-predicting positions (see continuation_logits)."""
    logits = continuation_logits(model, tokens, prefix_len, start_at_layer=start_at_layer)
    return logits.log_softmax(dim=-1)


def score_continuations(
    model: HookedModel,
    tokens: Int[Tensor, "batch pos"],
    prefix_len: int,
    *,
    residual: Float[Tensor, "batch pos d_model"] | None = None,
    start_at_layer: int | None = None,
    weights: Mapping[str, Tensor] | None = None,
    past_kv_cache: Any = None,
) -> tuple[Bool[Tensor, "batch continuation_pos"], Float[Tensor, "batch continuation_pos"]]:
    """Teacher-forced greedy matches and per-token NLL of the continuation, one batch.

    Args:
        model: the model.
        tokens: the paragraphs' token ids (the reference continuation comes from them).
        prefix_len: prefix length.
        residual: optional residual stream entering ``start_at_layer`` (then only the blocks
            from that layer on run); its rows pair with ``tokens``.
        start_at_layer: see ``residual``.
        weights: parameters to use instead of the model's own (see continuation_logits).
        past_kv_cache: keys and values of the first positions of ``tokens`` (see
            continuation_logits and :class:`PrefixKV`); only the later positions run.

    Returns:
        ``(greedy_match, token_nll)``: whether the argmax at each continuation position equals
        the reference token, and ``-log p(reference token)``; both on the model's device.
    """
    check_tokens(model, tokens, prefix_len)
    if (residual is None) != (start_at_layer is None):
        raise ValueError("residual and start_at_layer go together")
    tokens = tokens.to(model.cfg.device)
    source = tokens if residual is None else residual
    target = tokens[:, prefix_len:]
    source, kwargs = _forward_arguments(
        model, source, prefix_len, start_at_layer, weights, past_kv_cache
    )
    # The logits are this call's own unless a hook in scope saw them leave the unembedding.
    private = not has_hooks(model, "unembed.hook_out")
    pieces = _over_continuation(
        model,
        source,
        prefix_len,
        lambda logits, positions: scores_from_logits(
            logits, target[:, positions], overwrite=private
        ),
        scoring_chunk(model, len(target), target.shape[1]),
        weights,
        kwargs,
    )
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat([m for m, _ in pieces], 1), torch.cat([n for _, n in pieces], 1)


def scoring_chunk(model: HookedModel, rows: int, positions: int) -> int | None:
    """Continuation positions whose float32 logits a scoring forward makes at once: on a CPU
    as many as keep ``[rows, chunk, d_vocab]`` within :data:`CPU_ACTIVATION_BYTES`, else all
    (None). A larger tensor is mapped afresh and page-faulted in at every forward: on GPT-Neo
    125M's layout, 27 rows x 50 positions of logits are 271 MB, whose first writes a profile put
    at 10% of a CPU scan forward; chunks of 6 positions made the scan 1.02x faster and its
    logits 32 MB (docs/benchmarks.md). All at once where a hook in scope reads ``ln_final`` or the
    unembedding (it sees what it would see without the chunks). The scores are the same bit
    for bit: each position's row of the product does not depend on the others (tested)."""
    if not on_cpu(model) or any(
        has_hooks(model, name)
        for name in model.hook_dict
        if name.startswith(("ln_final.", "unembed."))
    ):
        return None
    per_position = max(rows, 1) * model.cfg.d_vocab * 4  # float32 logits
    chunk = max(1, CPU_ACTIVATION_BYTES // per_position)
    return None if chunk >= positions else chunk


def scores_from_logits(
    logits: Float[Tensor, "batch continuation_pos d_vocab"],
    target: Int[Tensor, "batch continuation_pos"],
    *,
    overwrite: bool = False,
) -> tuple[Bool[Tensor, "batch continuation_pos"], Float[Tensor, "batch continuation_pos"]]:
    """``(greedy_match, token_nll)`` of continuation logits against the reference tokens.

    ``overwrite=True`` uses ``logits`` as scratch space (it is left holding
    ``exp(logit - max)``), for a caller that does not read them again: no second
    vocabulary-sized tensor is allocated (about 6% of a scan's time on a CPU). It is ignored
    where ``logits`` takes part in a gradient.
    """
    # One pass finds each position's largest logit and its (first) index, the argmax; the
    # NLL is logsumexp - target logit, with the logsumexp shifted by that largest logit.
    chosen = logits.gather(-1, target[..., None]).squeeze(-1)
    largest, argmax = logits.max(dim=-1)
    if overwrite and not (logits.requires_grad and torch.is_grad_enabled()):
        shifted = logits.sub_(largest[..., None])
    else:
        shifted = logits - largest[..., None]
    token_nll = largest + shifted.exp_().sum(dim=-1).log_() - chosen
    return argmax == target, token_nll


@dataclass(frozen=True)
class LayerStarts:
    """One unpatched forward of a batch, kept for variants of it that differ only from layer
    ``l`` on (a sweep): the batch's own scores, the residual stream entering every layer, and
    with ``keys_values`` every position's keys and values.

    Call it as ``starts(layer, copies)`` for the keyword arguments of
    :func:`score_continuations` that run ``copies`` stacked copies of the batch from ``layer``
    on. Where ``start_at_layer`` cannot skip the earlier blocks, no residual is kept and the
    variants run from the tokens: the same numbers, without the saving.

    Attributes:
        greedy_match: the batch's teacher-forced matches, ``[batch, continuation_pos]``.
        token_nll: its per-token NLL, ``[batch, continuation_pos]``.
        residuals: per layer, ``[batch, pos, d_model]`` entering it; empty when not kept.
        prefix: the keys and values of every position (``keys_values=True``), else None.
    """

    greedy_match: Bool[Tensor, "batch continuation_pos"]
    token_nll: Float[Tensor, "batch continuation_pos"]
    residuals: tuple[Float[Tensor, "batch pos d_model"], ...]
    prefix: PrefixKV | None

    def __call__(self, layer: int, copies: int) -> dict[str, Any]:
        if not self.residuals:
            return {}
        return {"residual": self.residuals[layer].repeat(copies, 1, 1), "start_at_layer": layer}


def layer_starts(
    model: HookedModel,
    tokens: Int[Tensor, "batch pos"],
    prefix_len: int,
    *,
    keys_values: bool = False,
) -> LayerStarts:
    """Score ``tokens`` and keep what variants from each layer on reuse, in one forward.

    Args:
        model: the model.
        tokens: the batch, ``[batch, pos]``.
        prefix_len: prefix length (for the scores).
        keys_values: keep every position's keys and values too (a :class:`PrefixKV`, see
            :func:`~memloc_tl.core.backend.shares_prefix_cache`); ``prefix`` is None where a
            bridge's forward left Hugging Face's cache unfilled (:func:`holds`).
    """
    names = (
        [hook_name("resid_pre", layer) for layer in range(model.cfg.n_layers)]
        if skips_early_blocks(model)
        else []
    )
    tokens = tokens.to(model.cfg.device)
    cache = PrefixKV.recorder(model, len(tokens)) if keys_values else None
    kept: list[Tensor] = []  # in layer order (a bridge's hook may carry another name)

    def keep(activation: Tensor, hook: Any) -> Tensor:
        kept.append(activation)
        return activation

    with model.hooks(fwd_hooks=[(name, keep) for name in names]):
        match, token_nll = score_continuations(model, tokens, prefix_len, past_kv_cache=cache)
    if len(kept) != len(names):  # pragma: no cover - a backend that skipped a hook point
        raise RuntimeError(f"kept {len(kept)} of {len(names)} layers' residual streams")
    filled = cache is not None and holds(cache, model.cfg.n_layers, tokens.shape[1])
    prefix = PrefixKV.from_cache(cache) if filled else None  # None: a bridge left it unfilled
    return LayerStarts(match, token_nll, tuple(kept), prefix)


def exact_match_length(
    greedy_match: Bool[Tensor, "batch continuation_pos"],
) -> Int[Tensor, " batch"]:
    """Length of the leading run of matches: the EM until the first mismatch."""
    return greedy_match.long().cumprod(dim=-1).sum(dim=-1)


def greedy_continuations(
    model: HookedModel,
    prefixes: Int[Tensor, "batch prefix_pos"],
    n_tokens: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> Int[Tensor, "batch n_tokens"]:
    """Greedy decoding with TransformerLens ``generate`` and the KV cache (the paper's way).

    Needed only to *create* text (the model's own continuation, perturbed paragraphs); to
    measure EM use :func:`scan_memorization`, which needs no generation. On a TransformerBridge
    the steps are memloc's own forwards over a Hugging Face key/value cache (the bridge's
    ``generate`` disagreed with ``transformers``' greedy decoding on GPT-2 and Llama
    checkpoints, whose attention under TransformerLens 4.3 misses the cache newer
    ``transformers`` hand it, and left hooks behind).
    """
    if prefixes.ndim != 2:
        raise ValueError(f"prefixes must have shape [batch, pos], got {tuple(prefixes.shape)}")
    outputs = []
    for start in tqdm(range(0, len(prefixes), batch_size), desc="generating", disable=not progress):
        batch = prefixes[start : start + batch_size].to(model.cfg.device)
        if is_bridge(model):
            outputs.append(_greedy_by_forward(model, batch, n_tokens).cpu())
            continue
        generated = model.generate(
            batch,
            max_new_tokens=n_tokens,
            do_sample=False,
            stop_at_eos=False,
            use_past_kv_cache=True,
            verbose=False,
            return_type="tokens",
        )
        assert isinstance(generated, Tensor)
        outputs.append(generated[:, batch.shape[1] :].cpu())
    if not outputs:
        return torch.empty(0, n_tokens, dtype=torch.int64)
    return torch.cat(outputs)


@torch.no_grad()
def _greedy_by_forward(model: HookedModel, batch: Tensor, n_tokens: int) -> Tensor:
    """Greedy decoding on a bridge, the last position's logits of each step's forward.

    Where the first forward fills a Hugging Face key/value cache (:func:`holds`), each later
    step computes its one new position over that cache; otherwise each step is a full forward
    over the text so far. The same tokens either way.
    """
    cache = PrefixKV.recorder(model, len(batch))
    text, new = batch, batch
    for _ in range(n_tokens):
        if cache is None:
            residual = final_residual(model, text, attention_mask=torch.ones_like(text))
        else:
            length = text.shape[1]
            residual = final_residual(
                model,
                new,
                past_key_values=cache,
                use_cache=True,
                attention_mask=torch.ones(len(text), length, dtype=torch.long, device=text.device),
            )
            if not holds(cache, model.cfg.n_layers, length):  # its forward wrote no cache
                cache = None
        logits = unembed(model, model.ln_final(residual[:, -1:]))
        new = logits[:, -1].argmax(-1, keepdim=True)
        text = torch.cat([text, new], dim=1)
    return text[:, batch.shape[1] :]
