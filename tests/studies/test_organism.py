"""The organism: it memorizes what was planted, not the control set; cached and deterministic."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memloc_tl.organism as organism_module
from memloc_tl.core.files import CorruptFileError
from memloc_tl.memorization import scan_memorization
from memloc_tl.organism import (
    COUNTS_FILE,
    MANIFEST,
    Organism,
    OrganismConfig,
    build_organism,
    load_organism,
)
from tests.conftest import kill_9_when_ready


def test_tiny_organism_meets_its_acceptance(organism: Organism) -> None:
    planted = scan_memorization(organism.model, organism.planted, progress=False)
    control = scan_memorization(organism.model, organism.control, progress=False)
    heldout = scan_memorization(organism.model, organism.heldout, progress=False)
    tiers = torch.tensor(organism.planted.meta["tier"])
    top = planted.exact_match[tiers == 0]
    assert (top == 50).float().mean() >= 0.95
    assert control.exact_match.float().mean() <= 5
    assert heldout.exact_match.float().mean() <= 5
    # More repetitions, more memorization: fully, partly and not memorized all occur.
    tier_means = [float(planted.exact_match[tiers == t].float().mean()) for t in range(3)]
    assert tier_means == sorted(tier_means, reverse=True)
    assert float(planted.exact_match[tiers == 2].float().mean()) < 50
    # The build's own report agrees with an independent scan.
    report = organism.report
    assert report["acceptance"]["passed"] is True
    planted_memorized = sum(
        entry["memorized"] for name, entry in report["sets"].items() if name.startswith("planted")
    )
    assert planted_memorized == int((planted.exact_match == 50).sum())
    assert report["sets"]["control x1"]["mean_em"] == pytest.approx(
        float(control.exact_match.float().mean())
    )


def test_sets_are_disjoint_windows_of_the_corpus(organism: Organism) -> None:
    windows = [
        set(p.meta["window"]) for p in (organism.planted, organism.control, organism.heldout)
    ]
    assert not windows[0] & windows[1]
    assert not windows[0] & windows[2]
    assert not windows[1] & windows[2]
    assert organism.planted.meta["repetitions"][0] == organism.config.planted_tiers[0][1]
    assert set(organism.control.meta["repetitions"]) == {1}
    assert set(organism.heldout.meta["repetitions"]) == {0}
    # corpus counts cover every token the organism was trained on
    for paragraphs in (organism.planted, organism.control, organism.heldout):
        assert (organism.corpus_counts[paragraphs.tokens] > 0).all()
    assert organism.corpus_counts.shape == (organism.model.cfg.d_vocab,)


def test_checkpoint_is_standard_and_cached(
    organism: Organism, organism_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (organism.path / "config.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(organism.path, local_files_only=True).eval()
    assert hf.config.tie_word_embeddings
    assert hf.config.attention_layers == ["global", "local"]
    assert len(AutoTokenizer.from_pretrained(organism.path)) == organism.config.vocab_size
    manifest = json.loads((organism.path / MANIFEST).read_text())
    assert manifest["sets"]["planted"]["tokens"] == organism.planted.tokens.tolist()

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached organism was trained again")

    monkeypatch.setattr(organism_module, "_train", no_training)
    again = build_organism(OrganismConfig.tiny(), cache_dir=organism_cache, progress=False)
    assert again.path == organism.path
    assert torch.equal(again.planted.tokens, organism.planted.tokens)
    loaded = load_organism(OrganismConfig.tiny(), cache_dir=organism_cache)
    for name, value in organism.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value)


def test_build_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    micro = OrganismConfig.tiny(
        planted_tiers=((2, 2),),
        n_control=2,
        n_heldout=2,
        n_background=16,
        epochs=1,
        vocab_size=300,
        min_top_tier_memorized=0.0,
        max_control_mean_em=50.0,
    )
    first = build_organism(micro, cache_dir=tmp_path / "a", progress=False)
    second = build_organism(micro, cache_dir=tmp_path / "b", progress=False)
    other_seed = build_organism(
        OrganismConfig(**{**micro.__dict__, "seed": 1}), cache_dir=tmp_path / "c", progress=False
    )
    assert torch.equal(first.planted.tokens, second.planted.tokens)
    for name, value in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], value), name
    assert not torch.equal(first.planted.tokens, other_seed.planted.tokens)
    # nothing half-written is left beside the builds (only the builders' lock file)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [f".{first.path.name}.lock", first.path.name]


def test_missing_organism_and_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="build_organism"):
        load_organism(tmp_path)
    with pytest.raises(ValueError, match="divisible"):
        OrganismConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="need"):
        build_organism(
            OrganismConfig.tiny(n_background=100_000), cache_dir=tmp_path, progress=False
        )
    assert all(p.name.endswith(".lock") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_default_organism_meets_the_acceptance(default_organism: Organism) -> None:
    """The default build memorizes what it should (its time: benchmarks/organism.py).

    Built once per `scripts/test.sh` (the shared organism cache): the TransformerLens 4 run
    loads the first run's build and checks it on its own backend with a scan of its own.
    """
    organism = default_organism
    assert organism.report["acceptance"]["passed"], organism.report
    tiers = torch.tensor(organism.planted.meta["tier"])
    top = scan_memorization(organism.model, organism.planted.select(tiers == 0), progress=False)
    control = scan_memorization(organism.model, organism.control, progress=False)
    config = organism.config
    assert float((top.exact_match == 50).float().mean()) >= config.min_top_tier_memorized
    assert float(control.exact_match.float().mean()) <= config.max_control_mean_em


MICRO = {
    "planted_tiers": ((2, 2),),
    "n_control": 2,
    "n_heldout": 2,
    "n_background": 16,
    "epochs": 1,
    "vocab_size": 300,
    "min_top_tier_memorized": 0.0,
    "max_control_mean_em": 50.0,
}

BUILDER = """
import sys, time
import memloc_tl.organism as module
from memloc_tl import OrganismConfig, build_organism

