"""memloc-tl: localize paragraph memorization in language models on TransformerLens.

Implements Stoehr et al. (2024), "Localizing Paragraph Memorization in Language Models"
(arXiv 2403.19851), for GPT-Neo loaded as a TransformerLens ``HookedTransformer``.
"""

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
from memloc_tl.editing import (
    EditResult,
    MaskedOptimizer,
    ParamMask,
    WeightEdit,
    compare_edits,
    sparse_edit,
)
from memloc_tl.heads import HeadRef
from memloc_tl.localization import (
    DeletionBenchmark,
    Injection,
    InjectionBenchmark,
    InjectionConfig,
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
from memloc_tl.report import MemorizationReport, memorization_report
from memloc_tl.results import HeadScores, LayerComponentScores, TokenScores
from memloc_tl.workbench import Workbench, load_workbench

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "PAPER_KEYWORDS",
    "ActivationGradients",
    "AttributionPatching",
    "DeletionBenchmark",
    "EditResult",
    "GradientComparison",
    "GradientNorms",
    "HeadIntervention",
    "HeadRef",
    "HeadScores",
    "HubUnavailableError",
    "Injection",
    "InjectionBenchmark",
    "InjectionConfig",
    "LayerComponentScores",
    "LearnedMaskConfig",
    "Localization",
    "MaskedOptimizer",
    "MemorizationReport",
    "MemorizationScan",
    "Organism",
    "OrganismConfig",
    "Paragraphs",
    "ParamMask",
    "PatchingSweep",
    "PrefixPerturbation",
    "RareTokenAttention",
    "RareTokenAttentionAnalyzer",
    "TokenScores",
    "Units",
    "WeightEdit",
    "Workbench",
    "__version__",
    "ablate_heads",
    "activation_gradients",
    "attribution_patching",
    "build_organism",
    "compare_edits",
    "compare_gradient_norms",
    "contrastive_gradient_norms",
    "corpus_token_counts",
    "deletion_benchmark",
    "gradient_norms",
    "greedy_continuations",
    "inject_paragraphs",
    "injection_benchmark",
    "load_model",
    "load_organism",
    "load_workbench",
    "localize",
    "memorization_report",
    "patch_heads",
    "patching_sweep",
    "perturb_prefixes",
    "rare_token_attention",
    "rarest_positions",
    "run_analyzers",
    "save_hooked_model",
    "scan_memorization",
    "sparse_edit",
    "summarize",
]
