"""An offline GPT-Neo "organism" trained to memorize known paragraphs.

GPT-Neo 125M's weights need the Hugging Face hub. Without it, memloc-tl builds a model whose
memorized paragraphs are known by construction: a GPT-Neo with 125M's layout scaled down
(alternating global/local attention with window 256, tied embeddings, no attention scaling),
trained on 100-token paragraphs of CPython's own documentation (``pydoc_data.topics``, real
English and code, present in every CPython) with a byte-level BPE tokenizer trained on the same
text. Like the paper's Pile paragraphs with their duplication counts, each training paragraph
has a repetition count:

- *planted* paragraphs are repeated many times per epoch, in tiers of decreasing count, so that
  fully, partly and not memorized paragraphs all occur;
- *control* paragraphs are in the training data once (like the paper's non-memorized
  paragraphs: trained on, not memorized);
- *held-out* paragraphs are never trained on;
- the remaining *background* paragraphs are in the data once.

The build is deterministic for a seed, checks its own acceptance (most top-tier planted
paragraphs at EM = 50, control mean EM low), and is cached as a standard Hugging Face checkpoint
directory plus ``manifest.json`` in the user's cache directory, keyed by its settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from memloc_tl.core.backend import HookedModel

if TYPE_CHECKING:
    from memloc_tl.checkpoints import CheckpointSeries
from memloc_tl.core.files import atomic_directory, read_json, save_safetensors, verify_checksums
from memloc_tl.core.paragraphs import Paragraphs, tokenizer_fingerprint
from memloc_tl.core.validation import check_config, check_device, check_real
from memloc_tl.memorization import MemorizationScan, scan_memorization, summarize
from memloc_tl.models import load_model

logger = logging.getLogger(__name__)

BUILD_VERSION = 5
"""Bumped whenever a change to the build changes what it produces (part of the cache key)."""

EOS_TOKEN = "<|endoftext|>"
MANIFEST = "manifest.json"
COUNTS_FILE = "corpus_token_counts.safetensors"
CHECKPOINTS = "checkpoints"
"""The subdirectory of the training checkpoints, one ``step-NNNNNN`` directory each."""
LOCK_WAIT_SECONDS = 3600
"""How long a builder waits for another process building the same organism."""


@dataclass(frozen=True)
class OrganismConfig:
    """Settings of an organism build; every field is part of the cache key.

    The default (4 layers, 8 heads, d_model 128, vocab 4096; 5 epochs in which 32 planted
    paragraphs appear 40 times, 16 appear 10 times and 16 appear 3 times among ~900 paragraphs
    that appear once) builds in about 5 minutes on two CPU cores (measured 292 s). Measured:
    all 32 of the top tier at EM = 50, the middle tier partly memorized (mean EM ~24), the
    bottom tier and the control set not (mean EM ~1.5 and ~0.5). :meth:`tiny` builds in about
    15 seconds, for tests.

    Few epochs matter: every background and control paragraph is seen once per epoch, and with
    18 epochs the default model memorized some of them too (control mean EM 13).
    """

    n_layers: int = 4
    n_heads: int = 8
    d_model: int = 128
    vocab_size: int = 4096
    n_ctx: int = 512
    window_size: int = 256
    prefix_len: int = 50
    continuation_len: int = 50
    planted_tiers: tuple[tuple[int, int], ...] = ((32, 40), (16, 10), (16, 3))
    """(number of paragraphs, repetitions per epoch) per tier, most repeated first."""
    n_control: int = 64
    n_heldout: int = 64
    n_background: int | None = None
    """Background paragraphs; ``None`` uses every paragraph left after the other sets."""
    epochs: int = 5
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_unique_fraction: float = 0.5
    seed: int = 0
    min_top_tier_memorized: float = 0.95
    """Acceptance: share of the most repeated tier that must reach EM = continuation_len."""
    max_control_mean_em: float = 5.0
    """Acceptance: the control set's mean EM must not exceed this."""
    n_checkpoints: int = 5
    """Training checkpoints kept, evenly spaced; the last one is the final model (0: none)."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.prefix_len + self.continuation_len > self.n_ctx:
            raise ValueError("a paragraph must fit in n_ctx")
        if not self.planted_tiers or any(n < 1 or r < 1 for n, r in self.planted_tiers):
            raise ValueError("planted_tiers must be non-empty (count, repetitions) pairs >= 1")
        object.__setattr__(
            self, "planted_tiers", tuple((int(n), int(r)) for n, r in self.planted_tiers)
        )
        check_real(self.lr, "lr", above=0.0)
        check_real(self.weight_decay, "weight_decay", at_least=0.0)
        check_real(self.min_unique_fraction, "min_unique_fraction", at_least=0.0, at_most=1.0)
        check_real(self.min_top_tier_memorized, "min_top_tier_memorized", at_least=0.0, at_most=1.0)
        check_real(self.max_control_mean_em, "max_control_mean_em", at_least=0.0)
        if (
            isinstance(self.n_checkpoints, bool)
            or not isinstance(self.n_checkpoints, int)
            or self.n_checkpoints < 0
        ):
            raise ValueError(f"n_checkpoints must be an int >= 0, got {self.n_checkpoints!r}")

    @classmethod
    def tiny(cls, **overrides: Any) -> OrganismConfig:
        """A small organism that builds in under a minute on two cores (the test fixture)."""
        settings: dict[str, Any] = {
            "n_layers": 2,
            "n_heads": 4,
            "d_model": 64,
            "vocab_size": 1024,
            "n_ctx": 256,
            "window_size": 64,
            "planted_tiers": ((8, 24), (4, 6), (4, 2)),
            "n_control": 16,
            "n_heldout": 16,
            "n_background": 160,
            "epochs": 14,
            "batch_size": 16,
            "lr": 3e-3,
            "warmup_steps": 20,
        }
        settings.update(overrides)
        return cls(**settings)

    @property
    def paragraph_len(self) -> int:
        return self.prefix_len + self.continuation_len

    def key(self) -> str:
        """Cache key: a hash of every setting and the build version."""
        blob = json.dumps({"version": BUILD_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Organism:
    """A built organism: the model and the paragraphs whose memorization is known.

    Attributes:
        model: the HookedTransformer, loaded from ``path`` through :func:`load_model`.
        tokenizer: its tokenizer.
        planted: planted paragraphs; meta ``repetitions`` (per epoch) and ``tier``.
        control: trained on once per epoch, expected not memorized.
        heldout: never trained on.
        corpus_counts: unigram counts over the whole training corpus (the documents and the
            EOS after each), ``[d_vocab]``.
        config: the build settings.
        path: the checkpoint directory.
        report: the build's own measurements (EM per set, acceptance, timings).
    """

    model: HookedModel
    tokenizer: Any
    planted: Paragraphs
    control: Paragraphs
    heldout: Paragraphs
    corpus_counts: Int[Tensor, " d_vocab"]
    config: OrganismConfig
    path: Path
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoints(self) -> CheckpointSeries:
        """The training checkpoints kept by the build (loaded one at a time, when iterated)."""
        from memloc_tl.checkpoints import CheckpointSeries

        directories = sorted((self.path / CHECKPOINTS).glob("step-*"))
        if not directories:
            raise ValueError(
                f"the organism at {self.path} kept no training checkpoints; build one with "
                "OrganismConfig(n_checkpoints=5)"
            )
        return CheckpointSeries.from_directories(
            directories, name=f"organism-{self.config.key()}", device=self.model.cfg.device
        )

    def scans(self, *, batch_size: int = 32) -> dict[str, MemorizationScan]:
        """Scan every planted tier, the control and the held-out set (see organism_scans)."""
        return organism_scans(
            self.model,
            self.planted,
            self.control,
            self.heldout,
            self.config.planted_tiers,
            batch_size=batch_size,
        )

    def __repr__(self) -> str:
        return (
            f"Organism(key={self.config.key()}, layers={self.config.n_layers}, "
            f"planted={len(self.planted)}, control={len(self.control)}, "
            f"heldout={len(self.heldout)}, path={str(self.path)!r})"
        )


def default_cache_dir() -> Path:
    """``$MEMLOC_TL_CACHE`` or the user's cache directory for memloc-tl."""
    env = os.environ.get("MEMLOC_TL_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("memloc-tl"))


def organism_dir(config: OrganismConfig, cache_dir: str | Path | None = None) -> Path:
    """Where the build of ``config`` lives in ``cache_dir`` (default :func:`default_cache_dir`)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"organism-{config.key()}"


def corpus_texts() -> list[str]:
    """CPython's documentation topics (``pydoc_data.topics``), in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``.

    Id 0 is ``<|endoftext|>``, GPT-Neo's BOS/EOS/pad token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=1 << 30,
    )


