"""sparse_edit: sparse by construction, reversible, seeded, and the gradient mask beats random."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from memloc_tl.analysis import contrastive_gradients, perturb_prefixes
from memloc_tl.analysis.gradients import attributed_parameters
from memloc_tl.core.backend import copy_model, tl_major
from memloc_tl.core.objectives import attributed_weights
from memloc_tl.editing import (
    EditConfig,
    EvalSets,
    ParamMask,
    WeightEdit,
    compare_edits,
    sparse_edit,
)
from memloc_tl.organism import Organism

FAST = EditConfig(steps=4, lr=3e-2)


@pytest.fixture(scope="module")
def sets(organism: Organism) -> dict[str, Any]:
    return {
        "memorized": organism.planted[[0, 1]],
        "keep": organism.control[list(range(6))],
        "heldout": organism.control[list(range(6, 12))],
    }


def weights(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in attributed_parameters(model).items()}


def test_sparse_and_the_callers_model_untouched(
    organism: Organism, sets: dict[str, Any], unchanged: Any
) -> None:
    model = organism.model
    original = weights(model)
    everything = {n: p.detach().clone() for n, p in model.named_parameters()}
    with unchanged(model):  # trained in the model itself, then taken out bit for bit
        result = sparse_edit(
            model, sets["memorized"], keep=sets["keep"], config=FAST, progress=False
        )
    assert not hasattr(result, "model")  # the result holds the change, not a copy
    total = sum(p.numel() for p in original.values())
    assert result.mask.count == math.floor(0.001 * total)
    with result.applied(model):
        edited = weights(model)
        edited_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    changed = 0
    for name, mask in result.mask.masks.items():
        assert torch.equal(edited[name][~mask], original[name][~mask]), name
        changed += int((edited[name][mask] != original[name][mask]).sum())
    assert changed > 0
    # everything else in the model (embeddings, biases, LayerNorm) is untouched too
    holding = {id(w.param) for w in attributed_weights(model).values()}
    for name, param in model.named_parameters():
        if id(param) not in holding:
            assert torch.equal(edited_params[name], everything[name]), name


@pytest.mark.parametrize("batch_size", [16, 4])
def test_gradient_mask_is_the_first_step_objective_gradient(
    organism: Organism, sets: dict[str, Any], batch_size: int
) -> None:
    """Whether the mask's gradient is taken in one backward pass (every set fits a batch of 16)
    or accumulated over batches (4), it is the objective's gradient at the first step."""
    model = organism.model
    one_step = EditConfig(steps=1, lr=1e-3, batch_size=batch_size)
    result = sparse_edit(
        model, sets["memorized"], keep=sets["keep"], config=one_step, progress=False
    )
    grads = contrastive_gradients(
        model, sets["memorized"], sets["keep"], nll_weight=1.0, batch_size=batch_size
    )
    expected = ParamMask.from_gradients(grads, fraction=0.001)
    overlap = (result.mask & expected).count
    assert overlap >= 0.98 * expected.count  # equal up to near-ties in |gradient|


def test_revert_apply_save_load_and_determinism(
    organism: Organism, sets: dict[str, Any], tmp_path: Path
) -> None:
    model = organism.model
    original = weights(model)
    seeded = EditConfig(mask="random", seed=3, steps=4, lr=3e-2)
    first = sparse_edit(model, sets["memorized"], keep=sets["keep"], config=seeded, progress=False)
    second = sparse_edit(model, sets["memorized"], keep=sets["keep"], config=seeded, progress=False)
    with first.applied(model):
        edited = weights(model)
    with second.applied(model):
        for name in original:
            assert torch.equal(edited[name], weights(model)[name])
    path = tmp_path / "edit.safetensors"
    first.edit.save(path)
    assert not path.with_name(path.name + ".partial").exists()
    loaded = WeightEdit.load(path)
    assert repr(loaded).startswith(f"WeightEdit({first.mask.count} weights in ")
    fresh = copy_model(model)  # a second copy of the unedited model
    loaded.apply(fresh)
    for name, value in edited.items():
        assert torch.equal(weights(fresh)[name], value)
    first.revert(fresh)
    for name, value in original.items():
        assert torch.equal(weights(fresh)[name], value)


