"""memloc-tl: localize paragraph memorization in language models on TransformerLens.

Implements Stoehr et al. (2024), "Localizing Paragraph Memorization in Language Models"
(arXiv 2403.19851), for GPT-Neo loaded as a TransformerLens ``HookedTransformer``.
"""

import importlib
from typing import TYPE_CHECKING, Any

from memloc_tl._version import __version__

if TYPE_CHECKING:  # the names, for type checkers; at run time each loads on first use
    from memloc_tl.analysis import (
        ActivationGradients,
        AttributionPatching,
        GradientComparison,
        GradientNorms,
        HeadIntervention,
        PatchingSweep,
        PrefixPerturbation,
        RareTokenAttention,
        RareTokenAttentionAnalyzer,
        ablate_heads,
        activation_gradients,
        attribution_patching,
        compare_gradient_norms,
        contrastive_gradient_norms,
        gradient_norms,
        patch_heads,
        patching_sweep,
        perturb_prefixes,
        rare_token_attention,
        rarest_positions,
        run_analyzers,
    )
    from memloc_tl.checkpoints import (
        CheckpointSeries,
        HeadTimeline,
        MaskDrift,
        MemorizationTimeline,
        TrainingDynamics,
        corpus_timeline,
        localize_over_checkpoints,
        mask_drift,
        scan_checkpoints,
        scan_corpus_checkpoints,
        training_dynamics,
    )
    from memloc_tl.corpus import CorpusConfig, read_corpus_scan, scan_corpus
    from memloc_tl.editing import (
        EditResult,
        MaskedOptimizer,
        ParamMask,
        WeightEdit,
        compare_edits,
        sparse_edit,
    )
    from memloc_tl.export import export_hf
    from memloc_tl.heads import HeadRef
    from memloc_tl.localization import (
        DeletionBenchmark,
        Injection,
        InjectionBenchmark,
        InjectionConfig,
        InjectionDamageWarning,
        InjectionError,
        InjectionFailedWarning,
        LearnedMaskConfig,
        Localization,
        Units,
        deletion_benchmark,
        inject_paragraphs,
        injection_benchmark,
        localize,
    )
    from memloc_tl.memorization import (
        MemorizationScan,
        greedy_continuations,
        scan_memorization,
        summarize,
    )
    from memloc_tl.models import DEFAULT_MODEL, HubUnavailableError, load_model, save_hooked_model
    from memloc_tl.organism import Organism, OrganismConfig, build_organism, load_organism
    from memloc_tl.paragraphs import PAPER_KEYWORDS, Paragraphs, corpus_token_counts
    from memloc_tl.precision import Precision
    from memloc_tl.report import MemorizationReport, ReportConfig, memorization_report
    from memloc_tl.results import HeadScores, LayerComponentScores, TokenScores
    from memloc_tl.uncertainty import HeadRanking, bootstrap_heads
    from memloc_tl.workbench import Workbench, load_workbench

