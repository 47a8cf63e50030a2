"""ParamMask and MaskedOptimizer: exact counts, seeds, and nothing outside the mask moves."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
import torch

from memloc_tl.analysis.gradients import attributed_parameters
from memloc_tl.core.heads import HeadRef
from memloc_tl.editing import MaskedOptimizer, ParamMask
from memloc_tl.organism import Organism


def fake_grads(model: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(p.shape, generator=generator)
        for n, p in attributed_parameters(model).items()
    }


def test_gradient_mask_is_the_exact_global_top_fraction(organism: Organism) -> None:
    grads = fake_grads(organism.model)
    total = sum(g.numel() for g in grads.values())
    mask = ParamMask.from_gradients(grads, fraction=0.001)
    assert mask.count == math.floor(0.001 * total)
    assert mask.total == total
    flat = torch.cat([g.abs().flatten() for g in grads.values()])
    threshold = flat.topk(mask.count).values.min()
    selected = torch.cat([grads[n].abs()[m] for n, m in mask.masks.items()])
    assert (selected >= threshold).all()
    unselected = torch.cat([grads[n].abs()[~m] for n, m in mask.masks.items()])
    assert (unselected <= threshold).all()
    counts = mask.counts(organism.model.cfg.n_heads)
    assert counts.scores.sum().item() == mask.count
    assert len(mask.to_frame()) == len(grads)
    assert repr(mask).startswith(f"ParamMask(gradient, {mask.count} of {total} weights")


def test_random_mask_exact_count_and_seeded(organism: Organism) -> None:
    model = organism.model
    a = ParamMask.random(model, fraction=0.01, seed=1)
    b = ParamMask.random(model, fraction=0.01, seed=1)
    c = ParamMask.random(model, fraction=0.01, seed=2)
    assert a.count == math.floor(0.01 * a.total)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert not all(torch.equal(a.masks[n], c.masks[n]) for n in a.masks)
    with pytest.raises(ValueError, match="selects none"):
        ParamMask.random(model, fraction=1e-9)
    with pytest.raises(ValueError, match="fraction"):
        ParamMask.random(model, fraction=0.0)


def test_scope_restricts_selection_to_one_head(organism: Organism) -> None:
    model = organism.model
    scope = ParamMask.scope(model, components=["W_V"], heads=["L1H2"])
    d_model, d_head = model.cfg.d_model, model.cfg.d_head
    assert scope.count == d_model * d_head
    assert scope.masks["blocks.1.attn.W_V"][2].all()
    mask = ParamMask.from_gradients(fake_grads(model), fraction=0.1, within=scope)
    assert mask.count == math.floor(0.1 * d_model * d_head)
    assert mask.masks["blocks.1.attn.W_V"][2].sum() == mask.count
    counts = mask.counts(model.cfg.n_heads)
    assert counts[1, "W_V.H2"] == mask.count
    random = ParamMask.random(model, fraction=0.5, seed=0, within=scope)
    assert (random & scope).count == random.count
    with pytest.raises(ValueError, match="components"):
        ParamMask.scope(model, components=["W_E"])
    with pytest.raises(ValueError, match="does not exist"):
        ParamMask.scope(model, heads=[HeadRef(7, 0)])


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1.0),  # coupled decay: the leak
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.5),
    ],
)
@pytest.mark.parametrize("mode", ["compact", "restore"])
@pytest.mark.parametrize("form", ["boolean", "indices"])
def test_out_of_mask_weights_are_bit_identical(make: Any, mode: str, form: str) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    mask = torch.rand(8, 16) < 0.1
    given = mask if form == "boolean" else mask.flatten().nonzero().flatten()
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    optimizer = MaskedOptimizer(make(list(layer.parameters())), {layer.weight: given}, mode=mode)  # type: ignore[arg-type]
    assert optimizer.mode == mode
    for _ in range(5):
        optimizer.zero_grad()
        layer(torch.randn(4, 16)).square().sum().backward()
        optimizer.step()
    assert torch.equal(layer.weight[~mask], before["weight"][~mask])
    assert not torch.equal(layer.weight[mask], before["weight"][mask])
    assert torch.equal(layer.bias, before["bias"])  # no mask: frozen
    # without the wrapper, the same optimizer moves everything (the reference code's leak)
    plain = torch.nn.Linear(16, 8)
    plain.load_state_dict(before)
    raw = make(list(plain.parameters()))
    raw.zero_grad()
    (plain(torch.randn(4, 16)).square().sum()).backward()
    for p in plain.parameters():
        if p is plain.weight:
            p.grad.mul_(mask)  # type: ignore[union-attr]
    raw.step()
    assert not torch.equal(plain.weight[~mask], before["weight"][~mask])


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1.0),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5),
    ],
)
def test_compact_steps_equal_full_steps_on_the_masked_entries(make: Any) -> None:
    """Compact mode runs the optimizer on the gathered entries only: same result as full steps."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, 8) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    mask = torch.rand(8, 16) < 0.2
    optimizers = [
        MaskedOptimizer(make(list(layer.parameters())), {layer.weight: mask}, mode=mode)
        for layer, mode in zip(layers, ("compact", "restore"), strict=True)
    ]
    inputs = torch.randn(5, 4, 16)
    for x in inputs:
        for layer, optimizer in zip(layers, optimizers, strict=True):
            optimizer.zero_grad()
            layer(x).square().sum().backward()
            optimizer.step()
    torch.testing.assert_close(layers[0].weight, layers[1].weight, rtol=1e-6, atol=1e-7)
    assert not torch.equal(layers[0].weight[mask], layers[1].weight.new_zeros(int(mask.sum())))