def _corpus_stream(texts: list[str], tokenizer: Any) -> Int[Tensor, " n_tokens"]:
    """The training corpus as one token stream: the documents, each followed by EOS."""
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    return torch.tensor(stream, dtype=torch.int64)


def _corpus_windows(stream: Tensor, config: OrganismConfig) -> Int[Tensor, "n_windows pos"]:
    """Non-overlapping windows of the stream, with the paper's unique-token filter."""
    n = len(stream) // config.paragraph_len
    windows = stream[: n * config.paragraph_len].view(n, config.paragraph_len)
    everything = Paragraphs.from_tokens(windows, prefix_len=config.prefix_len)
    return everything.keep_unique(config.min_unique_fraction).tokens


def _split(windows: Tensor, config: OrganismConfig, generator: torch.Generator) -> dict[str, Any]:
    order = torch.randperm(len(windows), generator=generator)
    n_planted = sum(n for n, _ in config.planted_tiers)
    needed = n_planted + config.n_control + config.n_heldout + (config.n_background or 0)
    if needed > len(windows):
        raise ValueError(
            f"the settings need {needed} paragraphs but the corpus has {len(windows)} windows "
            f"of {config.paragraph_len} tokens; lower the set sizes or the vocabulary"
        )
    sets: dict[str, Any] = {}
    start = 0
    for name, size in (
        ("planted", n_planted),
        ("control", config.n_control),
        ("heldout", config.n_heldout),
    ):
        sets[name] = order[start : start + size]
        start += size
    rest = order[start:]
    sets["background"] = rest if config.n_background is None else rest[: config.n_background]
    return sets


