"""The CABS selection engine: pure functions of a global superbatch's concept ids.

No Composer, no torch.distributed: the Algorithm all-gathers the ids and calls :func:`select`
(rank-local quotas) or :func:`select_invariant` (one global quota, the same kept set on any
number of ranks).
"""

from cabs_streaming.selection.base import (
    Kept,
    SelectionPolicy,
    SelectionResult,
    SelectionStats,
    Superbatch,
    step_keys,
)
from cabs_streaming.selection.diversity import Diversity, default_concept_cap, diversity_keep
from cabs_streaming.selection.frequency import Frequency, frequency_keep
from cabs_streaming.selection.iid import IID, iid_keep
from cabs_streaming.selection.invariant import (
    InvariantSelection,
    assign_to_ranks,
    invariant_stand_ins,
    select_invariant,
)
from cabs_streaming.selection.registry import POLICIES, get_policy, select, stand_ins

__all__ = [
    "IID",
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
