"""What a study runs on: a model, paragraphs to scan, corpus counts, general text.

One switch for notebooks and the ``memloc`` command: ``"organism"`` (offline, built on first
use), ``"organism-tiny"`` (the small test organism), or a GPT-Neo hub name or checkpoint
directory with a file of texts (``data``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from memloc_tl.core.backend import HookedModel
from memloc_tl.core.paragraphs import Paragraphs, corpus_token_counts
from memloc_tl.models import load_model
from memloc_tl.organism import Organism, OrganismConfig, build_organism

ORGANISMS = {"organism": OrganismConfig, "organism-tiny": OrganismConfig.tiny}

ORGANISM_EDIT_LR = 3e-2
"""Sparse-unlearning learning rate for the organisms (GPT-Neo 125M's 1e-5 barely moves them)."""

PAPER_EDIT_LR = 1e-5


@dataclass(frozen=True)
class Workbench:
    """A model and the data an analysis of it needs.

    Attributes:
        name: the switch it was loaded from (``"organism"``, a hub name, a directory).
        model: the HookedTransformer.
        paragraphs: every paragraph to scan (for the organism: planted, control, held-out).
        corpus_counts: unigram counts for the rare-token analysis, ``[d_vocab]``.
        general: general text for perplexity after an edit (``None`` if there is none).
        edit_lr: a learning rate for sparse unlearning that suits the model.
        organism: the organism, when the model is one.
        counts_from_paragraphs: whether ``corpus_counts`` only count ``paragraphs``.
    """

    name: str
    model: HookedModel
    paragraphs: Paragraphs
    corpus_counts: Int[Tensor, " d_vocab"]
    general: Paragraphs | None
    edit_lr: float
    organism: Organism | None = None
    counts_from_paragraphs: bool = False

    def __repr__(self) -> str:
        cfg = self.model.cfg
        return (
            f"Workbench({self.name!r}: {cfg.n_layers} layers x {cfg.n_heads} heads, "
            f"{len(self.paragraphs)} paragraphs)"
        )


def organism_workbench(organism: Organism, name: str = "organism") -> Workbench:
    """The workbench of an organism already built: all its paragraphs, its corpus counts."""
    return Workbench(
        name=name,
        model=organism.model,
        paragraphs=Paragraphs.concat(organism.planted, organism.control, organism.heldout),
        corpus_counts=organism.corpus_counts,
        general=organism.heldout,
        edit_lr=ORGANISM_EDIT_LR,
        organism=organism,
    )


def load_workbench(
    name: str = "organism",
    *,
    data: str | Path | None = None,
    text_column: str = "text",
    windows: str = "all",
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Workbench:
    """Load a model and its paragraphs by one name.

    Args:
        name: ``"organism"`` (default), ``"organism-tiny"``, or a GPT-Neo hub name
            (``"EleutherAI/gpt-neo-125M"``) or checkpoint directory.
        data: texts to cut into paragraphs (csv, json, jsonl, txt); required for a real model,
            ignored for an organism. Corpus counts are then counted over these paragraphs.
        text_column, windows: see :meth:`Paragraphs.from_files`.
        cache_dir: where organisms are built and cached (default ``$MEMLOC_TL_CACHE`` or the
            user cache).
        device: device of the model.
        progress: show progress while an organism is built.
    """
    if name in ORGANISMS:
        organism = build_organism(
            ORGANISMS[name](),
            cache_dir=cache_dir,
            device=device,
            progress=progress,
        )
        return organism_workbench(organism, name)
    if data is None:
        raise ValueError(
            f"model {name!r} needs data: pass data='texts.jsonl' (csv, json, jsonl or txt, one "
            f"text per row), or use name='organism' to work offline"
        )
    if not Path(data).exists():
        raise ValueError(f"data file {str(data)!r} does not exist")
    model = load_model(name, device=device)
    paragraphs = Paragraphs.from_files(
        data, model, text_column=text_column, windows=windows, on_short="skip"
    )
    if not len(paragraphs):
        raise ValueError(f"no text in {str(data)!r} is long enough for one 100-token paragraph")
    return Workbench(
        name=name,
        model=model,
        paragraphs=paragraphs,
        corpus_counts=corpus_token_counts(paragraphs, d_vocab=model.cfg.d_vocab),
        general=None,
        edit_lr=PAPER_EDIT_LR,
        counts_from_paragraphs=True,
    )
