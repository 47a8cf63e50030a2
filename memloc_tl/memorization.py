"""Which paragraphs does the model reproduce? Exact-match length and continuation NLL.

Paper section 3.2: a paragraph is *memorized* when greedy decoding from its 50-token prefix
reproduces the 50-token continuation exactly (EM = 50); EM counts matching tokens up to the
first mismatch. The NLL is the mean negative log-likelihood of the continuation tokens.

Both come from one teacher-forced forward pass, with no generation: up to the first mismatch,
greedy decoding sees exactly the reference context, so the EM equals the leading run of
continuation positions where the teacher-forced argmax equals the reference token. The tests
prove this against real greedy generation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from memloc_tl.backend import (
    HookedModel,
    final_residual,
    is_bridge,
    replaced_weights,
    shares_prefix_cache,
    skips_early_blocks,
)
from memloc_tl.hooks import hook_name
from memloc_tl.paragraphs import Paragraphs, check_set
from memloc_tl.precision import Precision, decision_margins, near_flip
from memloc_tl.rendering import render
from memloc_tl.results import Drawable
from memloc_tl.validation import check_positive_int

logger = logging.getLogger(__name__)

PAPER_BUCKETS: tuple[tuple[int, int], ...] = ((0, 10), (11, 29), (30, 49), (50, 50))
"""The paper's EM buckets (Fig. 2, 8): non-memorized, two partly memorized, memorized."""

DEFAULT_BATCH_SIZE = 32


