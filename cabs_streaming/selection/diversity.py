"""CABS-DM (diversity maximisation): a greedy that builds a batch covering many concepts.

The greedy favours samples whose concepts are under their target in the kept batch so far and
rare in the superbatch (docs/selection.md#cabs-dm). It runs on the *global* superbatch with global
counts and per-rank quotas, so the kept global batch is diverse while every image stays on the
rank that loaded it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from cabs_streaming.selection import _kernels
from cabs_streaming.selection.base import (
    DatasetFacts,
    Kept,
    SelectionPolicy,
    Superbatch,
    fill_quota,
)
from cabs_streaming.selection.targets import check_alpha, target_weights

#: The reference implementation caps a concept at 10 per 1024 kept samples on each GPU.
CAP_PER_1024 = 10
#: ``official_compat``: the reference's per-rank cap, used unless ``concept_cap`` is given.
REFERENCE_RANK_CAP = 10
#: ``official_compat``: what a concept at or over its target adds to the reference's gain.
REFERENCE_OVER_TARGET = -0.5


def default_concept_cap(kept_total: int) -> int:
    """``M = max(1, round(b * 10 / 1024))`` (Python's round: halves go to the even integer)."""
    return max(1, round(kept_total * CAP_PER_1024 / 1024))


def _table(
    sb: Superbatch, doc_freq: np.ndarray, b: int, cap: int, weights: np.ndarray | None
) -> tuple[np.ndarray, int]:
    """The per-concept table with uniform targets, or targets in proportion to ``weights``."""
    if weights is None:
        return _kernels.concept_table(doc_freq, b, cap)
    if weights.shape[0] < sb.num_concepts:
        raise ValueError(
            f"target weights cover {weights.shape[0]} concepts but the superbatch has ids up to "
            f"{sb.num_concepts - 1}; the weights and the data must share one vocabulary"
        )
    return _kernels.weighted_concept_table(doc_freq, weights[: sb.num_concepts], b, cap)


def diversity_keep(
    sb: Superbatch,
    k: int,
    seed: int,
    step: int,
    concept_cap: int | None = None,
    official_compat: bool = False,
    target_weights: np.ndarray | None = None,
    bonus: np.ndarray | None = None,
) -> Kept:
    """Run the CABS-DM greedy and the seeded fill; exactly ``k`` kept on every rank.

    Default form: one greedy over all ``N`` samples with counts over *distinct* concepts
    (``C_g``), gains ``(1/|C_g|) * sum((t_c - n_c)/t_c + 1/F_c if n_c < t_c else 0)``, a sample
    eligible while its rank has quota and all its concepts are under ``M`` (default
    :func:`default_concept_cap` of ``b = world * k``). Ties go to the lower global index.

    ``target_weights`` (float64 per concept id) replaces the uniform targets by targets in
    proportion to the weights (docs/selection.md#target-distributions); ``bonus`` (float64
    ``[N]``, non-negative) is added to every sample's gain (``mixed``'s FM term).

    ``official_compat``: each rank runs the greedy on its own samples with its own counts over
    *instances* (every entry of ``L_g``), dividing by ``len(L_g)``, with ``-0.5`` for a concept at
    or over target and a per-rank cap ``M_rank`` (10 unless ``concept_cap`` is given); targets use
    ``b = k`` and ``M_rank`` with ``K`` and ``F_c`` of the global superbatch.

    Both forms then fill an open quota from the rank's unkept samples, empty ones first, in the
    step's seeded order (:func:`fill_quota`). This is where we
    deviate from the reference in compat mode: it fills by unseeded random choice among eligible
    samples and may return a short batch; ours is deterministic and always full. Samples failing
    ``selection.filters`` (``sb.allowed``) never enter the greedy; the fill takes them last.
    """
    n = sb.per_rank
    d_offsets, d_ids, doc_freq = _kernels.distinct_lists(sb.offsets, sb.ids, sb.num_concepts)
    kept = np.zeros(sb.size, dtype=np.bool_)
    quota = np.full(sb.world, k, dtype=np.int64)
    allowed = sb.allowed_or_all
    if not official_compat:
        cap = concept_cap if concept_cap is not None else default_concept_cap(sb.world * k)
        table, present = _table(sb, doc_freq, sb.world * k, cap, target_weights)
        extra = _kernels.NO_BONUS if bonus is None else bonus
        _kernels.lazy_greedy(
            d_offsets, d_ids, 0, sb.size, n, quota, table, cap, 0.0, kept, extra, allowed
        )
    else:
        if bonus is not None:
            raise ValueError("official_compat has no bonus term (it is the reference's greedy)")
        cap = concept_cap if concept_cap is not None else REFERENCE_RANK_CAP
        table, present = _table(sb, doc_freq, k, cap, target_weights)
        _kernels.per_rank_greedy(
            sb.offsets, sb.ids, sb.world, quota, table, cap, REFERENCE_OVER_TARGET, kept, allowed
        )
    filled = fill_quota(sb, kept, k, seed, step)
    return Kept(kept, filled=filled, superbatch_distinct=int(present))


def diversity_reserve(
    sb: Superbatch,
    kept: np.ndarray,
    rank: int,
    concept_cap: int | None = None,
    official_compat: bool = False,
    target_weights: np.ndarray | None = None,
    bonus: np.ndarray | None = None,
) -> np.ndarray:
    """Rank ``rank``'s unkept local indices in the order the greedy would take them next.

    Every unkept sample is scored against the final kept batch (the counts the greedy ended
    with): eligible samples by their DM gain (plus ``bonus``), highest first, then the samples
    without concepts (what the fill takes first), then those held back by the cap; ties go to
    the lower index.
    """
    n = sb.per_rank
    k = int(np.count_nonzero(kept[rank * n : (rank + 1) * n]))
    offsets, ids, doc_freq = _kernels.distinct_lists(sb.offsets, sb.ids, sb.num_concepts)
    if not official_compat:
        cap = concept_cap if concept_cap is not None else default_concept_cap(sb.world * k)
        table, _ = _table(sb, doc_freq, sb.world * k, cap, target_weights)
        counted, over = kept, 0.0
    else:
        offsets, ids = sb.offsets, sb.ids
        cap = concept_cap if concept_cap is not None else REFERENCE_RANK_CAP
        table, _ = _table(sb, doc_freq, k, cap, target_weights)
        counted = np.zeros_like(kept)
        counted[rank * n : (rank + 1) * n] = kept[rank * n : (rank + 1) * n]
        over = REFERENCE_OVER_TARGET
    extra = _kernels.NO_BONUS if bonus is None else bonus
    scores = _kernels.reserve_scores(
        offsets, ids, rank * n, (rank + 1) * n, kept, counted, table, cap, over, extra
    )
    order = np.argsort(-scores, kind="stable")
    return order[: n - k]


def _check_cap(concept_cap: object) -> None:
    if concept_cap is not None and (
        isinstance(concept_cap, bool) or not isinstance(concept_cap, int | np.integer)
        or concept_cap < 1
    ):
        raise ValueError(f"concept_cap must be a positive int or None, got {concept_cap!r}")


@dataclass(frozen=True)
class Diversity(SelectionPolicy):
    """CABS-DM: favour concept diversity; the published recipe for zero-shot classification.

    ``concept_cap``: the most kept samples (default form) or instances per rank (compat) one
    concept may count; ``None`` takes the published default. ``official_compat``: reproduce the
    reference implementation's greedy bit for bit (see :func:`diversity_keep` for the one
    deliberate deviation: a full, deterministic batch instead of a possibly short, random one).

    Target distribution (docs/selection.md#target-distributions): uniform by default;
    ``alpha`` in ``[0, 1]`` aims at ``N_c ** alpha`` (``N_c`` the dataset-wide samples of
    concept ``c``, from ``concept_counts.json``: 0 is uniform, 1 the data's own distribution);
    ``weights`` names a JSON file of per-concept weights (``{"name": weight, ...}``, ``"*"`` for
    every concept not listed). Both need :meth:`bind` with the dataset's facts before use.
    """

    name = "diversity"
    concept_cap: int | None = None
    official_compat: bool = False
    alpha: float | None = field(default=None, metadata={"omit_none": True})
    weights: str | None = field(default=None, metadata={"omit_none": True})
    target_weights: np.ndarray | None = field(
        default=None, compare=False, repr=False, metadata={"bound": True}
    )

    def __post_init__(self) -> None:
        _check_cap(self.concept_cap)
        if not isinstance(self.official_compat, bool | np.bool_):
            raise ValueError(f"official_compat must be a bool, got {self.official_compat!r}")
        check_alpha(self.alpha)
        if self.alpha is not None and self.weights is not None:
            raise ValueError("give either alpha or weights as the target distribution, not both")
        if self.weights is not None and not isinstance(self.weights, str):
            raise ValueError(f"weights must be the path of a JSON file, got {self.weights!r}")

    def bind(self, facts: DatasetFacts) -> Diversity:
        """Turn ``alpha`` or ``weights`` into per-concept target weights for this dataset."""
        if self.alpha is None and self.weights is None:
            return self
        return dataclasses.replace(
            self, target_weights=target_weights(facts, self.alpha, self.weights, self.name)
        )

    def _weights(self) -> np.ndarray | None:
        if (self.alpha is not None or self.weights is not None) and self.target_weights is None:
            raise ValueError(
                f"selection policy {self.name!r} with alpha or weights needs the dataset's "
                "facts: call policy.bind(DatasetFacts(...)) first (the trainer does)"
            )
        return self.target_weights

    def keep(self, sb: Superbatch, k: int, seed: int, step: int) -> Kept:
        """See :func:`diversity_keep`."""
        return diversity_keep(
            sb, k, seed, step, self.concept_cap, self.official_compat, self._weights()
        )

    def reserve(
        self, sb: Superbatch, kept: np.ndarray, rank: int, seed: int, step: int
    ) -> np.ndarray:
        """See :func:`diversity_reserve`; ``seed`` and ``step`` are unused."""
        return diversity_reserve(
            sb, kept, rank, self.concept_cap, self.official_compat, self._weights()
        )


def mixed_bonus(sb: Superbatch, lam: float) -> np.ndarray:
    """``lambda * len(L_g) / L_max`` per sample, ``L_max`` the longest list of the superbatch."""
    lengths = np.diff(sb.offsets).astype(np.float64)
    longest = lengths.max() if lengths.size else 0.0
    if longest == 0.0:
        return np.zeros(sb.size, dtype=np.float64)
    return lam * (lengths / longest)


@dataclass(frozen=True)
class Mixed(Diversity):
    """One score for classification and retrieval: DM's gain plus ``lambda`` times FM's count.

    ``score_g = h_g + lambda * len(L_g) / L_max`` (docs/selection.md#mixed), one CABS-DM greedy
    (same targets, cap, fill and options); ``lambda = 0`` is CABS-DM exactly, and as ``lambda``
    grows the order tends to FM's (most instances first), DM's gain only breaking ties, within
    the concept cap. Write ``lambda`` in configs (``lam`` in Python).
    """

    name = "mixed"
    aliases = {"lambda": "lam"}
    lam: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.official_compat:
            raise ValueError("mixed has no official_compat form (the reference has no FM term)")
        if isinstance(self.lam, bool) or not isinstance(self.lam, int | float | np.floating):
            raise ValueError(f"lambda must be a number >= 0, got {self.lam!r}")
        if not 0.0 <= float(self.lam) < float("inf"):
            raise ValueError(f"lambda must be a finite number >= 0, got {self.lam!r}")

    def keep(self, sb: Superbatch, k: int, seed: int, step: int) -> Kept:
        """See :class:`Mixed`."""
        return diversity_keep(
            sb, k, seed, step, self.concept_cap, False, self._weights(),
            mixed_bonus(sb, float(self.lam)),
        )

    def reserve(
        self, sb: Superbatch, kept: np.ndarray, rank: int, seed: int, step: int
    ) -> np.ndarray:
        """The greedy's next choices: DM gain plus the FM term against the final batch."""
        return diversity_reserve(
            sb, kept, rank, self.concept_cap, False, self._weights(),
            mixed_bonus(sb, float(self.lam)),
        )
