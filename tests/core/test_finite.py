"""Finite or refused: every float hyperparameter is checked before any work, a model holding NaN
is never analyzed, and library errors reach the user as one clear error naming the file."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memloc_tl import EditConfig, load_model, localize, scan_memorization, sparse_edit
from memloc_tl.analysis import rare_token_attention
from memloc_tl.cli import main
from memloc_tl.core.backend import copy_model
from memloc_tl.core.files import CorruptFileError
from memloc_tl.core.paragraphs import Paragraphs
from memloc_tl.core.validation import _non_finite_count, check_finite_weights, check_real
from memloc_tl.editing import ParamMask
from memloc_tl.localization import InjectionConfig, LearnedMaskConfig
from memloc_tl.organism import Organism, OrganismConfig

FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, -1.0, 1e308, -1e308, math.inf, -math.inf, math.nan]),
)
EXAMPLES = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@EXAMPLES
@given(value=FLOATS)
def test_check_real_accepts_exactly_the_finite_numbers_in_range(value: float) -> None:
    valid = math.isfinite(value) and 0 < value <= 1e300
    if not valid:
        with pytest.raises(ValueError, match="lr must be"):
            check_real(value, "lr", above=0.0, at_most=1e300)
        return
    assert check_real(value, "lr", above=0.0, at_most=1e300) == value


@pytest.mark.parametrize("bad", [True, "0.1", None, [0.1]])
def test_check_real_refuses_what_is_not_a_number(bad: Any) -> None:
    with pytest.raises(TypeError, match="lr must be a real number"):
        check_real(bad, "lr")


@EXAMPLES
@given(lr=FLOATS, kl_weight=FLOATS, fraction=FLOATS)
def test_config_hyperparameters_are_finite_or_refused(
    lr: float, kl_weight: float, fraction: float
) -> None:
    for make in (
        lambda: InjectionConfig(lr=lr, kl_weight=kl_weight, fraction=fraction),
        lambda: LearnedMaskConfig(lr=lr, kl_weight=kl_weight, sparsity=fraction),
        lambda: OrganismConfig.tiny(lr=lr, weight_decay=kl_weight),
    ):
        try:
            config = make()
        except ValueError:
            continue
        values = [v for v in vars(config).values() if isinstance(v, float)]
        assert all(math.isfinite(v) for v in values), config
        assert config.lr > 0  # type: ignore[attr-defined]


def _no_forward(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count forward passes of ``model`` (the check must come before any)."""
    calls: list[int] = []
    forward = type(model).forward

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return forward(self, *args, **kwargs)

    # on the class for the test, so the model's own attributes stay as they were (`unchanged`)
    monkeypatch.setattr(type(model), "forward", counted)
    return calls


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"lr": math.inf}, "lr must be a finite number"),
        ({"lr": math.nan}, "lr must be a finite number"),
        ({"lr": -1e-3}, "lr must be > 0"),
        ({"nll_weight": math.nan}, "nll_weight must be a finite number"),
        ({"nll_weight": -1.0}, "nll_weight must be >= 0"),
        ({"fraction": 0.0}, "fraction must be in"),
        ({"fraction": 1e-9}, "selects none"),
        ({"steps": 0}, "steps must be >= 1"),
    ],
)
def test_sparse_edit_refuses_bad_hyperparameters_before_any_work(
    organism: Organism,
    settings_: dict[str, Any],
    message: str,
    unchanged: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = organism.model
    with unchanged(model):
        calls = _no_forward(model, monkeypatch)
        with pytest.raises(ValueError, match=message):
            sparse_edit(
                model,
                organism.planted[:1],
                keep=organism.control[:2],
                config=EditConfig(**settings_),
                progress=False,
            )
        assert calls == [], "the refusal came after a forward pass"


def test_a_mask_of_another_model_is_refused_before_any_work(
    organism: Organism, neo_checkpoint: Path, unchanged: Any
) -> None:
    other = load_model(neo_checkpoint, device="cpu")
    mask = ParamMask.random(other, fraction=0.01, seed=0)
    with unchanged(organism.model), pytest.raises(ValueError, match="a mask made for another"):
        sparse_edit(
            organism.model,
            organism.planted[:1],
            keep=organism.control[:2],
            config=EditConfig(mask=mask),
        )


def test_a_model_holding_nan_is_refused_and_accepted_again_once_repaired(
    organism: Organism,
) -> None:
    model = copy_model(organism.model)
    memorized = organism.planted[:2]
    before = scan_memorization(model, memorized, progress=False)  # checked once, then cached
    params = dict(model.named_parameters())
    param = next(p for n, p in params.items() if "attn" in n and p.ndim >= 2)
    saved = param.detach().clone()
    with torch.no_grad():
        param.view(-1)[3] = float("nan")
    for analysis in (
        lambda: scan_memorization(model, memorized, progress=False),
        lambda: localize(model, memorized[:1], method="zero_ablation", level="heads"),
        lambda: rare_token_attention(model, memorized, organism.corpus_counts, progress=False),
    ):
        with pytest.raises(ValueError, match=r"non-finite values in .*NaN or infinite"):
            analysis()
    with torch.no_grad():
        param.copy_(saved)
    after = scan_memorization(model, memorized, progress=False)
    assert torch.equal(after.exact_match, before.exact_match)


def test_paragraphs_longer_than_the_context_are_refused_by_localize(organism: Organism) -> None:
    n_ctx = organism.model.cfg.n_ctx
    tokens = torch.randint(0, organism.model.cfg.d_vocab, (1, n_ctx + 10))
    long = Paragraphs.from_tokens(tokens, prefix_len=n_ctx // 2)
    for method in ("zero_ablation", "gradient"):
        level = "heads" if method == "zero_ablation" else "weights"
        with pytest.raises(ValueError, match="exceed the model's context"):
            localize(organism.model, long, method=method, level=level)


def test_devices_this_machine_lacks_are_refused_before_loading(neo_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"cuda:99.*CUDA device"):
        load_model(neo_checkpoint, device="cuda:99")
    with pytest.raises(ValueError, match="is not a device"):
        load_model(neo_checkpoint, device="gpu")


def _copy(checkpoint: Path, tmp_path: Path, name: str) -> Path:
    directory = tmp_path / name
    shutil.copytree(checkpoint, directory)
    return directory


def test_damaged_or_mismatched_checkpoints_are_one_clear_error(
    neo_checkpoint: Path, tmp_path: Path
) -> None:
    truncated = _copy(neo_checkpoint, tmp_path, "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CorruptFileError, match=r"model\.safetensors.*truncated"):
        load_model(truncated)
    garbled = _copy(neo_checkpoint, tmp_path, "garbled")
    data = bytearray((garbled / "model.safetensors").read_bytes())
    data[9:20] = b"\xff" * 11  # inside the JSON header
    (garbled / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"model\.safetensors is not a readable"):
        load_model(garbled)
    huge = _copy(neo_checkpoint, tmp_path, "huge")
    config = json.loads((huge / "config.json").read_text())
    config["num_layers"] = 1_000_000
    config["attention_types"] = [[["global"], 1_000_000]]
    config["attention_layers"] = ["global"] * 1_000_000
    (huge / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"1000000 layers, the weights hold 4"):
        load_model(huge)  # at once: from the header, nothing is allocated
    wider = _copy(neo_checkpoint, tmp_path, "wider")
    config = json.loads((wider / "config.json").read_text())
    config["hidden_size"] = 48
    (wider / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do not fit its config\.json"):
        load_model(wider)
    pickled = _copy(neo_checkpoint, tmp_path, "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model\.bin\).*convert"):
        load_model(pickled)


def test_the_cli_refuses_non_finite_numbers_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "empty-cache"
    for value in ("nan", "inf", "-1", "0"):
        with pytest.raises(SystemExit) as exit_info:  # argparse: usage and exit code 2
            main(
                [
                    "report",
                    "--tiny",
                    "--cache-dir",
                    str(cache),
                    "--out",
                    str(tmp_path / "r.html"),
                    "--edit-lr",
                    value,
                ]
            )
        assert exit_info.value.code == 2
        assert "must be a finite number > 0" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    data = tmp_path / "c.jsonl"
    data.write_text('{"text": "x"}\n')
    for extra, message in [
        (["--out-dir", str(blocker / "sub")], "is not a directory"),
        (["--out-dir", str(tmp_path / "no" / "such")], "does not exist; create it first"),
        (["--out-dir", str(blocker)], "is a file"),
        (["--data", str(data), str(tmp_path / "t.txt"), "--out-dir", "o"], "a.txt"),
    ]:
        if "--data" not in extra:
            extra = ["--data", str(data), *extra]
        if extra[-1] == "o":
            (tmp_path / "t.txt").write_text("x")
            message = "all one kind"
        code = main(["scan", "--model", "organism", "--tiny", "--cache-dir", str(cache), *extra])
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith("memloc scan: error:"), err
        assert message in err, err
    assert not cache.exists()  # nothing was built for a refused command


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_finite_check_sees_every_bad_entry_and_no_overflow(dtype: torch.dtype) -> None:
    """A sum decides most tensors; a non-finite sum is checked entry by entry, in chunks."""
    big = torch.finfo(dtype).max
    overflowing = torch.full((1000,), big / 2, dtype=dtype)  # finite, but the sum is not
    assert not bool(torch.isfinite(overflowing.sum()))
    check_finite_weights([("w", overflowing)])  # accepted
    for bad in (math.nan, math.inf, -math.inf):
        tensor = torch.zeros(2_500, dtype=dtype)
        tensor[[0, 1_023, 1_024, 2_499]] = bad  # on both sides of a chunk boundary
        assert _non_finite_count(tensor, chunk=1_024) == 4
        assert _non_finite_count(tensor) == 4
        with pytest.raises(ValueError, match=r"non-finite values in w \(4 of 2500 entries"):
            check_finite_weights([("ok", torch.ones(3)), ("w", tensor)])
    check_finite_weights([("ints", torch.tensor([1, 2]))])  # not floating point: skipped