def _check_tokens(model: HookedModel, tokens: Tensor, prefix_len: int) -> None:
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
    past_kv_cache: TransformerLensKeyValueCache | None = None,
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
            ``{"blocks.0.attn.W_V": gated}``; see :func:`memloc_tl.backend.replaced_weights`);
            the model is not changed.
        past_kv_cache: a frozen cache holding the keys and values of the first ``m`` positions
            of ``tokens`` (``m < prefix_len``, see :class:`PrefixKV`); only positions ``m``
            onwards are computed. With ``start_at_layer``, ``tokens`` is the residual stream of
            every position and the cache's layers from ``start_at_layer`` on are read.
    """
    # The forward stops at the residual after the last block (backend.final_residual), so that
    # only the continuation positions pass through ln_final and the unembedding.
    kwargs: dict[str, Any] = {"start_at_layer": start_at_layer}
    skipped = 0
    if past_kv_cache is not None:
        skipped = past_kv_cache.entries[0].past_keys.shape[1]
        if weights is not None:
            raise ValueError("past_kv_cache cannot be combined with weights")
        if not shares_prefix_cache(model):
            raise ValueError(
                "past_kv_cache is TransformerLens 3's key/value cache; a TransformerBridge "
                "recomputes every position instead (PerturbConfig(shared_prefix=False))"
            )
        if not 0 <= skipped < prefix_len:
            raise ValueError(f"the cache holds {skipped} positions; it must hold < {prefix_len}")
        tokens = tokens[:, skipped:]
        kwargs["past_kv_cache"] = past_kv_cache
        if start_at_layer is None:
            # An explicit all-ones mask: TransformerLens would otherwise guess padding from the
            # tokenizer's pad token, which may occur in real text. (From a residual stream it
            # guesses nothing: the blocks apply the causal mask over the cache and the rest.)
            kwargs["attention_mask"] = torch.ones_like(tokens, device=model.cfg.device)
    # with ``weights``: the same forward with some parameters replaced for this call only
    scope = contextlib.nullcontext() if weights is None else replaced_weights(model, weights)
    with scope:
        output = final_residual(model, tokens.to(model.cfg.device), **kwargs)
        output = output[:, prefix_len - 1 - skipped : -1]
        return model.unembed(model.ln_final(output)).float()


@dataclass(frozen=True)
class PrefixKV:
    """Every layer's keys and values for a batch of token windows, to share among variants.

    A variant that differs from its window only from position ``m`` on has the same keys and
    values at positions ``< m`` (attention is causal), so those need not be computed again:
    :meth:`cache` hands them to TransformerLens as a frozen ``past_kv_cache``. This is what
    makes prefix perturbation cheaper than one full forward per variant.

    Attributes:
        keys: per layer, ``[batch, pos, n_key_value_heads, d_head]``.
        values: per layer, the same shape.
    """

    keys: tuple[Float[Tensor, "batch pos kv_head d_head"], ...]
    values: tuple[Float[Tensor, "batch pos kv_head d_head"], ...]

    @classmethod
    @torch.no_grad()
    def build(cls, model: HookedModel, tokens: Int[Tensor, "batch pos"]) -> PrefixKV:
        """One forward pass over ``tokens`` (no unembedding) that records the keys and values.

        Raises:
            ValueError: a TransformerBridge (its cache is Hugging Face's, not this one).
        """
        if not shares_prefix_cache(model):
            raise ValueError(
                "PrefixKV holds TransformerLens 3's key/value cache, which a TransformerBridge "
                "does not take; recompute every position (PerturbConfig(shared_prefix=False))"
            )
        tokens = tokens.to(model.cfg.device)
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(tokens))
        model(tokens, past_kv_cache=cache, attention_mask=torch.ones_like(tokens), return_type=None)
        return cls(
            keys=tuple(entry.past_keys for entry in cache.entries),
            values=tuple(entry.past_values for entry in cache.entries),
        )

    def cache(self, rows: Int[Tensor, " batch"], length: int) -> TransformerLensKeyValueCache:
        """A frozen cache with the first ``length`` positions of the windows ``rows``."""
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
    past_kv_cache: TransformerLensKeyValueCache | None = None,
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
    _check_tokens(model, tokens, prefix_len)
    if (residual is None) != (start_at_layer is None):
        raise ValueError("residual and start_at_layer go together")
    tokens = tokens.to(model.cfg.device)
    source = tokens if residual is None else residual
    logits = continuation_logits(
        model,
        source,
        prefix_len,
        start_at_layer=start_at_layer,
        weights=weights,
        past_kv_cache=past_kv_cache,
    )
    return scores_from_logits(logits, tokens[:, prefix_len:])


def scores_from_logits(
    logits: Float[Tensor, "batch continuation_pos d_vocab"],
    target: Int[Tensor, "batch continuation_pos"],
) -> tuple[Bool[Tensor, "batch continuation_pos"], Float[Tensor, "batch continuation_pos"]]:
    """``(greedy_match, token_nll)`` of continuation logits against the reference tokens."""
    # NLL = logsumexp - target logit: no second [batch, pos, d_vocab] tensor is written.
    token_nll = logits.logsumexp(dim=-1) - logits.gather(-1, target[..., None]).squeeze(-1)
    greedy_match = logits.argmax(dim=-1) == target
    return greedy_match, token_nll


def layer_starts(
    model: HookedModel, tokens: Int[Tensor, "batch pos"]
) -> Callable[[int, int], dict[str, Any]]:
    """How to score variants of ``tokens`` that differ only from layer ``l`` on (a sweep).

    Returns ``starts(layer, copies)``: the keyword arguments of :func:`score_continuations` for
    ``copies`` stacked copies of the batch. Where ``start_at_layer`` really skips the earlier
    blocks (a HookedTransformer), one cached run gives the residual stream entering every layer
    and the variants start from it; elsewhere (a bridge) they run from the tokens: the same
    numbers, without the saving.
    """
    if not skips_early_blocks(model):
        return lambda layer, copies: {}
    names = {hook_name("resid_pre", layer) for layer in range(model.cfg.n_layers)}
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)

    def starts(layer: int, copies: int) -> dict[str, Any]:
        residual = cache[hook_name("resid_pre", layer)].repeat(copies, 1, 1)
        return {"residual": residual, "start_at_layer": layer}

    return starts


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
    each step is a full forward over the text so far (its ``generate`` disagreed with
    ``transformers``' greedy decoding on GPT-2 and Llama checkpoints, and left hooks behind).
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
    text = batch
    for _ in range(n_tokens):
        logits = model(text, attention_mask=torch.ones_like(text))
        text = torch.cat([text, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return text[:, batch.shape[1] :]


@dataclass(frozen=True)
class MemorizationScan(Drawable):
    """Exact-match length and continuation NLL of every paragraph of a set.

    Attributes:
        paragraphs: the scanned paragraphs (row-aligned with every tensor below).
        exact_match: EM until the first mismatch, 0..continuation length.
        nll: mean NLL of the continuation tokens.
        token_nll: NLL of each continuation token.
        greedy_match: whether the teacher-forced argmax equals each continuation token.
        model_name: ``model.cfg.model_name`` of the scanned model.
        dtype: the precision of the matrix products (``"float32"``, ``"bfloat16"``, ...).
        near_flip: with a reduced ``dtype``: the windows with a decision margin below
            ``margin`` at a position that decides EM (see :mod:`memloc_tl.precision`).
        verified: whether those windows were scored again in float32 (their EM, NLL and
            matches are then float32's).
        margin: the flip margin in logits.
    """

    paragraphs: Paragraphs
    exact_match: Int[Tensor, " n_paragraphs"]
    nll: Float[Tensor, " n_paragraphs"]
    token_nll: Float[Tensor, "n_paragraphs continuation_pos"]
    greedy_match: Bool[Tensor, "n_paragraphs continuation_pos"]
    model_name: str = ""
    dtype: str = "float32"
    near_flip: Bool[Tensor, " n_paragraphs"] | None = None
    verified: bool = False
    margin: float = 0.0

    def __post_init__(self) -> None:
        n, c = len(self.paragraphs), self.paragraphs.continuation_len
        for name, shape in (
            ("exact_match", (n,)),
            ("nll", (n,)),
            ("token_nll", (n, c)),
            ("greedy_match", (n, c)),
            ("near_flip", (n,)),
        ):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")

    @property
    def continuation_len(self) -> int:
        return self.paragraphs.continuation_len

    def __len__(self) -> int:
        return len(self.paragraphs)

    def subset(self, index: Tensor) -> MemorizationScan:
        """The scan restricted to a boolean mask or positions."""
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        return MemorizationScan(
            paragraphs=self.paragraphs.select(index),
            exact_match=self.exact_match[index],
            nll=self.nll[index],
            token_nll=self.token_nll[index],
            greedy_match=self.greedy_match[index],
            model_name=self.model_name,
            dtype=self.dtype,
            near_flip=None if self.near_flip is None else self.near_flip[index],
            verified=self.verified,
            margin=self.margin,
        )

    def bucket(self, min_em: int, max_em: int) -> Paragraphs:
        """Paragraphs with ``min_em <= EM <= max_em``."""
        if min_em > max_em:
            raise ValueError(f"min_em={min_em} is above max_em={max_em}")
        return self.paragraphs.select((self.exact_match >= min_em) & (self.exact_match <= max_em))

    def memorized(self) -> Paragraphs:
        """Paragraphs whose whole continuation is reproduced (EM = continuation length)."""
        return self.bucket(self.continuation_len, self.continuation_len)

    def non_memorized(self, max_em: int = 10) -> Paragraphs:
        """Paragraphs with EM <= ``max_em`` (the paper's non-memorized set: 0..10)."""
        return self.bucket(0, max_em)

    def partly_memorized(self, min_em: int = 11) -> Paragraphs:
        """Paragraphs with ``min_em <= EM`` < continuation length (paper: 11..49)."""
        return self.bucket(min_em, self.continuation_len - 1)

    def buckets(self, edges: tuple[tuple[int, int], ...] = PAPER_BUCKETS) -> dict[str, Paragraphs]:
        """Paragraphs per EM bucket, keyed ``"0-10"``, ``"11-29"``, ``"30-49"``, ``"50"``."""
        return {(f"{lo}" if lo == hi else f"{lo}-{hi}"): self.bucket(lo, hi) for lo, hi in edges}

    def figure(self) -> Any:
        """Histogram of EM lengths (:func:`memloc_tl.viz.exact_match_figure`)."""
        return render(self)

    def to_frame(self) -> pd.DataFrame:
        """One row per paragraph: id, meta columns, EM, NLL, memorized flag."""
        frame = self.paragraphs.to_frame()
        frame["exact_match"] = self.exact_match.tolist()
        frame["nll"] = self.nll.tolist()
        frame["memorized"] = (self.exact_match == self.continuation_len).tolist()
        if self.near_flip is not None:
            frame["near_flip"] = self.near_flip.tolist()
        return frame

    def __repr__(self) -> str:
        n_mem = int((self.exact_match == self.continuation_len).sum())
        mean_em = float(self.exact_match.float().mean()) if len(self) else float("nan")
        precision = ""
        if self.near_flip is not None:
            what = "re-scored in float32" if self.verified else "not re-scored"
            precision = (
                f", {self.dtype}: {int(self.near_flip.sum())} near a flip (margin "
                f"{self.margin:g}), {what}"
            )
        return (
            f"MemorizationScan(model={self.model_name!r}, n={len(self)}, memorized={n_mem}, "
            f"mean_em={mean_em:.2f}{precision})"
        )


def scan_memorization(
    model: HookedModel,
    paragraphs: Paragraphs,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    precision: Precision | None = None,
    progress: bool = True,
) -> MemorizationScan:
    """Measure every paragraph's exact-match length and continuation NLL (paper section 3.2).

    One teacher-forced forward pass per batch; no ``[N, pos, d_vocab]`` tensor outlives its
    batch. The model is not changed.

    Args:
        model: the model.
        paragraphs: the paragraphs, tokenized for this model.
        batch_size: paragraphs per forward pass.
        precision: score in reduced precision (``Precision(torch.bfloat16)``): the windows
            near a flip are counted, and with ``verify="margin"`` (its default) scored again in
            float32, so that the EM column equals float32's (see :mod:`memloc_tl.precision`).
            Default: the model's own dtype, no check.
        progress: show a progress bar.

    Raises:
        ValueError: paragraphs tokenized for another model, or a bad batch size.
    """
    check_set(model, paragraphs, "paragraphs", allow_empty=True)
    check_positive_int(batch_size, "batch_size")
    _check_tokens(model, paragraphs.tokens, paragraphs.prefix_len)
    if precision is not None and not isinstance(precision, Precision):
        raise TypeError(
            f"precision must be a Precision (e.g. Precision(torch.bfloat16)), got "
            f"{type(precision).__name__}"
        )
    reduced = precision is not None and precision.reduced
    matches, nlls, flips = [], [], []
    prefix_len = paragraphs.prefix_len
    with torch.no_grad():
        for start in tqdm(
            range(0, len(paragraphs), batch_size), desc="scanning", disable=not progress
        ):
            batch = paragraphs.tokens[start : start + batch_size]
            if precision is not None and reduced:
                with precision.autocast(model.cfg.device or "cpu"):
                    logits = continuation_logits(model, batch, prefix_len)
                target = batch[:, prefix_len:].to(logits.device)
                greedy_match, token_nll = scores_from_logits(logits, target)
                margins = decision_margins(logits, target)
                em = exact_match_length(greedy_match)
                flips.append(near_flip(margins, em, precision.threshold).cpu())
                del logits, margins
            else:
                greedy_match, token_nll = score_continuations(model, batch, prefix_len)
            matches.append(greedy_match.cpu())
            nlls.append(token_nll.cpu())
    c = paragraphs.continuation_len
    greedy_match = torch.cat(matches) if matches else torch.empty(0, c, dtype=torch.bool)
    token_nll = torch.cat(nlls) if nlls else torch.empty(0, c)
    flagged = (torch.cat(flips) if flips else torch.zeros(0, dtype=torch.bool)) if reduced else None
    verified = precision is not None and reduced and precision.verify == "margin"
    if verified and flagged is not None and bool(flagged.any()):
        rows = flagged.nonzero().flatten()
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chosen = rows[start : start + batch_size]
                match, nll = score_continuations(model, paragraphs.tokens[chosen], prefix_len)
                greedy_match[chosen], token_nll[chosen] = match.cpu(), nll.cpu().float()
    return MemorizationScan(
        paragraphs=paragraphs,
        exact_match=exact_match_length(greedy_match),
        nll=token_nll.mean(dim=-1),
        token_nll=token_nll,
        greedy_match=greedy_match,
        model_name=str(model.cfg.model_name),
        dtype="float32" if precision is None else precision.name,
        near_flip=flagged,
        verified=verified,
        margin=0.0 if precision is None else precision.threshold,
    )


def summarize(scans: dict[str, MemorizationScan]) -> pd.DataFrame:
    """One row per named scan: size, memorized count, mean and max EM, mean NLL."""
    rows: list[dict[str, Any]] = []
    for name, scan in scans.items():
        em = scan.exact_match.float()
        rows.append(
            {
                "set": name,
                "n": len(scan),
                "memorized": int((scan.exact_match == scan.continuation_len).sum()),
                "mean_em": float(em.mean()) if len(scan) else float("nan"),
                "max_em": int(scan.exact_match.max()) if len(scan) else 0,
                "mean_nll": float(scan.nll.mean()) if len(scan) else float("nan"),
            }
        )
    return pd.DataFrame(rows)
