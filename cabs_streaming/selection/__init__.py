"""The CABS selection engine: pure functions of a global superbatch's concept ids.

No Composer, no torch.distributed: the Algorithm all-gathers the ids and calls :func:`select`
(rank-local quotas) or :func:`select_invariant` (one global quota, the same kept set on any
number of ranks).
"""

from cabs_streaming.selection.balanced import Balanced, balanced_keep
from cabs_streaming.selection.base import (
    DatasetFacts,
    Kept,
    SelectionPolicy,
    SelectionResult,
    SelectionStats,
    Superbatch,
    step_keys,
)
from cabs_streaming.selection.diversity import (
    Diversity,
    Mixed,
    default_concept_cap,
    diversity_keep,
)
from cabs_streaming.selection.filters import Filter, Filtered, apply_filters
from cabs_streaming.selection.frequency import Frequency, frequency_keep
from cabs_streaming.selection.iid import IID, iid_keep
from cabs_streaming.selection.invariant import (
    InvariantSelection,
    assign_to_ranks,
    invariant_stand_ins,
    select_invariant,
)
from cabs_streaming.selection.registry import POLICIES, get_policy, select, stand_ins
from cabs_streaming.selection.schedule import Phase, Ramp, Schedule

__all__ = [
    "IID",
    "Balanced",
    "DatasetFacts",
    "Filter",
    "Filtered",
    "Mixed",
    "Phase",
    "Ramp",
    "Schedule",
    "apply_filters",
    "balanced_keep",
    "POLICIES",
    "Diversity",
    "Frequency",
    "InvariantSelection",
    "Kept",
    "SelectionPolicy",
    "SelectionResult",
    "SelectionStats",
    "Superbatch",
    "assign_to_ranks",
    "default_concept_cap",
    "diversity_keep",
    "frequency_keep",
    "get_policy",
    "iid_keep",
    "invariant_stand_ins",
    "select",
    "select_invariant",
    "stand_ins",
    "step_keys",
]
