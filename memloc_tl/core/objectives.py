"""The objectives every gradient in memloc-tl is taken of, and the plumbing to take them.

Below both the analyzers and the editing code (docs/architecture.md has the layers): the
attributed weights (W_Q, W_K, W_V, W_O per head, W_in, W_out; never embeddings, unembedding or
biases, as in the paper), the continuation NLL, the KL to the original model used by the contrastive
objective (paper Eq. 3-4), the original model's reference log-probabilities, gradients
accumulated batch by batch, and a scope in which only chosen parameters require grad.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.core.backend import (
    HookedModel,
    Weight,
    model_parameters,
    parameters_of,
    weights,
)
from memloc_tl.core.forward import (
    continuation_logits,
    continuation_residual,
    head_logprobs,
    per_position_loss,
)
from memloc_tl.core.paragraphs import Paragraphs
from memloc_tl.core.unembedding import shared_unembedding

HEAD_MATRICES = ("W_K", "W_Q", "W_V", "W_O")
"""Per-head matrices, in the paper's column order."""
MLP_MATRICES = ("W_in", "W_out")
MATRICES = HEAD_MATRICES + MLP_MATRICES
KLReduction = Literal["sum_positions", "mean"]


def attributed_names(model: HookedModel) -> list[str]:
    """``blocks.{l}.attn.W_K`` ... ``blocks.{l}.mlp.W_out`` for every layer, in that order."""
    return [
        f"blocks.{layer}.{module}.{matrix}"
        for layer in range(model.cfg.n_layers)
        for module, matrices in (("attn", HEAD_MATRICES), ("mlp", MLP_MATRICES))
        for matrix in matrices
    ]


def attributed_weights(model: HookedModel) -> dict[str, Weight]:
    """The attributed matrices by name, each with the parameter it lives in (see backend)."""
    return weights(model, attributed_names(model))


def attributed_parameters(model: HookedModel) -> dict[str, Tensor]:
    """The attributed matrices by name: ``blocks.{l}.attn.W_Q`` ... ``blocks.{l}.mlp.W_out``.

    In TransformerLens layout (``W_Q`` is ``[n_heads, d_model, d_head]``). On a
    HookedModel these are its parameters; on a TransformerBridge, views of the Hugging
    Face parameters (in-place writes reach the model; for gradients use
    :func:`attributed_weights` and :func:`memloc_tl.core.backend.gradients`).
    """
    return {name: w.value for name, w in attributed_weights(model).items()}


def component_labels(n_heads: int) -> tuple[str, ...]:
    """``W_K.H0 .. W_K.H{n-1}, W_Q.H0, ..., W_O.H{n-1}, W_in, W_out``."""
    heads = tuple(f"{m}.H{h}" for m in HEAD_MATRICES for h in range(n_heads))
    return heads + MLP_MATRICES