def test_compact_mode_with_a_closure_and_the_choice_of_mode() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    mask = torch.rand(4, 8) < 0.3
    before = layer.weight.detach().clone()
    optimizer = MaskedOptimizer(torch.optim.SGD(layer.parameters(), lr=0.01), {layer.weight: mask})
    assert optimizer.mode == "compact"
    x = torch.randn(3, 8)

    def closure() -> float:
        optimizer.zero_grad()
        loss = layer(x).square().sum()
        loss.backward()
        return float(loss.detach())

    first = optimizer.step(closure)
    second = optimizer.step(closure)
    assert first is not None
    assert second is not None
    assert second < first
    assert torch.equal(layer.weight[~mask], before[~mask])
    # L-BFGS mixes entries: auto picks restore, and compact is refused
    lbfgs = MaskedOptimizer(torch.optim.LBFGS(layer.parameters()), {layer.weight: mask})
    assert lbfgs.mode == "restore"
    with pytest.raises(ValueError, match="restore"):
        MaskedOptimizer(torch.optim.LBFGS(layer.parameters()), {layer.weight: mask}, mode="compact")
    # a dense mask: restore is cheaper
    dense = torch.ones(4, 8, dtype=torch.bool)
    assert (
        MaskedOptimizer(torch.optim.Adam([layer.weight]), {layer.weight: dense}).mode == "restore"
    )
    with pytest.raises(ValueError, match="mode"):
        MaskedOptimizer(torch.optim.Adam([layer.weight]), {layer.weight: mask}, mode="fast")  # type: ignore[arg-type]
    stepped = torch.optim.Adam([layer.weight])
    layer(x).sum().backward()
    stepped.step()
    with pytest.raises(ValueError, match="not stepped"):
        MaskedOptimizer(stepped, {layer.weight: mask}, mode="compact")


