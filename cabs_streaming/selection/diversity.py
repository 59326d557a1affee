"""CABS-DM (diversity maximisation): a greedy that builds a batch covering many concepts.

The greedy favours samples whose concepts are under their target in the kept batch so far and
rare in the superbatch (docs/selection.md#cabs-dm). It runs on the *global* superbatch with global
counts and per-rank quotas, so the kept global batch is diverse while every image stays on the
rank that loaded it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cabs_streaming.selection import _kernels
from cabs_streaming.selection.base import Kept, SelectionPolicy, Superbatch, fill_quota

#: The reference implementation caps a concept at 10 per 1024 kept samples on each GPU.
CAP_PER_1024 = 10
#: ``official_compat``: the reference's per-rank cap, used unless ``concept_cap`` is given.
REFERENCE_RANK_CAP = 10
#: ``official_compat``: what a concept at or over its target adds to the reference's gain.
REFERENCE_OVER_TARGET = -0.5


def default_concept_cap(kept_total: int) -> int:
    """``M = max(1, round(b * 10 / 1024))`` (Python's round: halves go to the even integer)."""
    return max(1, round(kept_total * CAP_PER_1024 / 1024))


def diversity_keep(
    sb: Superbatch,
    k: int,
    seed: int,
    step: int,
    concept_cap: int | None = None,
    official_compat: bool = False,
) -> Kept:
    """Run the CABS-DM greedy and the seeded fill; exactly ``k`` kept on every rank.

    Default form: one greedy over all ``N`` samples with counts over *distinct* concepts
    (``C_g``), gains ``(1/|C_g|) * sum((t_c - n_c)/t_c + 1/F_c if n_c < t_c else 0)``, a sample
    eligible while its rank has quota and all its concepts are under ``M`` (default
    :func:`default_concept_cap` of ``b = world * k``). Ties go to the lower global index.

    ``official_compat``: each rank runs the greedy on its own samples with its own counts over
    *instances* (every entry of ``L_g``), dividing by ``len(L_g)``, with ``-0.5`` for a concept at
    or over target and a per-rank cap ``M_rank`` (10 unless ``concept_cap`` is given); targets use
    ``b = k`` and ``M_rank`` with ``K`` and ``F_c`` of the global superbatch.

    Both forms then fill an open quota from the rank's unkept samples, empty ones first, in the
    step's seeded order (:func:`fill_quota`). This is where we
    deviate from the reference in compat mode: it fills by unseeded random choice among eligible
    samples and may return a short batch; ours is deterministic and always full.
    """
    n = sb.per_rank
    d_offsets, d_ids, doc_freq = _kernels.distinct_lists(sb.offsets, sb.ids, sb.num_concepts)
    kept = np.zeros(sb.size, dtype=np.bool_)
    quota = np.full(sb.world, k, dtype=np.int64)
    if not official_compat:
        cap = concept_cap if concept_cap is not None else default_concept_cap(sb.world * k)
        table, present = _kernels.concept_table(doc_freq, sb.world * k, cap)
        _kernels.lazy_greedy(d_offsets, d_ids, 0, sb.size, n, quota, table, cap, 0.0, kept)
    else:
        cap = concept_cap if concept_cap is not None else REFERENCE_RANK_CAP
        table, present = _kernels.concept_table(doc_freq, k, cap)
        _kernels.per_rank_greedy(
            sb.offsets, sb.ids, sb.world, quota, table, cap, REFERENCE_OVER_TARGET, kept
        )
    filled = fill_quota(sb, kept, k, seed, step)
    return Kept(kept, filled=filled, superbatch_distinct=int(present))


def diversity_reserve(
    sb: Superbatch,
    kept: np.ndarray,
    rank: int,
    concept_cap: int | None = None,
    official_compat: bool = False,
) -> np.ndarray:
    """Rank ``rank``'s unkept local indices in the order the greedy would take them next.

    Every unkept sample is scored against the final kept batch (the counts the greedy ended
    with): eligible samples by their DM gain, highest first, then the samples without concepts
    (what the fill takes first), then those held back by the cap; ties go to the lower index.
    """
    n = sb.per_rank
    k = int(np.count_nonzero(kept[rank * n : (rank + 1) * n]))
    offsets, ids, doc_freq = _kernels.distinct_lists(sb.offsets, sb.ids, sb.num_concepts)
    if not official_compat:
        cap = concept_cap if concept_cap is not None else default_concept_cap(sb.world * k)
        table, _ = _kernels.concept_table(doc_freq, sb.world * k, cap)
        counted, over = kept, 0.0
    else:
        offsets, ids = sb.offsets, sb.ids
        cap = concept_cap if concept_cap is not None else REFERENCE_RANK_CAP
        table, _ = _kernels.concept_table(doc_freq, k, cap)
        counted = np.zeros_like(kept)
        counted[rank * n : (rank + 1) * n] = kept[rank * n : (rank + 1) * n]
        over = REFERENCE_OVER_TARGET
    scores = _kernels.reserve_scores(
        offsets, ids, rank * n, (rank + 1) * n, kept, counted, table, cap, over
    )
    order = np.argsort(-scores, kind="stable")
    return order[: n - k]


@dataclass(frozen=True)
class Diversity(SelectionPolicy):
    """CABS-DM: favour concept diversity; the published recipe for zero-shot classification.

    ``concept_cap``: the most kept samples (default form) or instances per rank (compat) one
    concept may count; ``None`` takes the published default. ``official_compat``: reproduce the
    reference implementation's greedy bit for bit (see :func:`diversity_keep` for the one
    deliberate deviation: a full, deterministic batch instead of a possibly short, random one).
    """

    name = "diversity"
    concept_cap: int | None = None
    official_compat: bool = False

    def __post_init__(self) -> None:
        if self.concept_cap is not None and (
            not isinstance(self.concept_cap, int | np.integer) or self.concept_cap < 1
        ):
            raise ValueError(
                f"concept_cap must be a positive int or None, got {self.concept_cap!r}"
            )
        if not isinstance(self.official_compat, bool | np.bool_):
            raise ValueError(f"official_compat must be a bool, got {self.official_compat!r}")

    def keep(self, sb: Superbatch, k: int, seed: int, step: int) -> Kept:
        """See :func:`diversity_keep`."""
        return diversity_keep(sb, k, seed, step, self.concept_cap, self.official_compat)

    def reserve(
        self, sb: Superbatch, kept: np.ndarray, rank: int, seed: int, step: int
    ) -> np.ndarray:
        """See :func:`diversity_reserve`; ``seed`` and ``step`` are unused."""
        return diversity_reserve(sb, kept, rank, self.concept_cap, self.official_compat)
