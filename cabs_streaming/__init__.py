"""cabs-streaming: Concept-Aware Batch Sampling for CLIP / SigLIP on the MosaicML stack.

The public API, as users write ``from streaming import StreamingDataset`` and ``from composer
import Trainer``::

    from cabs_streaming import ConceptAwareBatchSampling, ConceptStreamingDataset, ImageDecoder

Names are resolved on first use (PEP 562), so ``import cabs_streaming`` stays cheap: the recipe
of ``composer train.py`` is validated before torch, Composer or open_clip are imported
(docs/design.md#fail-early), and the converter and the tagger never need them at all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    # data
    "ConceptCollator": "cabs_streaming.dataset",
    "ConceptStreamingDataset": "cabs_streaming.dataset",
    "LookaheadDataLoader": "cabs_streaming.dataset",
    "num_samples_in_batch": "cabs_streaming.dataset",
    "Vocabulary": "cabs_streaming.concepts",
    "ConceptCounts": "cabs_streaming.concepts",
    "ImageDecoder": "cabs_streaming.decode",
    # selection
    "POLICIES": "cabs_streaming.selection",
    "IID": "cabs_streaming.selection",
    "Frequency": "cabs_streaming.selection",
    "Diversity": "cabs_streaming.selection",
    "Mixed": "cabs_streaming.selection",
    "Balanced": "cabs_streaming.selection",
    "Schedule": "cabs_streaming.selection",
    "Filter": "cabs_streaming.selection",
    "Filtered": "cabs_streaming.selection",
    "DatasetFacts": "cabs_streaming.selection",
    "SelectionPolicy": "cabs_streaming.selection",
    "get_policy": "cabs_streaming.selection",
    "select": "cabs_streaming.selection",
    # training
    "ConceptAwareBatchSampling": "cabs_streaming.algorithm",
    "ConceptDiversityMonitor": "cabs_streaming.callbacks",
    "ComposerCLIP": "cabs_streaming.model",
    "build_evaluators": "cabs_streaming.evaluation",
    # data preparation and inspection
    "convert": "cabs_streaming.converter",
    "CaptionTagger": "cabs_streaming.tagging",
    "ConceptNameMapper": "cabs_streaming.tagging",
    "concept_report": "cabs_streaming.report",
}

#: The public names (each resolved through ``_EXPORTS``).
__all__ = [
    "Balanced",
    "CaptionTagger",
    "ComposerCLIP",
    "ConceptAwareBatchSampling",
    "ConceptCollator",
    "ConceptCounts",
    "ConceptDiversityMonitor",
    "ConceptNameMapper",
    "ConceptStreamingDataset",
    "DatasetFacts",
    "Diversity",
    "Filter",
    "Filtered",
    "Frequency",
    "IID",
    "ImageDecoder",
    "LookaheadDataLoader",
    "Mixed",
    "POLICIES",
    "Schedule",
    "SelectionPolicy",
    "Vocabulary",
    "build_evaluators",
    "concept_report",
    "convert",
    "get_policy",
    "num_samples_in_batch",
    "select",
]


def __getattr__(name: str) -> Any:
    """Import the module defining ``name`` on first use, and keep the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cabs_streaming' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from cabs_streaming.algorithm import ConceptAwareBatchSampling
    from cabs_streaming.callbacks import ConceptDiversityMonitor
    from cabs_streaming.concepts import Vocabulary
    from cabs_streaming.converter import convert
    from cabs_streaming.dataset import (
        ConceptCollator,
        ConceptStreamingDataset,
        LookaheadDataLoader,
        num_samples_in_batch,
    )
    from cabs_streaming.decode import ImageDecoder
    from cabs_streaming.evaluation import build_evaluators
    from cabs_streaming.model import ComposerCLIP
    from cabs_streaming.report import concept_report
    from cabs_streaming.selection import (
        IID,
        POLICIES,
        Balanced,
        DatasetFacts,
        Diversity,
        Filter,
        Filtered,
        Frequency,
        Mixed,
        Schedule,
        SelectionPolicy,
        get_policy,
        select,
    )
    from cabs_streaming.tagging import CaptionTagger, ConceptNameMapper