_SOURCES: dict[str, str] = {
    "ActivationGradients": "memloc_tl.analysis",
    "AttributionPatching": "memloc_tl.analysis",
    "GradientComparison": "memloc_tl.analysis",
    "GradientNorms": "memloc_tl.analysis",
    "HeadIntervention": "memloc_tl.analysis",
    "PatchingSweep": "memloc_tl.analysis",
    "PrefixPerturbation": "memloc_tl.analysis",
    "RareTokenAttention": "memloc_tl.analysis",
    "RareTokenAttentionAnalyzer": "memloc_tl.analysis",
    "ablate_heads": "memloc_tl.analysis",
    "activation_gradients": "memloc_tl.analysis",
    "attribution_patching": "memloc_tl.analysis",
    "compare_gradient_norms": "memloc_tl.analysis",
    "contrastive_gradient_norms": "memloc_tl.analysis",
    "gradient_norms": "memloc_tl.analysis",
    "patch_heads": "memloc_tl.analysis",
    "patching_sweep": "memloc_tl.analysis",
    "perturb_prefixes": "memloc_tl.analysis",
    "rare_token_attention": "memloc_tl.analysis",
    "rarest_positions": "memloc_tl.analysis",
    "run_analyzers": "memloc_tl.analysis",
    "EditResult": "memloc_tl.editing",
    "MaskedOptimizer": "memloc_tl.editing",
    "ParamMask": "memloc_tl.editing",
    "WeightEdit": "memloc_tl.editing",
    "compare_edits": "memloc_tl.editing",
    "sparse_edit": "memloc_tl.editing",
    "HeadRef": "memloc_tl.heads",
    "DeletionBenchmark": "memloc_tl.localization",
    "Injection": "memloc_tl.localization",
    "InjectionBenchmark": "memloc_tl.localization",
    "InjectionConfig": "memloc_tl.localization",
    "InjectionDamageWarning": "memloc_tl.localization",
    "InjectionError": "memloc_tl.localization",
    "InjectionFailedWarning": "memloc_tl.localization",
    "LearnedMaskConfig": "memloc_tl.localization",
    "Localization": "memloc_tl.localization",
    "Units": "memloc_tl.localization",
    "deletion_benchmark": "memloc_tl.localization",
    "inject_paragraphs": "memloc_tl.localization",
    "injection_benchmark": "memloc_tl.localization",
    "localize": "memloc_tl.localization",
    "MemorizationScan": "memloc_tl.memorization",
    "CheckpointSeries": "memloc_tl.checkpoints",
    "MemorizationTimeline": "memloc_tl.checkpoints",
    "scan_checkpoints": "memloc_tl.checkpoints",
    "HeadTimeline": "memloc_tl.checkpoints",
    "localize_over_checkpoints": "memloc_tl.checkpoints",
    "MaskDrift": "memloc_tl.checkpoints",
    "mask_drift": "memloc_tl.checkpoints",
    "TrainingDynamics": "memloc_tl.checkpoints",
    "training_dynamics": "memloc_tl.checkpoints",
    "scan_corpus_checkpoints": "memloc_tl.checkpoints",
    "corpus_timeline": "memloc_tl.checkpoints",
    "greedy_continuations": "memloc_tl.memorization",
    "scan_memorization": "memloc_tl.memorization",
    "summarize": "memloc_tl.memorization",
    "DEFAULT_MODEL": "memloc_tl.models",
    "HubUnavailableError": "memloc_tl.models",
    "load_model": "memloc_tl.models",
    "export_hf": "memloc_tl.export",
    "CorpusConfig": "memloc_tl.corpus",
    "read_corpus_scan": "memloc_tl.corpus",
    "scan_corpus": "memloc_tl.corpus",
    "save_hooked_model": "memloc_tl.models",
    "Organism": "memloc_tl.organism",
    "OrganismConfig": "memloc_tl.organism",
    "build_organism": "memloc_tl.organism",
    "load_organism": "memloc_tl.organism",
    "PAPER_KEYWORDS": "memloc_tl.paragraphs",
    "Paragraphs": "memloc_tl.paragraphs",
    "corpus_token_counts": "memloc_tl.paragraphs",
    "MemorizationReport": "memloc_tl.report",
    "ReportConfig": "memloc_tl.report",
    "Precision": "memloc_tl.precision",
    "memorization_report": "memloc_tl.report",
    "HeadScores": "memloc_tl.results",
    "LayerComponentScores": "memloc_tl.results",
    "TokenScores": "memloc_tl.results",
    "HeadRanking": "memloc_tl.uncertainty",
    "bootstrap_heads": "memloc_tl.uncertainty",
    "Workbench": "memloc_tl.workbench",
    "load_workbench": "memloc_tl.workbench",
}
"""Where each public name lives. ``import memloc_tl`` loads none of them (torch and
TransformerLens take seconds to import); the first use of a name imports its module."""


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'memloc_tl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})


__all__ = [
    "DEFAULT_MODEL",
    "PAPER_KEYWORDS",
    "ActivationGradients",
    "AttributionPatching",
    "CheckpointSeries",
    "CorpusConfig",
    "DeletionBenchmark",
    "EditResult",
    "GradientComparison",
    "GradientNorms",
    "HeadIntervention",
    "HeadRanking",
    "HeadRef",
    "HeadScores",
    "HeadTimeline",
    "HubUnavailableError",
    "Injection",
    "InjectionBenchmark",
    "InjectionConfig",
    "InjectionDamageWarning",
    "InjectionError",
    "InjectionFailedWarning",
    "LayerComponentScores",
    "LearnedMaskConfig",
    "Localization",
    "MaskDrift",
    "MaskedOptimizer",
    "MemorizationReport",
    "MemorizationScan",
    "MemorizationTimeline",
    "Organism",
    "OrganismConfig",
    "Paragraphs",
    "ParamMask",
    "PatchingSweep",
    "Precision",
    "PrefixPerturbation",
    "RareTokenAttention",
    "RareTokenAttentionAnalyzer",
    "ReportConfig",
    "TokenScores",
    "TrainingDynamics",
    "Units",
    "WeightEdit",
    "Workbench",
    "__version__",
    "ablate_heads",
    "activation_gradients",
    "attribution_patching",
    "bootstrap_heads",
    "build_organism",
    "compare_edits",
    "compare_gradient_norms",
    "contrastive_gradient_norms",
    "corpus_timeline",
    "corpus_token_counts",
    "deletion_benchmark",
    "export_hf",
    "gradient_norms",
    "greedy_continuations",
    "inject_paragraphs",
    "injection_benchmark",
    "load_model",
    "load_organism",
    "load_workbench",
    "localize",
    "localize_over_checkpoints",
    "mask_drift",
    "memorization_report",
    "patch_heads",
    "patching_sweep",
    "perturb_prefixes",
    "rare_token_attention",
    "rarest_positions",
    "read_corpus_scan",
    "run_analyzers",
    "save_hooked_model",
    "scan_checkpoints",
    "scan_corpus",
    "scan_corpus_checkpoints",
    "scan_memorization",
    "sparse_edit",
    "summarize",
    "training_dynamics",
]
