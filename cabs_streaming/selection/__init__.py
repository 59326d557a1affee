"""The CABS selection engine: pure functions of a global superbatch's concept ids.

No Composer, no torch.distributed: the Algorithm all-gathers the ids and calls :func:`select`.
"""

from cabs_streaming.selection.base import (
    Kept,
    SelectionPolicy,
    SelectionResult,
    SelectionStats,
    Superbatch,
    rank_rng,
)
from cabs_streaming.selection.diversity import Diversity, default_concept_cap, diversity_keep
from cabs_streaming.selection.frequency import Frequency, frequency_keep
from cabs_streaming.selection.iid import IID, iid_keep
from cabs_streaming.selection.registry import POLICIES, get_policy, select, stand_ins

__all__ = [
    "IID",
    "POLICIES",
    "Diversity",
    "Frequency",
    "Kept",
    "SelectionPolicy",
    "SelectionResult",
    "SelectionStats",
    "Superbatch",
    "default_concept_cap",
    "diversity_keep",
    "frequency_keep",
    "get_policy",
    "iid_keep",
    "rank_rng",
    "select",
    "stand_ins",
]
