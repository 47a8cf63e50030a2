"""Which activations does the continuation's NLL depend on? Activation gradients (paper 6.1).

For the per-head activations ``hook_q``, ``hook_k``, ``hook_v`` and ``hook_z`` of every layer,
the gradient of the continuation NLL with respect to the activation is reduced by the max
absolute value over ``d_head`` (paper Eq. 5), giving a score per component x layer x head x
paragraph x position. The paper shows L1H2's value gradients large on distinctive tokens
("Subscribe", "Washington", "email") and small on "." or "of".

The loss is each paragraph's mean NLL over its continuation (``token_range="continuation"``,
the paper's Eq. 5) or the NLL of the first continuation token only (``"first"``, what the
reference code's Fig. 6 used). Gradients flow from the embeddings; no parameter gradient is
computed and nothing is written to ``.grad``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.core.backend import HookedModel
from memloc_tl.core.forward import continuation_logits
from memloc_tl.core.heads import HeadRef
from memloc_tl.core.hooks import hook_name, make_graph_start_hook, make_store_hook
from memloc_tl.core.objectives import grad_only_for
from memloc_tl.core.paragraphs import Paragraphs, check_set
from memloc_tl.core.results import Drawable, HeadScores, TokenScores
from memloc_tl.core.validation import check_positive_int

COMPONENTS = ("q", "k", "v", "z")
TokenRange = Literal["continuation", "first"]


@dataclass(frozen=True)
class ActivationGradients(Drawable):
    """max over d_head of |dNLL / d activation|, per component, layer, head, paragraph, position.

    Attributes:
        scores: ``[component, n_layers, n_heads, n_paragraphs, pos]``. With grouped-query
            attention, ``"k"`` and ``"v"`` belong to key/value heads: each query head shows
            its group's.
        components: the components along the first dimension (``"q"``, ``"k"``, ``"v"``, ``"z"``).
        paragraphs: the paragraphs.
        token_range: ``"continuation"`` or ``"first"``: which tokens' NLL was differentiated.
    """

    scores: Float[Tensor, "component n_layers n_heads n_paragraphs pos"]
    components: tuple[str, ...]
    paragraphs: Paragraphs
    token_range: str

    def _component(self, component: str) -> Tensor:
        if component not in self.components:
            raise ValueError(f"component must be one of {self.components}, got {component!r}")
        return self.scores[self.components.index(component)]

    def token_scores(self, head: HeadRef | str, component: str = "v") -> TokenScores:
        """One head's scores per paragraph and position (paper Fig. 6 top: L1H2, ``"v"``)."""
        scores = self._component(component)
        ref = HeadRef.parse(head).check_grid(scores.shape[0], scores.shape[1])
        values = scores[ref.layer, ref.head]
        return TokenScores(f"max|dNLL/d{component}| of {ref}", values, self.paragraphs)

    def head_scores(
        self, component: str = "v", positions: Sequence[int] | slice | None = None
    ) -> HeadScores:
        """Per head, the score averaged over paragraphs and positions (default the prefix)."""
        chosen = slice(0, self.paragraphs.prefix_len) if positions is None else positions
        values = self._component(component)[..., chosen].mean(dim=(-1, -2))
        return HeadScores(f"mean max|dNLL/d{component}|", values)

    def top(self, k: int = 5, component: str = "v") -> list[tuple[HeadRef, float]]:
        return self.head_scores(component).top(k)

    def figure(self, component: str = "v") -> Any:
        """Heatmap per head of :meth:`head_scores` for one component."""
        return self.head_scores(component).figure()

    def to_frame(self) -> pd.DataFrame:
        """Long format: per component and head, the mean score over the prefix."""
        frames = [self.head_scores(c).to_frame().assign(component=c) for c in self.components]
        return pd.concat(frames, ignore_index=True)

    def __repr__(self) -> str:
        return (
            f"ActivationGradients(n={len(self.paragraphs)}, components={self.components}, "
            f"token_range={self.token_range!r}, top v: "
            + ", ".join(
                f"{h}={s:.3g}"
                for h, s in self.top(3, "v" if "v" in self.components else self.components[0])
            )
            + ")"
        )


def activation_gradients(
    model: HookedModel,
    paragraphs: Paragraphs,
    *,
    components: Sequence[str] = COMPONENTS,
    token_range: TokenRange = "continuation",
    batch_size: int = 8,
    progress: bool = True,
) -> ActivationGradients:
    """Gradient of the continuation NLL w.r.t. each head's q, k, v, z (paper 6.1, Eq. 5).

    Args:
        model: the model (not changed; no ``.grad`` is written).
        paragraphs: the paragraphs.
        components: any of ``"q"``, ``"k"``, ``"v"``, ``"z"``.
        token_range: ``"continuation"`` (mean NLL of all continuation tokens) or ``"first"``
            (the first continuation token only).
        batch_size: paragraphs per forward/backward pass.
        progress: show a progress bar.
    """
    components = tuple(components)
    if not components or any(c not in COMPONENTS for c in components):
        raise ValueError(f"components must be among {COMPONENTS}, got {components}")
    if token_range not in ("continuation", "first"):
        raise ValueError(f"token_range must be 'continuation' or 'first', got {token_range!r}")
    check_set(model, paragraphs, "paragraphs")
    check_positive_int(batch_size, "batch_size")
    cfg = model.cfg
    p = paragraphs.prefix_len
    names = [(c, layer, hook_name(c, layer)) for c in components for layer in range(cfg.n_layers)]
    scores = torch.zeros(
        len(components), cfg.n_layers, cfg.n_heads, len(paragraphs), paragraphs.seq_len
    )
    with grad_only_for(model, []):
        for start in tqdm(
            range(0, len(paragraphs), batch_size), desc="activation gradients", disable=not progress
        ):
            tokens = paragraphs.tokens[start : start + batch_size].to(cfg.device)
            stored: dict[str, Tensor] = {}
            hooks: list[Any] = [
                ("hook_embed", make_graph_start_hook()),
            ]
            hooks += [(name, make_store_hook(stored)) for _, _, name in names]
            with model.hooks(fwd_hooks=hooks):
                logits = continuation_logits(model, tokens, p)
            logprobs = logits.log_softmax(-1)
            token_nll = -logprobs.gather(-1, tokens[:, p:, None]).squeeze(-1)
            per_paragraph = token_nll.mean(-1) if token_range == "continuation" else token_nll[:, 0]
            grads = torch.autograd.grad(per_paragraph.sum(), [stored[n] for _, _, n in names])
            rows = slice(start, start + len(tokens))
            for (component, layer, _), grad in zip(names, grads, strict=True):
                # [batch, pos, head, d_head] -> [head, batch, pos]
                reduced = grad.abs().amax(-1).permute(2, 0, 1)
                if len(reduced) < cfg.n_heads:  # grouped-query k, v: each query head its group's
                    reduced = reduced.repeat_interleave(cfg.n_heads // len(reduced), dim=0)
                scores[components.index(component), layer, :, rows] = reduced.float().cpu()
    return ActivationGradients(scores, components, paragraphs, token_range)
