"""Shared fixtures: a random GPT-Neo checkpoint, the tiny organism, and a model-unchanged check."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from memloc_tl.organism import (
    Organism,
    OrganismConfig,
    build_organism,
    corpus_texts,
    train_tokenizer,
)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The only tests that may skip in CI: they need what CI never has.
SKIPPABLE_IN_CI = ("needs_hub", "needs_gpu")


def pytest_report_header(config: pytest.Config) -> str:
    """Which TransformerLens this run tests, first thing in the output."""
    import importlib.metadata as metadata

    from memloc_tl.core.backend import tl_major

    backend = "HookedTransformer and TransformerBridge" if tl_major() < 4 else "TransformerBridge"
    return (
        f"memloc-tl: TransformerLens {metadata.version('transformer-lens')} ({backend}), "
        f"torch {torch.__version__}, CI={'yes' if IN_CI else 'no'}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI a skip is a failure unless the test needs the real weights or a GPU."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not (IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    if any(item.get_closest_marker(name) for name in SKIPPABLE_IN_CI):
        return
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = (
        f"skipped in CI ({reason}); in CI only tests marked {' or '.join(SKIPPABLE_IN_CI)} "
        "may skip: install what the test needs in .ci/run, or make the test apply here"
    )


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """A small BPE tokenizer trained on the organism corpus."""
    return train_tokenizer(corpus_texts(), vocab_size=512)


def random_neo(
    tokenizer: Any, *, attention: str = "alternating", seed: int = 0
) -> GPTNeoForCausalLM:
    """A random GPT-Neo with alternating global/local attention and a window of 8 tokens."""
    layers = {"alternating": [[["global", "local"], 2]], "global": [[["global"], 4]]}[attention]
    config = GPTNeoConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        hidden_size=32,
        num_layers=4,
        attention_types=layers,
        num_heads=4,
        window_size=8,
        bos_token_id=0,
        eos_token_id=0,
        architectures=["GPTNeoForCausalLM"],
    )
    torch.manual_seed(seed)
    model = GPTNeoForCausalLM(config).eval()
    # Random LayerNorm gains and biases, so that weight processing has something to fold.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="session")
def neo_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A random GPT-Neo saved as a Hugging Face checkpoint directory."""
    directory = tmp_path_factory.mktemp("neo-checkpoint")
    random_neo(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def organism_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per session, or shared between the runs of scripts/test.sh (MEMLOC_TEST_ORGANISM_CACHE)."""
    shared = os.environ.get("MEMLOC_TEST_ORGANISM_CACHE")
    if shared:
        return Path(shared)
    return tmp_path_factory.mktemp("organism-cache")


@pytest.fixture(scope="session")
def organism(organism_cache: Path) -> Organism:
    """The tiny organism, built once per test session (well under a minute)."""
    return build_organism(OrganismConfig.tiny(), cache_dir=organism_cache, progress=False)


@pytest.fixture(scope="session")
def default_organism(organism_cache: Path) -> Organism:
    """The default organism, what ``build_organism()`` gives a user: built once per
    scripts/test.sh (a few minutes on two cores), loaded from the shared cache after that."""
    return build_organism(cache_dir=organism_cache, progress=False)


def model_state(model: torch.nn.Module) -> dict[str, Any]:
    """Everything an analyzer must leave as it found it."""
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {
            k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()
        },
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "hooks": hooks,
        # the modules in place, and the functions modules keep (TransformerLens's act_fn)
        "modules": [(name, id(m)) for name, m in model.named_modules()],
        "functions": [
            (name, key, id(value))
            for name, m in model.named_modules()
            for key, value in vars(m).items()
            if callable(value) and not isinstance(value, torch.nn.Module)
        ],
        "training": model.training,
        "cfg": copy.deepcopy(getattr(model, "cfg", None)).__dict__
        if getattr(model, "cfg", None) is not None
        else None,
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["hooks"] == after["hooks"], "hooks were left on the model"
    assert before["modules"] == after["modules"], "a module was replaced"
    assert before["functions"] == after["functions"], "a module's function was replaced"
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"], "requires_grad flags changed"
    assert before["cfg"] == after["cfg"], "model cfg changed"
    for name, value in before["weights"].items():
        assert torch.equal(value, after["weights"][name]), f"weight {name} changed"
    for name, grad in before["grads"].items():
        other = after["grads"][name]
        assert (grad is None) == (other is None), f".grad of {name} changed"
        if grad is not None:
            assert torch.equal(grad, other)


@pytest.fixture
def unchanged() -> Callable[[torch.nn.Module], Any]:
    """``with unchanged(model): ...`` asserts the block leaves the model exactly as it was."""

    @contextmanager
    def check(model: torch.nn.Module) -> Iterator[None]:
        before = model_state(model)
        try:
            yield
        finally:
            assert_same_state(before, model_state(model))

    return check


def kill_9_when_ready(argv: list[str], ready: str, timeout: float = 60) -> int:
    """Start ``argv``, wait for the line ``ready`` on its stdout, SIGKILL it; return its pid."""
    import signal
    import subprocess

    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == ready
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=timeout)
    finally:
        process.kill()
    return process.pid