def _training_sequence(
    sets: dict[str, Tensor], config: OrganismConfig
) -> tuple[Tensor, list[int], list[int]]:
    """Window indices of one epoch (before shuffling), with per-planted repetitions and tiers."""
    planted = sets["planted"]
    repetitions: list[int] = []
    tiers: list[int] = []
    for tier, (count, reps) in enumerate(config.planted_tiers):
        repetitions += [reps] * count
        tiers += [tier] * count
    planted_repeated = torch.repeat_interleave(planted, torch.tensor(repetitions))
    epoch = torch.cat([sets["background"], sets["control"], planted_repeated])
    return epoch, repetitions, tiers


def _neo_config(config: OrganismConfig, tokenizer: Any) -> Any:
    from transformers import GPTNeoConfig

    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    return GPTNeoConfig(
        vocab_size=config.vocab_size,
        max_position_embeddings=config.n_ctx,
        hidden_size=config.d_model,
        num_layers=config.n_layers,
        attention_types=[[["global", "local"], math.ceil(config.n_layers / 2)]]
        if config.n_layers % 2 == 0
        else [[["global", "local"], config.n_layers // 2], [["global"], 1]],
        num_heads=config.n_heads,
        intermediate_size=None,
        window_size=config.window_size,
        activation_function="gelu_new",
        resid_dropout=0.0,
        embed_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        architectures=["GPTNeoForCausalLM"],
    )


def _train(
    windows: Tensor,
    epoch_indices: Tensor,
    config: OrganismConfig,
    tokenizer: Any,
    generator: torch.Generator,
    progress: bool,
) -> tuple[Any, dict[int, dict[str, Tensor]]]:
    """Train the model; also return its state at ``config.n_checkpoints`` evenly spaced steps."""
    from transformers import GPTNeoForCausalLM

    # Seed the initialization without disturbing the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = GPTNeoForCausalLM(_neo_config(config, tokenizer))
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95)
    )
    total = total_steps(len(epoch_indices), config)

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        fraction = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * fraction))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    keep_at = checkpoint_steps(total, config.n_checkpoints)
    kept: dict[int, dict[str, Tensor]] = {}
    step = 0
    bar = tqdm(total=total, desc="training organism", disable=not progress, unit="step")
    for _ in range(config.epochs):
        shuffled = epoch_indices[torch.randperm(len(epoch_indices), generator=generator)]
        for start in range(0, len(shuffled), config.batch_size):
            batch = windows[shuffled[start : start + config.batch_size]]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            if step in keep_at:
                kept[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval(), kept


def total_steps(epoch_size: int, config: OrganismConfig) -> int:
    """Optimizer steps of a build whose epochs hold ``epoch_size`` paragraphs."""
    return math.ceil(epoch_size / config.batch_size) * config.epochs


def checkpoint_steps(total: int, n: int) -> list[int]:
    """``n`` evenly spaced optimizer steps of ``total``, the last one ``total``."""
    return sorted({max(1, round(total * (i + 1) / n)) for i in range(n)}) if n else []


def _paragraph_sets(
    windows: Tensor,
    sets: dict[str, Tensor],
    repetitions: list[int],
    tiers: list[int],
    config: OrganismConfig,
    fingerprint: str,
) -> dict[str, Paragraphs]:
    def make(name: str, meta: dict[str, list[Any]] | None = None) -> Paragraphs:
        index = sets[name]
        return Paragraphs(
            tokens=windows[index],
            ids=tuple(f"{name}-{i}" for i in range(len(index))),
            prefix_len=config.prefix_len,
            meta={
                "window": tuple(int(i) for i in index),
                **{k: tuple(v) for k, v in (meta or {}).items()},
            },
            vocab_fingerprint=fingerprint,
        )

    return {
        "planted": make("planted", {"repetitions": repetitions, "tier": tiers}),
        "control": make("control", {"repetitions": [1] * len(sets["control"])}),
        "heldout": make("heldout", {"repetitions": [0] * len(sets["heldout"])}),
    }


def organism_scans(
    model: HookedModel,
    planted: Paragraphs,
    control: Paragraphs,
    heldout: Paragraphs,
    planted_tiers: tuple[tuple[int, int], ...],
    *,
    batch_size: int = 32,
) -> dict[str, MemorizationScan]:
    """Scans of each planted tier, the control and the held-out set, named by repetitions.

    Keys are ``"planted x40"``, ... (most repeated first), ``"control x1"``, ``"held-out x0"``.
    """
    tiers = torch.tensor(planted.meta["tier"])
    named = {
        f"planted x{repetitions}": planted.select(tiers == tier)
        for tier, (_, repetitions) in enumerate(planted_tiers)
    }
    named |= {"control x1": control, "held-out x0": heldout}
    return {
        name: scan_memorization(model, paragraphs, batch_size=batch_size, progress=False)
        for name, paragraphs in named.items()
    }


def _evaluate(
    model: HookedModel, paragraphs: dict[str, Paragraphs], config: OrganismConfig
) -> dict[str, Any]:
    scans = organism_scans(
        model,
        paragraphs["planted"],
        paragraphs["control"],
        paragraphs["heldout"],
        config.planted_tiers,
    )
    table = summarize(scans)
    sets = {row.pop("set"): row for row in table.to_dict(orient="records")}
    return {"sets": sets, "acceptance": acceptance(scans, config)}


def acceptance(scans: dict[str, MemorizationScan], config: OrganismConfig) -> dict[str, Any]:
    """The build's acceptance, measured on ``scans`` (:meth:`Organism.scans`): the share of the
    most repeated planted paragraphs at EM = 50 and the control set's mean EM."""
    top = next(iter(scans.values()))
    top_share = len(top.memorized()) / max(1, len(top))
    control_em = float(scans["control x1"].exact_match.float().mean())
    return {
        "top_tier_memorized_share": top_share,
        "control_mean_em": control_em,
        "passed": top_share >= config.min_top_tier_memorized
        and control_em <= config.max_control_mean_em,
    }


def build_organism(
    config: OrganismConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    rebuild: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Organism:
    """Build the organism, or load it from the cache if this configuration was built before.

    Args:
        config: build settings; default :class:`OrganismConfig` ().
        cache_dir: where builds are kept; default :func:`default_cache_dir`.
        rebuild: build again even if cached.
        device: device of the returned HookedTransformer (training runs on the CPU).
        progress: show a progress bar while training.

    Returns:
        The organism. ``organism.report["acceptance"]["passed"]`` says whether the build met
        its acceptance (a warning is logged when it did not).
    """
    config = check_config(config, OrganismConfig)
    check_device(device)  # before minutes of training, not after
    target = organism_dir(config, cache_dir)
    if (target / MANIFEST).is_file() and not rebuild:
        return _load(target, device=device, expected=config)
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    # One builder per configuration: the others wait here, then load its result.
    lock = FileLock(root / f".{target.name}.lock", timeout=LOCK_WAIT_SECONDS)
    with lock:
        if (target / MANIFEST).is_file() and not rebuild:
            return _load(target, device=device, expected=config)
        report = _build_into(target, config, device=device, progress=progress)
    acceptance = report["acceptance"]
    if acceptance["passed"]:
        logger.info("organism %s passed its acceptance: %s", config.key(), acceptance)
    else:
        logger.warning("organism %s missed its acceptance: %s", config.key(), acceptance)
    return _load(target, device=device, expected=config)


def _build_into(
    target: Path, config: OrganismConfig, *, device: str | torch.device | None, progress: bool
) -> dict[str, Any]:
    """Train, evaluate and write one organism to ``target`` (atomically, checksummed)."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    texts = corpus_texts()
    tokenizer = train_tokenizer(texts, config.vocab_size)
    stream = _corpus_stream(texts, tokenizer)
    windows = _corpus_windows(stream, config)
    sets = _split(windows, config, generator)
    epoch_indices, repetitions, tiers = _training_sequence(sets, config)
    hf_model, kept = _train(windows, epoch_indices, config, tokenizer, generator, progress)
    train_seconds = time.perf_counter() - started

    fingerprint = tokenizer_fingerprint(tokenizer)
    paragraphs = _paragraph_sets(windows, sets, repetitions, tiers, config, fingerprint)
    counts = torch.bincount(stream, minlength=config.vocab_size)

    # A temporary sibling renamed onto the target (files.atomic_directory): a crash never
    # leaves a half-written build; checksums.json, written last, lets every load verify it.
    with atomic_directory(target, replace=True) as staging:
        hf_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for step, state in kept.items():  # each a checkpoint directory load_model reads
            _save_checkpoint(hf_model, state, tokenizer, staging / CHECKPOINTS / f"step-{step:06d}")
        save_safetensors({"counts": counts.contiguous()}, staging / COUNTS_FILE)
        # Evaluate the saved checkpoint through load_model's local-directory path.
        report = _evaluate(load_model(staging, device=device), paragraphs, config)
        report["train_seconds"] = round(train_seconds, 1)
        report["n_windows"] = len(windows)
        report["n_background"] = len(sets["background"])
        report["epoch_size"] = len(epoch_indices)
        report["corpus_tokens"] = int(counts.sum())
        report["checkpoint_steps"] = sorted(kept)
        report["total_steps"] = total_steps(len(epoch_indices), config)
        manifest = {
            "build_version": BUILD_VERSION,
            "config": dataclasses.asdict(config),
            "vocab_fingerprint": fingerprint,
            "sets": {
                name: {"ids": list(p.ids), "tokens": p.tokens.tolist(), "meta": p.meta}
                for name, p in paragraphs.items()
            },
            "report": report,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest))
    return report


def _save_checkpoint(model: Any, state: dict[str, Tensor], tokenizer: Any, directory: Path) -> None:
    from transformers import GPTNeoForCausalLM

    snapshot = GPTNeoForCausalLM(model.config)
    snapshot.load_state_dict(state)
    snapshot.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def load_organism(
    path: str | Path | OrganismConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
) -> Organism:
    """Load a built organism from its directory, or the cached build of a configuration.

    Args:
        path: an organism directory, or an :class:`OrganismConfig` whose build is cached;
            default the default configuration.
        cache_dir: the cache for a configuration; default :func:`default_cache_dir`.
        device: device of the model.

    Raises:
        FileNotFoundError: not built yet; :func:`build_organism` builds it.
    """
    if path is None or isinstance(path, OrganismConfig):
        expected = path or OrganismConfig()
        return _load(organism_dir(expected, cache_dir), device=device, expected=expected)
    return _load(Path(path), device=device, expected=None)


def _load(
    directory: Path, *, device: str | torch.device | None, expected: OrganismConfig | None
) -> Organism:
    """Load the organism in ``directory``; with ``expected``, refuse a build of another config.

    A cache entry is found by its configuration's key; its manifest must hold that very
    configuration (an entry replaced by, or linked to, another build would otherwise be loaded
    as if it were the one asked for).
    """
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"no organism at {directory}; build it with memloc_tl.build_organism() "
            "(or run `memloc demo`)"
        )
    fix = "rebuild it with build_organism(rebuild=True) (or `memloc demo --rebuild`)"
    verify_checksums(directory, fix=fix, required=True)
    manifest = read_json(manifest_path, fix=fix)
    if manifest.get("build_version") != BUILD_VERSION:
        raise ValueError(
            f"{directory} was built by build version {manifest.get('build_version')}, this is "
            f"{BUILD_VERSION}; rebuild with build_organism(rebuild=True)"
        )
    from safetensors.torch import load_file

    config_dict = manifest["config"]
    config_dict["planted_tiers"] = tuple(tuple(t) for t in config_dict["planted_tiers"])
    config = OrganismConfig(**config_dict)
    if expected is not None and config != expected:
        differ = {
            f.name: (getattr(config, f.name), getattr(expected, f.name))
            for f in dataclasses.fields(OrganismConfig)
            if getattr(config, f.name) != getattr(expected, f.name)
        }
        raise ValueError(
            f"{directory} holds the build of another configuration (found vs asked: {differ}); "
            f"remove it or {fix}"
        )
    model = load_model(directory, device=device)
    sets = {
        name: Paragraphs(
            tokens=torch.tensor(data["tokens"], dtype=torch.int64),
            ids=tuple(data["ids"]),
            prefix_len=config.prefix_len,
            meta={k: tuple(v) for k, v in data["meta"].items()},
            vocab_fingerprint=manifest["vocab_fingerprint"],
        )
        for name, data in manifest["sets"].items()
    }
    return Organism(
        model=model,
        tokenizer=model.tokenizer,
        planted=sets["planted"],
        control=sets["control"],
        heldout=sets["heldout"],
        corpus_counts=load_file(str(directory / COUNTS_FILE))["counts"],
        config=config,
        path=directory,
        report=manifest["report"],
    )
