"""Localization you can check: inject with ground truth, localize, score (INJ and DEL)."""

from memloc_tl.localization.benchmark import (
    DeletionBenchmark,
    InjectionBenchmark,
    deletion_benchmark,
    injection_benchmark,
    organism_benchmark,
    organism_sets,
)
from memloc_tl.localization.injection import (
    Injection,
    InjectionConfig,
    InjectionDamageWarning,
    InjectionError,
    InjectionFailedWarning,
    inject_paragraphs,
)
from memloc_tl.localization.localizers import METHODS, LearnedMaskConfig, localize
from memloc_tl.localization.units import Localization, Units

__all__ = [
    "METHODS",
    "DeletionBenchmark",
    "Injection",
    "InjectionBenchmark",
    "InjectionConfig",
    "InjectionDamageWarning",
    "InjectionError",
    "InjectionFailedWarning",
    "LearnedMaskConfig",
    "Localization",
    "Units",
    "deletion_benchmark",
    "inject_paragraphs",
    "injection_benchmark",
    "localize",
    "organism_benchmark",
    "organism_sets",
]