def test_compact_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    mask = torch.eye(4, dtype=torch.bool)
    optimizer = MaskedOptimizer(torch.optim.Adam(layer.parameters(), lr=0.1), {layer.weight: mask})
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    other = MaskedOptimizer(torch.optim.Adam(layer.parameters(), lr=0.1), {layer.weight: mask})
    other.load_state_dict(state)
    assert torch.equal(
        other.state_dict()["optimizer"]["state"][0]["exp_avg"],
        state["optimizer"]["state"][0]["exp_avg"],
    )
    wrong = MaskedOptimizer(
        torch.optim.Adam(layer.parameters(), lr=0.1), {layer.weight: ~mask}, mode="compact"
    )
    with pytest.raises(ValueError, match="same masks"):
        wrong.load_state_dict(state)
    restore = MaskedOptimizer(
        torch.optim.Adam(layer.parameters(), lr=0.1), {layer.weight: mask}, mode="restore"
    )
    with pytest.raises(ValueError, match="compact"):
        restore.load_state_dict(state)


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    mask = torch.eye(4, dtype=torch.bool)
    optimizer = MaskedOptimizer(
        torch.optim.Adam(layer.parameters(), lr=0.1), {layer.weight: mask}, mode="restore"
    )
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    other = MaskedOptimizer(
        torch.optim.Adam(layer.parameters(), lr=0.1),
        {layer.weight: torch.ones(4, 4, dtype=torch.bool)},
        mode="restore",
    )
    other.load_state_dict(state)
    assert torch.equal(other.state_dict()["masks"][0], mask)
    assert torch.equal(
        other.state_dict()["optimizer"]["state"][0]["exp_avg"],
        state["optimizer"]["state"][0]["exp_avg"],
    )
    with pytest.raises(ValueError, match="shape"):
        MaskedOptimizer(
            torch.optim.SGD(layer.parameters(), lr=0.1),
            {layer.weight: torch.ones(3, dtype=torch.bool)},
        )


