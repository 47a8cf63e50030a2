"""What every benchmark runs on: the organism or GPT-Neo 125M's layout, on a chosen device.

``--layout organism`` (default) uses the default organism (``--tiny``: the tiny one) and its
planted / control / held-out paragraphs. ``--layout gpt-neo-125m`` builds GPT-Neo 125M's
architecture (12 layers, d_model 768, 12 heads, alternating global/local attention, vocabulary
50257) with random weights as a local ``transformers`` checkpoint, since no hub is reachable,
and loads it through :func:`memloc_tl.load_model` like the real weights; its "planted" set is
the organism's planted texts, so memorization numbers on it are meaningless, only timings count.
``--layout gpt2-124m`` does the same with GPT-2 small's architecture (12 layers, d_model 768,
12 heads, learned positions up to 1024): on TransformerLens 4 its bridge computes attention
itself, where GPT-Neo's is Hugging Face's own.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memloc_tl import OrganismConfig, Paragraphs, build_organism, load_model
from memloc_tl.core import attention
from memloc_tl.core.backend import HookedModel, check_backend
from memloc_tl.organism import Organism

GPT_NEO_125M_VOCAB = 50257
LAYOUTS = ("organism", "gpt-neo-125m", "gpt2-124m")


@dataclass(frozen=True)
class Subject:
    """A model to time and three paragraph sets of it."""

    model: HookedModel
    planted: Paragraphs
    control: Paragraphs
    heldout: Paragraphs
    organism: Organism | None  # None for a layout with random weights
    label: str

    @property
    def everything(self) -> Paragraphs:
        return Paragraphs.concat(self.planted, self.control, self.heldout)


def add_subject_args(parser: argparse.ArgumentParser) -> None:
    """``--tiny``, ``--layout`` and ``--device``."""
    parser.add_argument("--tiny", action="store_true", help="use the tiny organism")
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="organism",
        help="the organism, or GPT-Neo 125M's (or GPT-2 small's) architecture, random weights",
    )
    parser.add_argument(
        "--backend",
        choices=["auto", "hooked", "bridge"],
        default="auto",
        help="HookedTransformer (TransformerLens 3) or TransformerBridge (default: as installed)",
    )
    parser.add_argument(
        "--attention",
        choices=["lean", "transformer-lens"],
        default="lean",
        help="memloc-tl's lean attention forward (the default) or TransformerLens's own "
        "(memloc_tl.core.attention.ENABLED = False), to compare the two",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device of the model (default: cuda if available)",
    )


def build_layout(layout: str, directory: Path, tokenizer: object) -> Path:
    """The random-weight checkpoint of ``--layout`` (not ``organism``), saved to ``directory``
    with ``tokenizer`` (seed 0: the same weights every time)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM

    cls: Any
    if layout == "gpt-neo-125m":
        cls, config = (
            GPTNeoForCausalLM,
            GPTNeoConfig(
                vocab_size=GPT_NEO_125M_VOCAB,
                max_position_embeddings=2048,
                hidden_size=768,
                num_layers=12,
                attention_types=[[["global", "local"], 6]],
                num_heads=12,
                window_size=256,
                architectures=["GPTNeoForCausalLM"],
            ),
        )
    elif layout == "gpt2-124m":
        # n_ctx as in the hub's config.json: TransformerLens 3 reads it
        hub_only: dict[str, Any] = {"n_ctx": 1024}
        cls, config = (
            GPT2LMHeadModel,
            GPT2Config(
                vocab_size=GPT_NEO_125M_VOCAB,
                n_positions=1024,
                n_embd=768,
                n_layer=12,
                n_head=12,
                architectures=["GPT2LMHeadModel"],
                **hub_only,
            ),
        )
    else:
        raise ValueError(f"unknown layout {layout!r}: pick one of {LAYOUTS[1:]}")
    torch.manual_seed(0)
    cls(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)  # type: ignore[attr-defined]
    return directory