def test_inplace_edits_the_model_and_reverts_exactly(
    organism: Organism, sets: dict[str, Any]
) -> None:
    model = organism.model
    original = weights(model)
    result = sparse_edit(
        model, sets["memorized"], keep=sets["keep"], config=FAST, inplace=True, progress=False
    )
    try:
        assert any(not torch.equal(weights(model)[n], v) for n, v in original.items())
        assert all(p.grad is None for p in model.parameters())
    finally:
        result.revert(model)
    for name, value in original.items():
        assert torch.equal(weights(model)[name], value)


def test_the_reference_code_preset_stays_sparse(organism: Organism, sets: dict[str, Any]) -> None:
    """Coupled weight decay 1.0 moved every weight in the reference code; not here."""
    model = organism.model
    original = weights(model)
    config = EditConfig.reference_code(lr=1e-2)
    assert (config.steps, config.nll_weight, config.weight_decay, config.lr) == (5, 0.1, 1.0, 1e-2)
    result = sparse_edit(model, sets["memorized"], keep=sets["keep"], config=config, progress=False)
    assert len(result.losses) == 5
    with result.applied(model):
        for name, mask in result.mask.masks.items():
            assert torch.equal(weights(model)[name][~mask], original[name][~mask])


def test_gradient_mask_unlearns_far_more_than_random(
    organism: Organism, sets: dict[str, Any]
) -> None:
    table, results = compare_edits(
        organism.model,
        sets["memorized"],
        keep=sets["keep"],
        masks=("gradient", "random"),
        config=EditConfig(fraction=0.01, steps=10, lr=3e-2),
        evaluate_on=EvalSets(heldout=sets["heldout"], general=organism.heldout),
        progress=False,
    )
    gradient_before, gradient_after = results["gradient"].metric("edited", "mean_em")
    _, random_after = results["random"].metric("edited", "mean_em")
    assert gradient_before == 50
    assert gradient_after < random_after - 20
    assert results["gradient"].mask.count == results["random"].mask.count
    assert set(table["mask"]) == {"gradient", "random"}
    ppl_before, ppl_after = results["gradient"].metric("general", "perplexity")
    assert ppl_after < 2 * ppl_before


def test_edit_objective_teaches_the_target(organism: Organism, sets: dict[str, Any]) -> None:
    model = organism.model
    memorized = sets["memorized"]
    target = perturb_prefixes(model, memorized, progress=False).perturbed
    assert target is not None
    result = sparse_edit(
        model,
        memorized,
        keep=sets["keep"],
        target=target,
        config=EditConfig(objective="edit", fraction=0.01, steps=10, lr=3e-2),
        progress=False,
    )
    before, after = result.metric("target", "mean_nll")
    assert after < before
    with pytest.raises(ValueError, match="needs target"):
        sparse_edit(model, memorized, keep=sets["keep"], config=EditConfig(objective="edit"))
    with pytest.raises(ValueError, match="objective"):
        EditConfig(objective="forget")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask"):
        EditConfig(mask="top")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="EditConfig"):
        sparse_edit(model, memorized, keep=sets["keep"], config={"steps": 1})  # type: ignore[arg-type]


@pytest.mark.backend  # differs on TransformerLens 4
def test_edited_model_saves_and_reloads_with_load_model(
    organism: Organism, sets: dict[str, Any], tmp_path: Path, unchanged: Any
) -> None:
    from memloc_tl.models import load_model, save_hooked_model

    model = organism.model
    result = sparse_edit(model, sets["memorized"], keep=sets["keep"], config=FAST, progress=False)
    tokens = sets["memorized"].tokens
    if tl_major() >= 4:  # a bridge saves the edit and applies it to the reloaded model
        with pytest.raises(TypeError, match=r"edit\.save"), result.applied(model):
            save_hooked_model(model, tmp_path / "edited")
        result.edit.save(tmp_path / "edit.safetensors")
        reloaded = load_model(organism.path, device="cpu")
        WeightEdit.load(tmp_path / "edit.safetensors").apply(reloaded)
        with torch.no_grad(), result.applied(model):
            assert torch.equal(reloaded(tokens), model(tokens))
        return
    with result.applied(model):
        with unchanged(model):
            directory = save_hooked_model(model, tmp_path / "edited")
        reloaded = load_model(directory, device="cpu")
        for name, value in model.state_dict().items():
            assert torch.equal(reloaded.state_dict()[name], value), name
        with torch.no_grad():
            assert torch.equal(reloaded(tokens), model(tokens))
        with pytest.raises(FileExistsError):
            save_hooked_model(model, directory)


