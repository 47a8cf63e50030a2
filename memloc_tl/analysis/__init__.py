"""Read-only analyzers, one module per experiment of the paper."""

from memloc_tl.analysis.activation_grads import ActivationGradients, activation_gradients
from memloc_tl.analysis.attribution import AttributionPatching, attribution_patching
from memloc_tl.analysis.gradients import (
    GradientComparison,
    GradientNorms,
    compare_gradient_norms,
    contrastive_gradient_norms,
    contrastive_gradients,
    gradient_norms,
)
from memloc_tl.analysis.patching import (
    HeadIntervention,
    PatchingSweep,
    ablate_heads,
    patch_heads,
    patching_sweep,
)
from memloc_tl.analysis.perturbation import PerturbConfig, PrefixPerturbation, perturb_prefixes
from memloc_tl.analysis.rare_tokens import (
    RareTokenAttention,
    RareTokenAttentionAnalyzer,
    rare_token_attention,
    rarest_positions,
)
from memloc_tl.analysis.runner import run_analyzers

__all__ = [
    "ActivationGradients",
    "AttributionPatching",
    "GradientComparison",
    "GradientNorms",
    "HeadIntervention",
    "PatchingSweep",
    "PerturbConfig",
    "PrefixPerturbation",
    "RareTokenAttention",
    "RareTokenAttentionAnalyzer",
    "ablate_heads",
    "activation_gradients",
    "attribution_patching",
    "compare_gradient_norms",
    "contrastive_gradient_norms",
    "contrastive_gradients",
    "gradient_norms",
    "patch_heads",
    "patching_sweep",
    "perturb_prefixes",
    "rare_token_attention",
    "rarest_positions",
    "run_analyzers",
]