@pytest.mark.parametrize("mode", ["compact", "restore"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_outside_the_mask_change_nothing_there(mode: str, bad: float) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    mask = torch.rand(8, 16) < 0.1
    before = layer.weight.detach().clone()
    optimizer = MaskedOptimizer(
        torch.optim.Adam([layer.weight], lr=1e-2, weight_decay=0.1),
        {layer.weight: mask},
        mode=mode,  # type: ignore[arg-type]
    )
    for _ in range(3):
        grad = torch.randn(8, 16)
        grad[~mask] = bad  # what a diverging loss gives outside the mask
        layer.weight.grad = grad
        optimizer.step()
    assert torch.equal(layer.weight[~mask], before[~mask])
    assert torch.isfinite(layer.weight).all()
    assert not torch.equal(layer.weight[mask], before[mask])


@pytest.mark.parametrize("fraction", [0.001, 0.3])
def test_gradient_mask_equals_one_top_k_over_all_gradients(
    organism: Organism, fraction: float
) -> None:
    """The mask is chosen a matrix at a time; it is the top k of all gradients put together
    (0.3: k is larger than whole matrices, which then enter entirely)."""
    grads = fake_grads(organism.model, seed=3)
    scope = ParamMask.random(organism.model, fraction=0.5, seed=1)
    for within in (None, scope):
        mask = ParamMask.from_gradients(grads, fraction=fraction, within=within)
        allowed = [
            torch.ones_like(g, dtype=torch.bool) if within is None else within.masks[n]
            for n, g in grads.items()
        ]
        flat = torch.cat(
            [g.abs().where(a, -1.0).flatten() for g, a in zip(grads.values(), allowed, strict=True)]
        )
        k = math.floor(fraction * sum(int(a.sum()) for a in allowed))
        expected = torch.zeros_like(flat, dtype=torch.bool)
        expected[flat.topk(k).indices] = True  # randn gradients: no ties
        got = torch.cat([mask.masks[n].flatten() for n in grads])
        assert torch.equal(got, expected)
        assert mask.count == k


@pytest.mark.parametrize("batches", [1, 3])
def test_gathering_gradients_steps_as_full_gradients_do(batches: int) -> None:
    """Inside gathering_gradients a backward pass keeps only the masked entries' gradients;
    the steps are bit-identical to steps on full gradients, over several backward passes."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, 8) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    mask = torch.rand(8, 16) < 0.2
    optimizers = [
        MaskedOptimizer(torch.optim.Adam(list(layer.parameters()), lr=1e-2), {layer.weight: mask})
        for layer in layers
    ]
    inputs = torch.randn(4, batches, 3, 16)
    for step in inputs:
        for gathered, (layer, optimizer) in enumerate(zip(layers, optimizers, strict=True)):
            optimizer.zero_grad()
            scope = optimizer.gathering_gradients() if gathered else contextlib.nullcontext()
            with scope:
                for x in step:
                    layer(x).square().sum().backward()
                    if gathered:  # nothing full is left: not the weight's, not the bias's
                        assert layer.weight.grad is None
                        assert layer.bias.grad is None
            optimizer.step()
    assert torch.equal(layers[0].weight, layers[1].weight)
    assert torch.equal(layers[0].bias, layers[1].bias)
    # the hooks are gone on exit: a backward pass outside the block leaves .grad as usual
    layers[1](inputs[0, 0]).sum().backward()
    assert layers[1].weight.grad is not None
    restore = MaskedOptimizer(
        torch.optim.Adam(list(layers[0].parameters())), {layers[0].weight: mask}, mode="restore"
    )
    with pytest.raises(ValueError, match="compact mode"), restore.gathering_gradients():
        pass


def test_distinct_integers_are_distinct_seeded_and_uniform() -> None:
    from memloc_tl.editing.masks import distinct_integers

    def draw(n: int, k: int, seed: int) -> torch.Tensor:
        return distinct_integers(n, k, torch.Generator().manual_seed(seed))

    for n, k in [(1000, 10), (1000, 499), (1000, 501), (1000, 1000), (7, 0)]:
        picked = draw(n, k, 0)
        assert len(picked) == k == len(set(picked.tolist()))
        assert all(0 <= i < n for i in picked.tolist())
        assert torch.equal(picked, draw(n, k, 0))
    assert not torch.equal(draw(1000, 10, 0), draw(1000, 10, 1))
    # every integer equally likely: 2,000 draws of 3 of 10 (and of 7 of 10, the other path)
    for k in (3, 7):
        counts = torch.zeros(10)
        for seed in range(2000):
            counts[draw(10, k, seed)] += 1
        expected = 2000 * k / 10
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 27.9, counts  # the chi-square (9 dof) 99.9% quantile
    with pytest.raises(ValueError, match="distinct"):
        draw(5, 6, 0)


def test_restore_mode_steps_a_fully_masked_parameter_as_the_optimizer_does() -> None:
    """A parameter whose mask selects every entry is neither saved nor restored: it steps
    exactly as under the bare optimizer, while a partly masked one keeps its other entries."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 4, bias=False) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    extras = [torch.nn.Parameter(torch.randn(4)) for _ in range(2)]  # its own loss term
    extras[1].data.copy_(extras[0].data)
    extra_mask = torch.tensor([True, False, True, False])
    extra_before = extras[0].detach().clone()
    masked = MaskedOptimizer(
        torch.optim.Adam([layers[0].weight, extras[0]], lr=1e-2, weight_decay=0.5),
        {layers[0].weight: torch.ones(4, 8, dtype=torch.bool), extras[0]: extra_mask},
        mode="restore",
    )
    bare = torch.optim.Adam([layers[1].weight, extras[1]], lr=1e-2, weight_decay=0.5)
    for x in torch.randn(3, 5, 8):
        for layer, extra, optimizer in zip(layers, extras, (masked, bare), strict=True):
            optimizer.zero_grad()
            (layer(x).square().sum() + extra.square().sum()).backward()
            optimizer.step()
    assert torch.equal(layers[0].weight, layers[1].weight)
    assert torch.equal(extras[0][~extra_mask], extra_before[~extra_mask])
    assert torch.equal(extras[0][extra_mask], extras[1][extra_mask])


def test_the_top_k_of_matrices_added_in_any_order_is_the_global_top_k(organism: Organism) -> None:
    from memloc_tl.editing.masks import TopByMagnitude

    grads = fake_grads(organism.model, seed=4)
    expected = ParamMask.from_gradients(grads, fraction=0.002)
    top = TopByMagnitude(grads, fraction=0.002)
    for name in reversed(list(grads)):  # as a backward pass produces them: last layer first
        top.add(name, grads[name])
    got = top.mask()
    assert list(got.masks) == list(grads)
    for name in grads:
        assert torch.equal(got.masks[name], expected.masks[name]), name
    first = next(iter(grads))
    with pytest.raises(ValueError, match="added twice"):
        top.add(first, grads[first])
    fresh = TopByMagnitude(grads, fraction=0.002)
    with pytest.raises(ValueError, match="no values were added"):
        fresh.mask()
    with pytest.raises(ValueError, match="shape"):
        fresh.add(first, grads[first].flatten())
    with pytest.raises(ValueError, match="NaN or Inf"):
        fresh.add(first, torch.full_like(grads[first], float("nan")))


@pytest.mark.parametrize("mode", ["compact", "restore"])
def test_a_mask_given_as_indices_steps_bit_for_bit_as_its_booleans(mode: str) -> None:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, 8) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    mask = torch.rand(8, 16) < 0.1
    forms = (mask, mask.flatten().nonzero().flatten())
    optimizers = [
        MaskedOptimizer(
            torch.optim.Adam(list(layer.parameters()), lr=1e-2), {layer.weight: m}, mode=mode
        )  # type: ignore[arg-type]
        for layer, m in zip(layers, forms, strict=True)
    ]
    for x in torch.randn(3, 4, 16):
        for layer, optimizer in zip(layers, optimizers, strict=True):
            optimizer.zero_grad()
            layer(x).square().sum().backward()
            optimizer.step()
    assert torch.equal(layers[0].weight, layers[1].weight)
    with pytest.raises(ValueError, match="sorted and distinct"):
        MaskedOptimizer(torch.optim.Adam([layers[0].weight]), {layers[0].weight: forms[1].flip(0)})
    with pytest.raises(ValueError, match="int64 flat indices"):
        MaskedOptimizer(torch.optim.Adam([layers[0].weight]), {layers[0].weight: forms[1].int()})


def test_a_sparse_mask_is_held_as_indices_and_means_what_its_booleans_mean(
    organism: Organism,
) -> None:
    model = organism.model
    random = ParamMask.random(model, fraction=0.01, seed=3)
    scope = ParamMask.scope(model, components=["W_V", "W_in"])
    assert all(s.dtype == torch.int64 for s in random.selections.values())
    for name, selection in scope.selections.items():  # whole matrices: booleans; none: indices
        whole = name.endswith((".W_V", ".W_in"))
        assert selection.dtype == (torch.bool if whole else torch.int64), name
        assert scope.count_in(name) == (math.prod(scope.shapes[name]) if whole else 0)
    held = sum(s.numel() * s.element_size() for s in random.selections.values())
    assert held < 0.1 * random.total  # a byte per weight as booleans
    # the same mask made from its booleans holds the same indices, and means the same
    again = ParamMask(random.masks, "random")
    for name in random.names:
        assert torch.equal(again.selections[name], random.selections[name])
        assert random.count_in(name) == int(random.boolean(name).sum())
        assert torch.equal(random.indices(name), random.boolean(name).flatten().nonzero().flatten())
    for combined, op in ((random | scope, torch.logical_or), (random & scope, torch.logical_and)):
        for name in random.names:
            expected = op(random.boolean(name), scope.boolean(name))
            assert torch.equal(combined.boolean(name), expected), name
    # per-head counts from indices equal the booleans' sums over each head's slice
    counts = random.counts(model.cfg.n_heads).scores
    for name in random.names:
        layer, matrix = int(name.split(".")[1]), name.split(".")[-1]
        if matrix in ("W_Q", "W_K", "W_V", "W_O"):
            start = ("W_K", "W_Q", "W_V", "W_O").index(matrix) * model.cfg.n_heads
            per_head = random.boolean(name).flatten(1).sum(-1).float()
            assert torch.equal(counts[layer, start : start + model.cfg.n_heads], per_head), name
    assert int(random.to_frame()["selected"].sum()) == random.count
    with pytest.raises(ValueError, match="sorted and distinct"):
        ParamMask.from_selections(
            {n: s.flip(0) for n, s in random.selections.items()}, random.shapes
        )