def test_edit_reports_the_other_memorized_paragraphs(
    organism: Organism, sets: dict[str, Any]
) -> None:
    """Specificity: the evaluation scores other memorized paragraphs, checked by a scan."""
    from memloc_tl.memorization import scan_memorization

    others = organism.planted[[2, 3, 4, 5]]
    result = sparse_edit(
        organism.model,
        sets["memorized"],
        keep=sets["keep"],
        config=FAST,
        evaluate_on=EvalSets(others=others),
        progress=False,
    )
    before, after = result.metric("others", "mean_em")
    assert before == float(
        scan_memorization(organism.model, others, progress=False).exact_match.float().mean()
    )
    with result.applied(organism.model):
        scan = scan_memorization(organism.model, others, progress=False)
    assert after == float(scan.exact_match.float().mean())
    share_before, _ = result.metric("others", "memorized_share")
    assert share_before == 1.0
    assert "other memorized" in repr(result)


@pytest.mark.parametrize("inplace", [True, False])
def test_an_edit_interrupted_in_its_evaluation_leaves_the_model_as_it_was(
    organism: Organism, sets: dict[str, Any], monkeypatch: pytest.MonkeyPatch, inplace: bool
) -> None:
    module = importlib.import_module("memloc_tl.editing.sparse_edit")
    model = organism.model
    original = weights(model)
    marker = torch.full_like(model.W_E, 7.0)
    model.W_E.grad = marker  # the caller's own gradient must survive the call
    calls = {"n": 0}
    evaluate = module._evaluate

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # the evaluation after training
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(module, "_evaluate", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            sparse_edit(
                model,
                sets["memorized"],
                keep=sets["keep"],
                config=FAST,
                inplace=True,
                progress=False,
            )
        assert calls["n"] == 2
        for name, value in original.items():
            assert torch.equal(weights(model)[name], value), name
        assert model.W_E.grad is marker
    finally:
        model.W_E.grad = None


def test_an_edit_applied_as_a_scope_is_gone_on_exit_also_on_error(
    organism: Organism, sets: dict[str, Any], unchanged: Any
) -> None:
    model = organism.model
    result = sparse_edit(model, sets["memorized"], keep=sets["keep"], config=FAST, progress=False)
    tokens = sets["memorized"].tokens
    with torch.no_grad():
        result.edit.apply(model)
        edited_logits = model(tokens)
        result.revert(model)
    with unchanged(model):
        with result.edit.applied(model) as inside, torch.no_grad():
            assert inside is model  # no copy
            assert torch.equal(model(tokens), edited_logits)
        with pytest.raises(KeyboardInterrupt), result.edit.applied(model):
            raise KeyboardInterrupt
    other = copy_model(organism.model)
    with torch.no_grad():
        next(iter(other.parameters())).mul_(1.5)  # not the model the edit was made on
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with result.edit.applied(other):
        pass
    for name, value in other.state_dict().items():  # its own values came back, not `before`'s
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("keep", [False, True])
def test_training_in_place_takes_the_change_out_unless_kept_and_always_on_error(
    organism: Organism, keep: bool
) -> None:
    from memloc_tl.editing.weight_edit import trained_in_place

    model = organism.model
    original = weights(model)
    mask = ParamMask.random(model, fraction=0.01, seed=0)
    name = next(n for n, m in mask.masks.items() if bool(m.any()))
    marker = torch.full_like(model.W_E, 3.0)
    model.W_E.grad = marker
    try:
        with trained_in_place(model, mask, keep=keep) as run:
            with torch.no_grad():
                run.params[name][mask.masks[name]] += 1.0  # what a masked step would do
            model.W_E.grad = None
            edit = run.edit()
        assert model.W_E.grad is marker  # the caller's gradient came back
        changed = not torch.equal(weights(model)[name], original[name])
        assert changed == keep
        assert torch.equal(edit.after[name], edit.before[name] + 1.0)
        if keep:
            edit.revert(model)

        def interrupted() -> None:
            with trained_in_place(model, mask, keep=True) as run, torch.no_grad():
                run.params[name][mask.masks[name]] += 1.0
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            interrupted()
        for key, value in original.items():  # also a kept edit is taken out on an error
            assert torch.equal(weights(model)[key], value), key
    finally:
        model.W_E.grad = None


def test_before_after_keeps_the_measured_order_and_marks_one_sided_rows() -> None:
    import pandas as pd

    from memloc_tl.editing.sparse_edit import before_after

    keys = {"set": ["edited", "edited", "general"], "metric": ["mean_em", "mean_nll", "ppl"]}
    before = pd.DataFrame({**keys, "value": [50.0, 0.1, 9.0]})
    after = pd.DataFrame(
        {
            "set": ["edited", "general", "edited", "heldout"],
            "metric": ["mean_nll", "ppl", "mean_em", "kl_to_original"],
            "value": [3.0, 9.5, 4.0, 0.2],
        }
    )
    table = before_after(before, after)
    assert table["set"].tolist() == ["edited", "edited", "general", "heldout"]
    assert table["metric"].tolist() == ["mean_em", "mean_nll", "ppl", "kl_to_original"]
    assert table["before"].tolist()[:3] == [50.0, 0.1, 9.0]
    assert table["after"].tolist() == [4.0, 3.0, 9.5, 0.2]
    assert math.isnan(table["before"].iloc[3])


@pytest.mark.parametrize("mask", ["random", "gradient"])
def test_a_recomputed_kl_reference_trains_and_measures_as_a_stored_one(
    organism: Organism, sets: dict[str, Any], mask: str
) -> None:
    """Recomputing theta_0's log-probabilities at each step (the originals put back for that
    forward, the unembedding a chunk at a time) is the stored reference to float rounding: the
    same losses, the same weights. Were the reference taken from the trained model, its KL
    would be 0 at every step and the losses would differ from the stored run's after the
    first step."""
    model = organism.model
    original = weights(model)
    runs = {}
    for reference in ("stored", "recomputed"):
        config = EditConfig(mask=mask, steps=3, lr=3e-2, batch_size=4, kl_reference=reference)
        runs[reference] = sparse_edit(
            model,
            sets["memorized"],
            keep=sets["keep"],
            config=config,
            evaluate_on=EvalSets(heldout=sets["heldout"]),
            progress=False,
        )
    stored, recomputed = runs["stored"], runs["recomputed"]
    assert recomputed.losses == pytest.approx(stored.losses, rel=1e-5)
    assert stored.losses[1] != pytest.approx(stored.losses[0], rel=1e-3)
    for name in stored.edit.mask.names:
        torch.testing.assert_close(
            recomputed.edit.after[name], stored.edit.after[name], rtol=1e-5, atol=1e-6
        )
    kl_stored = stored.metric("heldout", "kl_to_original")[1]
    kl_recomputed = recomputed.metric("heldout", "kl_to_original")[1]
    assert kl_stored > 0
    assert kl_recomputed == pytest.approx(kl_stored, rel=1e-6)
    for name, value in original.items():  # both taken out again
        assert torch.equal(weights(model)[name], value), name


def test_the_originals_are_in_the_model_only_inside_original_values(organism: Organism) -> None:
    from memloc_tl.editing.weight_edit import trained_in_place

    model = organism.model
    original = weights(model)
    mask = ParamMask.random(model, fraction=0.01, seed=1)
    name = next(n for n, m in mask.masks.items() if bool(m.any()))
    with trained_in_place(model, mask) as run:
        with torch.no_grad():
            run.params[name][mask.masks[name]] += 1.0
        trained = weights(model)
        with run.original_values():
            for key, value in original.items():
                assert torch.equal(weights(model)[key], value), key
        assert torch.equal(weights(model)[name], trained[name])
        with pytest.raises(RuntimeError, match="boom"), run.original_values():
            raise RuntimeError("boom")
        assert torch.equal(weights(model)[name], trained[name])  # also after an error
    assert torch.equal(weights(model)[name], original[name])


def test_kl_reference_is_checked() -> None:
    with pytest.raises(ValueError, match="kl_reference"):
        EditConfig(kl_reference="cached")  # type: ignore[arg-type]