@contextlib.contextmanager
def grad_only_for(model: HookedModel, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Only ``params`` require grad inside the block; every flag is restored on exit."""
    flags = [(p, p.requires_grad) for p in model_parameters(model)]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def gradients_as_produced(
    params: Sequence[torch.nn.Parameter], receive: Callable[[torch.nn.Parameter, Tensor], None]
) -> Iterator[None]:
    """Inside the block, each backward pass hands ``receive(param, grad)`` every parameter's
    gradient as soon as it has been accumulated, and drops the parameter's ``.grad``: a
    backward pass then holds one full gradient at a time. Only parameters that require grad
    are hooked (enter the block after setting the flags); the hooks are removed on exit, also
    after an error."""

    def hook(param: torch.nn.Parameter) -> None:
        grad, param.grad = param.grad, None
        if grad is not None:
            receive(param, grad)

    handles = [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


PositionLoss = Callable[[Float[Tensor, "batch chunk d_vocab"], slice], Float[Tensor, "batch chunk"]]
"""``loss(logits, positions)``: a batch's loss at some of its continuation positions (a slice),
from the float32 logits there (see :func:`~memloc_tl.core.forward.per_position_loss`)."""


def nll_loss(labels: Tensor, prefix_len: int) -> PositionLoss:
    """The NLL of ``labels``' continuation tokens (``labels``: ``[batch, pos]``, on the model's
    device), position by position."""
    target = labels[:, prefix_len:]

    def nll(logits: Tensor, positions: slice) -> Tensor:
        wanted = logits.gather(-1, target[:, positions, None]).squeeze(-1)
        return logits.logsumexp(-1) - wanted

    return nll


def continuation_nll(
    model: HookedModel,
    tokens: Tensor,
    prefix_len: int,
    *,
    labels: Tensor | None = None,
    checkpoint_blocks: bool = False,
) -> Float[Tensor, " batch"]:
    """Mean continuation NLL of each paragraph, differentiable.

    Args:
        model: the model.
        tokens: the context, ``[batch, pos]``.
        prefix_len: prefix length.
        labels: the tokens whose NLL is taken (default ``tokens``: the paragraph's own
            continuation); e.g. a perturbed paragraph's tokens under the memorized context.
    """
    labels = tokens if labels is None else labels
    loss = nll_loss(labels.to(model.cfg.device), prefix_len)
    return per_position_loss(
        model, tokens, prefix_len, loss, checkpoint_blocks=checkpoint_blocks
    ).mean(-1)


ChunkReference = Callable[[slice], Tensor]
"""theta_0's log-probabilities ``[batch, chunk, d_vocab]`` of a batch at some of its
continuation positions (a slice), made when the KL reads them."""


def kl_loss(
    original_logprobs: Float[Tensor, "batch continuation_pos d_vocab"] | ChunkReference,
) -> PositionLoss:
    """KL(p_theta0 || p_theta) position by position, theta_0's log-probabilities given as a
    tensor or a :data:`ChunkReference`."""

    def kl(logits: Tensor, positions: slice) -> Tensor:
        if callable(original_logprobs):
            reference = original_logprobs(positions).to(logits.device)
        else:
            reference = original_logprobs[:, positions].to(logits.device)
        return (reference.exp() * (reference - logits.log_softmax(-1))).sum(-1)

    return kl


def reduce_kl(
    per_position: Float[Tensor, "batch continuation_pos"], reduction: KLReduction
) -> Float[Tensor, ""]:
    """A batch's KL from its per-position KL: summed over positions and averaged over
    paragraphs (``"sum_positions"``), or averaged over both (``"mean"``)."""
    return per_position.sum(-1).mean() if reduction == "sum_positions" else per_position.mean()


def contrastive_kl(
    model: HookedModel,
    keep_tokens: Tensor,
    original_logprobs: Float[Tensor, "batch continuation_pos d_vocab"] | ChunkReference,
    prefix_len: int,
    *,
    reduction: KLReduction = "sum_positions",
    checkpoint_blocks: bool = False,
) -> Float[Tensor, ""]:
    """KL(p_theta0 || p_theta) on the keep paragraphs' continuation positions.

    ``original_logprobs``: theta_0's log-probabilities of the batch, or a
    :data:`ChunkReference` that makes them a chunk of positions at a time.
    ``reduction="sum_positions"`` sums over positions and averages over paragraphs (the
    reference code's ``KLDivLoss(reduction="batchmean")``); ``"mean"`` averages over both.
    ``checkpoint_blocks``: as in :func:`continuation_nll`.
    """
    loss = kl_loss(original_logprobs)
    per_position = per_position_loss(
        model, keep_tokens, prefix_len, loss, checkpoint_blocks=checkpoint_blocks
    )
    return reduce_kl(per_position, reduction)


@dataclass(frozen=True)
class SetTerm:
    """One paragraph set's part of an objective ``sum_t mean_over_set_t(loss_t)``, written so
    that several sets can share one forward pass (:func:`final_gradients`).

    A batch of the set's rows ``start : start + len(tokens)`` is scored by running the model on
    ``context`` (``[rows, pos]``, the rows' tokens or, say, an edit's target paragraphs), taking
    ``loss`` at every continuation position and reducing that ``[rows, continuation_pos]``
    table to the batch's mean loss with ``reduce``; :meth:`batch_loss` does that alone.

    Attributes:
        paragraphs: the set.
        batch: ``batch(tokens, start) -> (context, loss)`` for a batch of the set's tokens.
        reduce: ``[rows, continuation_pos]`` per-position losses -> the batch's mean loss.
        checkpoint_blocks: run the blocks under activation checkpointing (as in
            :func:`continuation_nll`).
    """

    paragraphs: Paragraphs
    batch: Callable[[Tensor, int], tuple[Tensor, PositionLoss]]
    reduce: Callable[[Tensor], Tensor]
    checkpoint_blocks: bool = False

    def per_position(
        self, model: HookedModel, context: Tensor, loss: PositionLoss
    ) -> Float[Tensor, "rows continuation_pos"]:
        """``loss`` at every continuation position of ``context``, run with this set's prefix
        length and checkpointing."""
        return per_position_loss(
            model,
            context,
            self.paragraphs.prefix_len,
            loss,
            checkpoint_blocks=self.checkpoint_blocks,
        )

    def batch_loss(self, model: HookedModel, tokens: Tensor, start: int) -> Float[Tensor, ""]:
        """The batch-mean loss of the set's rows ``start : start + len(tokens)``."""
        return self.reduce(self.per_position(model, *self.batch(tokens, start)))

    def loss_fn(self, model: HookedModel) -> Callable[[Tensor, int], Tensor]:
        """``loss_fn(tokens, start)``, :meth:`batch_loss` on ``model`` (the form
        :func:`accumulated_gradients` takes)."""
        return functools.partial(self.batch_loss, model)


@contextlib.contextmanager
def _attributed_gradients(
    model: HookedModel, receive: Callable[[str, Tensor], None]
) -> Iterator[None]:
    """Inside the block only the attributed matrices require grad, and each backward pass hands
    ``receive(name, float32 gradient)`` every attributed matrix's gradient as soon as it has
    been produced (none stays as ``.grad``); on a normal exit a matrix that got none gets
    zeros. The flags and the model's own ``.grad`` tensors are given back as they were."""
    chosen = attributed_weights(model)
    params = parameters_of(chosen)
    names_of: dict[int, list[str]] = {}
    for name, w in chosen.items():
        names_of.setdefault(id(w.param), []).append(name)
    received: set[str] = set()

    def hand(param: torch.nn.Parameter, grad: Tensor) -> None:
        grad = grad.contiguous()
        for name in names_of[id(param)]:
            receive(name, chosen[name].of(grad).float())
            received.add(name)

    saved = [(p, p.grad) for p in params]
    try:
        with grad_only_for(model, params):
            for p in params:
                p.grad = None
            with gradients_as_produced(params, hand):
                yield
    finally:
        for p, grad in saved:
            p.grad = grad
    for name, w in chosen.items():  # a weight the losses never used has a zero gradient
        if name not in received:
            receive(name, torch.zeros(w.shape, device=w.param.device))


def accumulated_gradients(
    model: HookedModel,
    terms: Sequence[tuple[Paragraphs, Callable[[Tensor, int], Tensor]]],
    batch_size: int,
    progress: bool,
    desc: str,
) -> dict[str, Tensor]:
    """Gradient of ``sum_t mean_over_set_t(loss_t)``, accumulated batch by batch.

    Each term's loss function returns the batch-mean loss of a batch (given its tokens and start
    index), so weighting by batch size / set size gives the gradient of the set mean exactly.
    Each parameter's gradient is added to the total as soon as the backward pass has produced
    it, so beside the total a backward pass holds one parameter's gradient at a time. The
    model's own ``.grad`` tensors are given back as they were.
    """
    total: dict[str, Tensor] = {}

    def add(name: str, part: Tensor) -> None:
        if name in total:
            total[name] += part
        else:
            total[name] = part.contiguous()

    steps = [(p, fn, s) for p, fn in terms for s in range(0, len(p), batch_size)]
    with _attributed_gradients(model, add):
        for paragraphs, loss_fn, start in tqdm(steps, desc=desc, disable=not progress):
            tokens = paragraphs.tokens[start : start + batch_size].to(model.cfg.device)
            loss = loss_fn(tokens, start) * (len(tokens) / len(paragraphs))
            loss.backward()
    return {name: total[name] for name in attributed_names(model)}


def final_gradients(
    model: HookedModel,
    terms: Sequence[SetTerm],
    batch_size: int,
    receive: Callable[[str, Tensor], None],
) -> None:
    """``receive(name, gradient)`` once per attributed matrix, with its (float32) gradient of
    ``sum_t mean_over_set_t(loss_t)`` as :func:`accumulated_gradients` computes it.

    When every term's set fits in one batch, the sets' rows go through the model together, in
    one forward and one backward pass, so each matrix's gradient is produced once, for all the
    sets at the same time, and handed over at once: no total of the gradients is kept, and
    autograd holds no set's part of a gradient while it waits for another's (what two graphs,
    one per set, would cost: 0.33 models on GPT-Neo 125M's layout). That pass holds all the
    sets' rows at once (up to ``len(terms) * batch_size``), as one graph per set did. Sets of
    different lengths, prefix lengths or checkpointing get one forward each, still in one
    backward pass; sets too large for a batch are accumulated batch by batch first. A matrix
    the losses never use gets zeros. The model's own ``.grad`` tensors are given back as they
    were.
    """
    if any(len(term.paragraphs) > batch_size for term in terms):
        pairs = [(term.paragraphs, term.loss_fn(model)) for term in terms]
        for name, grad in accumulated_gradients(model, pairs, batch_size, False, "").items():
            receive(name, grad)
        return
    device = model.cfg.device
    with _attributed_gradients(model, receive):
        parts = [term.batch(term.paragraphs.tokens.to(device), 0) for term in terms]
        kinds = {
            (context.shape[1], term.paragraphs.prefix_len, term.checkpoint_blocks)
            for (context, _), term in zip(parts, terms, strict=True)
        }
        if len(kinds) > 1:  # one forward per set, one backward pass
            losses = [
                term.reduce(term.per_position(model, context, loss))
                for (context, loss), term in zip(parts, terms, strict=True)
            ]
            torch.stack(losses).sum().backward()
            return
        bounds = list(itertools.accumulate([len(c) for c, _ in parts], initial=0))
        rows = [slice(a, b) for a, b in itertools.pairwise(bounds)]

        def joint(logits: Tensor, positions: slice) -> Tensor:
            pieces = [loss(logits[r], positions) for (_, loss), r in zip(parts, rows, strict=True)]
            return torch.cat(pieces, dim=0)

        contexts = torch.cat([context for context, _ in parts])
        per_position = terms[0].per_position(model, contexts, joint)  # the kinds are all equal
        losses = [t.reduce(per_position[r]) for t, r in zip(terms, rows, strict=True)]
        torch.stack(losses).sum().backward()


def original_logprobs(
    model: HookedModel, paragraphs: Paragraphs, batch_size: int = 16
) -> Float[Tensor, "n_paragraphs continuation_pos d_vocab"]:
    """The current model's continuation log-probabilities (theta_0 of the KL term), no grad,
    on the CPU: ``n_paragraphs x continuation_len x d_vocab`` floats (10 MB per paragraph with a
    50,257-token vocabulary). Built without spare copies: each batch's logits become
    log-probabilities in place, one paragraph at a time, and go into the result (a single
    batch is the result itself).
    """
    out: Tensor | None = None
    with torch.no_grad(), shared_unembedding():
        for start in range(0, len(paragraphs), batch_size):
            tokens = paragraphs.tokens[start : start + batch_size]
            logits = continuation_logits(model, tokens, paragraphs.prefix_len)
            for row in logits:
                row.copy_(row.log_softmax(-1))
            logits = logits.cpu()
            if len(tokens) == len(paragraphs):
                return logits
            if out is None:
                out = logits.new_empty((len(paragraphs), *logits.shape[1:]))
            out[start : start + len(tokens)] = logits
    assert out is not None
    return out


Reference = Callable[[Tensor, int], "Tensor | ChunkReference"]
"""theta_0's continuation log-probabilities of a batch of a keep set, ``reference(tokens,
start)`` for the set's rows ``start : start + len(tokens)``: a tensor, or a
:data:`ChunkReference` (see :func:`stored_reference` and :func:`recomputed_reference`)."""


def stored_reference(logprobs: Tensor) -> Reference:
    """A :data:`Reference` that slices log-probabilities computed once
    (:func:`original_logprobs`)."""

    def reference(tokens: Tensor, start: int) -> Tensor:
        return logprobs[start : start + len(tokens)]

    return reference


def recomputed_reference(
    model: HookedModel,
    prefix_len: int,
    original: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> Reference:
    """A :data:`Reference` that runs each batch's blocks again inside the scope ``original()``
    makes, which must put theta_0's blocks in the model for that forward (by default the model
    is theta_0 as it is), and keeps only the residual after the last block
    (:func:`~memloc_tl.core.forward.continuation_residual`); ``ln_final`` and the unembedding,
    which an edit never changes, make a chunk's log-probabilities when the KL reads them
    (:func:`~memloc_tl.core.forward.head_logprobs`). So nothing vocabulary-sized is held
    beyond one chunk of positions, however large the keep set, for one more forward of the
    blocks per batch and one more unembedding per chunk. The numbers equal those
    :func:`original_logprobs` stores to float rounding (another matmul layout)."""

    def reference(tokens: Tensor, start: int) -> ChunkReference:
        with original():
            residual = continuation_residual(model, tokens, prefix_len)

        def chunk(positions: slice) -> Tensor:
            with torch.no_grad():
                return head_logprobs(model, residual[:, positions])

        return chunk

    return reference