def load_subject(args: argparse.Namespace) -> Subject:
    attention.ENABLED = getattr(args, "attention", "lean") == "lean"
    organism = build_organism(OrganismConfig.tiny() if args.tiny else OrganismConfig())
    backend = check_backend(getattr(args, "backend", "auto"))
    if args.layout == "organism":
        model = load_model(organism.path, device=args.device, backend=backend)
        return Subject(
            model, organism.planted, organism.control, organism.heldout, organism, "organism"
        )
    with tempfile.TemporaryDirectory() as directory:
        path = build_layout(args.layout, Path(directory), organism.model.tokenizer)
        model = load_model(path, device=args.device, backend=backend)
    label = {"gpt-neo-125m": "GPT-Neo 125M", "gpt2-124m": "GPT-2 124M"}[args.layout]
    return Subject(
        model,
        organism.planted,
        organism.control,
        organism.heldout,
        None,
        f"{label} layout (random weights)",
    )


def describe(subject: Subject) -> str:
    cfg = subject.model.cfg
    on_gpu = "cuda" in str(cfg.device)
    card = torch.cuda.get_device_name(cfg.device) if on_gpu else "CPU"
    return (
        f"{subject.label} ({type(subject.model).__name__}): {cfg.n_layers} layers x "
        f"{cfg.n_heads} heads, d_model {cfg.d_model}, "
        f"d_vocab {cfg.d_vocab}; device {cfg.device} ({card}), "
        f"torch threads {torch.get_num_threads()}, "
        f"attention forward: {'lean' if attention.ENABLED else 'TransformerLens'}"
    )


def synchronize() -> None:
    """Wait for queued GPU work, so that a wall-clock time covers it (no-op on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def model_bytes(model: HookedModel) -> int:
    """Bytes of the model's parameters and buffers (one copy of the model)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def peak_memory(run: Callable[[], object], device: torch.device | str) -> tuple[int, object]:
    """Bytes above the level at the call that ``run()`` needed at its peak, and its value.

    On a GPU, the CUDA allocator's peak; on the CPU, the process's resident memory sampled every
    millisecond by a thread (a lower bound of the true peak, within a few MB). On the CPU the
    process must run under :func:`exact_cpu_memory`, or memory freed earlier and kept by the C
    allocator hides part of the peak.
    """
    if "cuda" in str(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        value = run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, value
    import psutil

    process = psutil.Process()
    start = process.memory_info().rss
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        value = run()
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    return peak[0] - start, value


def exact_cpu_memory() -> None:
    """Re-run this process with glibc's mmap threshold fixed, so that every large tensor is
    returned to the system when freed and the resident memory is what is in use.

    (glibc raises the threshold after a large free, and later tensors of that size then come
    from a heap that does not shrink: a peak measured after another would read low.)
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "131072":
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


MATMUL = 2048
"""The side of the dense fp32 matmul whose FLOP/s stands for the device's attainable rate."""


def block_flops(cfg: object, queries: int, keys: int) -> float:
    """FLOPs (2 per multiply-add) of one block for ``queries`` positions attending over
    ``keys``: the attention projections, scores and mixing, and the MLP."""
    d, mlp = cfg.d_model, cfg.d_mlp  # type: ignore[attr-defined]
    return 2.0 * queries * (4 * d * d + 2 * d * mlp + 2 * keys * d)


def unembed_flops(cfg: object, positions: int) -> float:
    """FLOPs of the unembedding at ``positions`` positions."""
    return 2.0 * positions * cfg.d_model * cfg.d_vocab  # type: ignore[attr-defined]


def scan_flops(cfg: object, n: int, seq: int, continuation: int) -> float:
    """FLOPs of a teacher-forced scan: every block at every position, plus ``ln_final`` and the
    unembedding at the continuation positions only (what ``scan_memorization`` computes)."""
    layers = cfg.n_layers  # type: ignore[attr-defined]
    return n * (layers * block_flops(cfg, seq, seq) + unembed_flops(cfg, continuation))


def matmul_flops_per_second(device: object, repeats: int = 5) -> float:
    """FLOP/s of a dense fp32 matmul on ``device``, best of ``repeats`` (the attainable rate)."""
    a = torch.randn(MATMUL, MATMUL, device=device)  # type: ignore[arg-type]
    b = torch.randn(MATMUL, MATMUL, device=device)  # type: ignore[arg-type]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        _ = a @ b
        synchronize()
        best = min(best, time.perf_counter() - started)
    return 2.0 * MATMUL**3 / best


def attainable_rate(device: object) -> tuple[float, str]:
    """The dense-matmul FLOP/s of ``device`` (the rate a limit assumes) and how to say it."""
    rate = matmul_flops_per_second(device)
    return rate, f"a dense {MATMUL}x{MATMUL} fp32 matmul here: {rate / 1e9:.1f} GFLOP/s"
