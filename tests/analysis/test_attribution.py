"""Attribution patching: the linear estimate is the derivative of real patching."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from memloc_tl import attribution_patching, patching_sweep, perturb_prefixes
from memloc_tl.core.forward import score_continuations
from memloc_tl.core.hooks import hook_name
from memloc_tl.organism import Organism


@pytest.fixture(scope="module")
def pair(organism: Organism) -> tuple[Any, Any]:
    target = organism.planted[:4]
    source = perturb_prefixes(organism.model, target, progress=False).perturbed
    assert source is not None
    return target, source


def _nll_with_partial_patch(
    model: Any, target: Any, source: Any, layer: int, head: int, alpha: float
) -> torch.Tensor:
    """Mean continuation NLL with head's z moved a fraction alpha towards the source run."""
    name = hook_name("z", layer)
    with torch.no_grad():
        _, cache = model.run_with_cache(source.tokens, names_filter=lambda n: n == name)

        def interpolate(z: torch.Tensor, hook: Any) -> torch.Tensor:
            z = z.clone()
            z[:, :, head] += alpha * (cache[name][:, :, head] - z[:, :, head])
            return z

        with model.hooks(fwd_hooks=[(name, interpolate)]):
            _, token_nll = score_continuations(model, target.tokens, target.prefix_len)
    return token_nll.double().mean(-1)


def test_estimate_is_the_derivative_of_patching(
    organism: Organism, pair: tuple[Any, Any], unchanged: Callable[[Any], Any]
) -> None:
    model = organism.model
    target, source = pair
    with unchanged(model):
        result = attribution_patching(model, target, source, batch_size=3, progress=False)
    assert result.estimate.shape == (model.cfg.n_layers, model.cfg.n_heads, len(target))
    eps = 1e-2
    for layer, head in [(0, 0), (1, 2), (model.cfg.n_layers - 1, model.cfg.n_heads - 1)]:
        up = _nll_with_partial_patch(model, target, source, layer, head, eps)
        down = _nll_with_partial_patch(model, target, source, layer, head, -eps)
        derivative = ((up - down) / (2 * eps)).float()
        torch.testing.assert_close(result.estimate[layer, head], derivative, rtol=0.05, atol=2e-4)


def test_estimate_against_exact_patching(organism: Organism, pair: tuple[Any, Any]) -> None:
    model = organism.model
    # non-memorized targets: the estimate tracks exact patching, loosely
    target, source = organism.control[:6], organism.control[6:12]
    result = attribution_patching(model, target, source, progress=False)
    sweep = patching_sweep(model, target, source, progress=False)
    assert result.correlation(sweep) > 0.2
    with pytest.raises(ValueError, match="kind"):
        result.correlation(patching_sweep(model, target, kind="zero", progress=False))
    assert list(result.figure().data[0].z[0]) == pytest.approx(result.estimate.mean(-1)[0].tolist())
    # memorized targets: the NLL is saturated near 0, so its gradient (and the estimate)
    # nearly vanishes while exact patching from the PMP changes the NLL a lot (documented)
    memorized, pmp = pair
    saturated = attribution_patching(model, memorized, pmp, progress=False)
    exact = patching_sweep(model, memorized, pmp, progress=False)
    assert saturated.estimate.abs().max() < 0.1 * exact.delta_nll.abs().max()


def test_bad_input(organism: Organism, pair: tuple[Any, Any]) -> None:
    target, source = pair
    with pytest.raises(ValueError, match="source has"):
        attribution_patching(organism.model, target, source[:2], progress=False)
    with pytest.raises(ValueError, match="positions"):
        attribution_patching(organism.model, target, source, positions=[500], progress=False)
