"""Every analysis memloc-tl offers, run on one model, as named tensors to compare backends.

Used by tests/core/test_backends.py: a HookedTransformer (TransformerLens 3) and a
TransformerBridge in compatibility mode (TransformerLens 3.9+ or 4) loaded from the same organism
checkpoint must give the same numbers, and a TransformerLens 4 run compares against a
TransformerLens 3 run's file.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from memloc_tl import (
    EditConfig,
    HeadRef,
    ParamMask,
    PerturbConfig,
    ablate_heads,
    activation_gradients,
    attribution_patching,
    gradient_norms,
    patching_sweep,
    perturb_prefixes,
    rare_token_attention,
    scan_memorization,
    sparse_edit,
)
from memloc_tl.analysis.gradients import contrastive_gradients
from memloc_tl.core.forward import continuation_logits
from memloc_tl.core.objectives import attributed_parameters
from memloc_tl.localization import (
    InjectionConfig,
    InjectionFailedWarning,
    inject_paragraphs,
    localize,
)
from memloc_tl.organism import Organism


def fingerprint(model: Any, organism: Organism) -> dict[str, Tensor]:
    """Named float64 CPU tensors: the results of every analyzer, the scan and an edit."""
    memorized = organism.planted[:4]
    other = organism.heldout[:4]
    out: dict[str, Tensor] = {}

    def put(name: str, value: Any) -> None:
        if not isinstance(value, Tensor):  # LayerComponentScores, HeadScores
            value = value.scores
        out[name] = value.detach().double().cpu().contiguous()

    scan = scan_memorization(model, organism.planted, progress=False)
    put("scan.exact_match", scan.exact_match)
    put("scan.nll", scan.nll)
    norms = gradient_norms(model, memorized, progress=False)
    put("gradient_norms.l2", norms.l2)
    put("gradient_norms.max_abs", norms.max_abs)
    contrast = contrastive_gradients(model, memorized, other, progress=False)
    put("contrastive.W_Q.0", contrast["blocks.0.attn.W_Q"])
    put("contrastive.W_out.1", contrast["blocks.1.mlp.W_out"])
    rare = rare_token_attention(model, memorized, organism.corpus_counts, progress=False)
    put("rare.tau", rare.tau)
    put("rare.rare_mass", rare.rare_mass)
    for kind in ("patch", "zero", "mean"):
        sweep = patching_sweep(model, memorized, other, kind=kind, mean_over=other, progress=False)
        put(f"sweep.{kind}.delta_nll", sweep.delta_nll)
        put(f"sweep.{kind}.delta_em", sweep.delta_em)
    ablation = ablate_heads(model, memorized, [HeadRef(0, 1)], progress=False)
    put("ablate.em", ablation.em)
    put("ablate.nll", ablation.nll)
    perturbed = perturb_prefixes(
        model, memorized[:2], config=PerturbConfig(n_samples=1, seed=3), progress=False
    )
    put("perturb.em", perturbed.em)
    put("perturb.nll", perturbed.nll)
    grads = activation_gradients(model, memorized, progress=False)
    put("activation_gradients", grads.scores)
    attribution = attribution_patching(model, memorized, other, progress=False)
    put("attribution", attribution.estimate)
    scores = localize(model, memorized[:2], method="grad_x_weight", level="weights")
    put("localize.grad_x_weight.W_V.1", scores.scores["blocks.1.attn.W_V"])
    # the path of weight-level learned masks: a forward with gated weights, differentiated in
    # the gates (the learned mask itself is left out: Adam amplifies float noise in gradients
    # near zero, on any backend)
    w_in = attributed_parameters(model)["blocks.0.mlp.W_in"].detach()
    gate = torch.linspace(0, 1, w_in.numel()).view_as(w_in).requires_grad_(True)
    logits = continuation_logits(
        model, memorized.tokens, memorized.prefix_len, weights={"blocks.0.mlp.W_in": w_in * gate}
    )
    put("gated_weights.gradient", torch.autograd.grad(logits.logsumexp(-1).mean(), [gate])[0])
    ablated = localize(model, memorized[:2], method="zero_ablation", level="neurons")
    put("localize.zero_ablation.neurons.1", ablated.scores["blocks.1.mlp.hook_post"])
    gates = localize(model, memorized[:2], method="attribution", level="heads")
    put("localize.attribution.heads", torch.stack(list(gates.scores.values())))

    before = {n: p.detach().clone() for n, p in attributed_parameters(model).items()}
    config = EditConfig(fraction=0.01, steps=3, lr=1e-2)
    edit = sparse_edit(model, memorized[:2], keep=other, config=config, progress=False)
    put("edit.mask", torch.cat([m.flatten() for m in edit.mask.masks.values()]))
    put("edit.after", torch.cat([edit.edit.after[n] for n in sorted(edit.edit.after)]))
    put("edit.losses", torch.tensor(edit.losses))
    put("edit.evaluation", torch.tensor(edit.evaluation[["before", "after"]].to_numpy()))
    edit.edit.apply(model)
    put("edit.applied.exact_match", scan_memorization(model, memorized, progress=False).nll)
    edit.edit.revert(model)
    for name, value in attributed_parameters(model).items():
        assert torch.equal(value, before[name]), f"revert left {name} changed"

    scope = ParamMask.scope(model, components=["W_V", "W_O"], layers=[1])
    with warnings.catch_warnings():  # 3 steps cannot plant it: the numbers, not success, matter
        warnings.simplefilter("ignore", InjectionFailedWarning)
        injection = inject_paragraphs(
            model,
            organism.heldout[4:5],
            keep=other,
            config=InjectionConfig(
                level="weights", fraction=0.05, scope=scope, max_steps=3, seed=0
            ),
            progress=False,
        )
    put("inject.em_after", injection.em_after)
    put("inject.evaluation", torch.tensor(injection.evaluation[["before", "after"]].to_numpy()))
    return out