train = module._train

def counted(*args, **kwargs):
    print("trained", flush=True)
    time.sleep(2)  # a slow build, so that the others arrive while it runs
    return train(*args, **kwargs)

module._train = counted
config = OrganismConfig.tiny(**{MICRO!r})
organism = build_organism(config, cache_dir=sys.argv[1], progress=False)
print("loaded", organism.path.name, flush=True)
"""


def test_concurrent_builders_train_once_and_all_load_the_result(tmp_path: Path) -> None:
    script = BUILDER.replace("{MICRO!r}", repr(MICRO))
    builders = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [b.communicate(timeout=600) for b in builders]
    assert [b.returncode for b in builders] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    lines = [line for out, _ in outputs for line in out.splitlines()]
    assert lines.count("trained") == 1
    loaded = {line for line in lines if line.startswith("loaded")}
    assert len(loaded) == 1
    names = sorted(p.name for p in tmp_path.iterdir())
    organism_dir = loaded.pop().split()[1]
    assert names == [f".{organism_dir}.lock", organism_dir]
    mode = (tmp_path / organism_dir).stat().st_mode
    assert mode & stat.S_IRGRP  # a shared cache is group-readable
    assert mode & stat.S_IXGRP


def test_a_corrupted_cache_is_an_error_naming_the_file_and_the_fix(
    organism: Organism, tmp_path: Path
) -> None:
    copy = tmp_path / organism.path.name
    shutil.copytree(organism.path, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"model\.safetensors.*rebuild=True"):
        load_organism(copy)
    shutil.copy(organism.path / "model.safetensors", weights)
    load_organism(copy)  # restored: loads again
    (copy / MANIFEST).write_text((copy / MANIFEST).read_text()[:100])  # truncated
    with pytest.raises(CorruptFileError, match=r"manifest\.json.*rebuild=True"):
        load_organism(copy)
    assert not (organism.path / COUNTS_FILE).name.endswith(".pt")  # no pickle to torch.load


KILLED_BUILDER = """
import sys, time
import memloc_tl.organism as module
from memloc_tl import OrganismConfig, build_organism

def stalled(*args, **kwargs):
    print("writing", flush=True)  # the checkpoint is half written into the staging directory
    time.sleep(600)

module._evaluate = stalled
build_organism(OrganismConfig.tiny(**{MICRO!r}), cache_dir=sys.argv[1], progress=False)
"""


def test_kill_9_during_a_build_leaves_no_organism_and_the_next_build_recovers(
    tmp_path: Path,
) -> None:
    script = KILLED_BUILDER.replace("{MICRO!r}", repr(MICRO))
    kill_9_when_ready([sys.executable, "-c", script, str(tmp_path)], "writing")
    config = OrganismConfig.tiny(**MICRO)  # type: ignore[arg-type]
    target = tmp_path / f"organism-{config.key()}"
    assert not target.exists()  # no half-written organism under the real name
    staging = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(staging) == 1
    assert (staging[0] / "config.json").is_file()  # it was killed mid-write
    # the lock died with the process: the next build proceeds, and cleans up
    organism = build_organism(config, cache_dir=tmp_path, progress=False)
    assert organism.path == target
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{target.name}.lock", target.name]
