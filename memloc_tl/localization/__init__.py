"""Localization you can check: inject with ground truth, localize, score (INJ and DEL)."""

from memloc_tl.localization.benchmark import (
    BenchmarkConfig,
    DeletionBenchmark,
    DeletionConfig,
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
from memloc_tl.localization.localizers import (
    METHODS,
    LearnedMaskConfig,
    LocalizationTask,
    LocalizeConfig,
    Localizer,
    localize,
    register_localizer,
    unregister_localizer,
)
from memloc_tl.localization.units import Localization, Units

__all__ = [
    "METHODS",
    "BenchmarkConfig",
    "DeletionBenchmark",
    "DeletionConfig",
    "Injection",
    "InjectionBenchmark",
    "InjectionConfig",
    "InjectionDamageWarning",
    "InjectionError",
    "InjectionFailedWarning",
    "LearnedMaskConfig",
    "Localization",
    "LocalizationTask",
    "LocalizeConfig",
    "Localizer",
    "Units",
    "deletion_benchmark",
    "inject_paragraphs",
    "injection_benchmark",
    "localize",
    "organism_benchmark",
    "organism_sets",
    "register_localizer",
    "unregister_localizer",
]
