"""Memorization over training: a series of checkpoints, when each paragraph became memorized,
and where it is localized at each step.

A :class:`CheckpointSeries` is an ordered list of training steps, each with a way to load the
model at that step: a hub model's revisions (Pythia's ``"step143000"``), local checkpoint
directories, or the organism's own checkpoints (``OrganismConfig.n_checkpoints``). Checkpoints
are loaded one at a time, and the previous one is released before the next is loaded, so a
series of any length needs the memory of one model.

:func:`scan_checkpoints` scans the same paragraphs at every step and gives a
:class:`MemorizationTimeline`: EM and NLL per paragraph per step, the first step at which each
paragraph reaches EM = continuation length, and the forgetting events (a memorized paragraph
that falls below full EM at a later step).

:func:`localize_over_checkpoints` runs one head-level analysis at every checkpoint (rare-token
attention, exact zero ablation, or any function of the model that gives
:class:`~memloc_tl.core.results.HeadScores`) and gives a :class:`HeadTimeline`: the scores per step,
the rank over steps of the last step's top head, and :meth:`HeadTimeline.answer`, the one-line
answer to "did the head that matters at the end exist before the paragraphs were memorized?".

Everything that can be checked before any model is loaded is checked first: an empty series,
steps out of order or repeated, a missing directory, directories of another architecture or with
another tokenizer than the first.

One module per idea: :mod:`~memloc_tl.checkpoints.series` (the series and its checks),
:mod:`~memloc_tl.checkpoints.timeline` (memorization per step),
:mod:`~memloc_tl.checkpoints.heads` (a head analysis per step),
:mod:`~memloc_tl.checkpoints.drift` (a weights mask per step),
:mod:`~memloc_tl.checkpoints.corpus_series` (a corpus scan per step) and
:mod:`~memloc_tl.checkpoints.dynamics` (all of it in one call). Every name imports from
``memloc_tl.checkpoints``.
"""

from __future__ import annotations

from memloc_tl.checkpoints.corpus_series import (
    SERIES_FILE,
    corpus_timeline,
    read_corpus_series,
    scan_corpus_checkpoints,
    step_directory,
)
from memloc_tl.checkpoints.drift import (
    MaskDrift,
    mask_drift,
    weight_localizers,
)
from memloc_tl.checkpoints.dynamics import (
    TrainingDynamics,
    training_dynamics,
)
from memloc_tl.checkpoints.heads import (
    HeadTimeline,
    analyses,
    head_localizers,
    localize_over_checkpoints,
)
from memloc_tl.checkpoints.series import (
    ARCHITECTURE_KEYS,
    STEP_PATTERN,
    TOKENIZER_FILES,
    Checkpoint,
    CheckpointSeries,
    check_fits,
    step_of,
)
from memloc_tl.checkpoints.timeline import (
    MemorizationTimeline,
    scan_checkpoints,
)

__all__ = [
    "ARCHITECTURE_KEYS",
    "SERIES_FILE",
    "STEP_PATTERN",
    "TOKENIZER_FILES",
    "Checkpoint",
    "CheckpointSeries",
    "HeadTimeline",
    "MaskDrift",
    "MemorizationTimeline",
    "TrainingDynamics",
    "analyses",
    "check_fits",
    "corpus_timeline",
    "head_localizers",
    "localize_over_checkpoints",
    "mask_drift",
    "read_corpus_series",
    "scan_checkpoints",
    "scan_corpus_checkpoints",
    "step_directory",
    "step_of",
    "training_dynamics",
    "weight_localizers",
]
