"""``balanced``: MetaCLIP-style concept balancing, made exact, full-batch and resumable.

MetaCLIP keeps a sample with probability ``min(1, t / N_c)`` of its matched entry, from
dataset-wide counts ``N_c``, so that no concept contributes more than about ``t`` samples to the
curated set (offline, and online in its curation loader, which draws with Python's global
``random`` and lets batch sizes vary). Here the same probability ranks a superbatch: each rank
keeps exactly ``k`` samples by a seeded weighted draw without replacement
(docs/selection.md#balanced).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from cabs_streaming.selection import _kernels
from cabs_streaming.selection.base import (
    DatasetFacts,
    Kept,
    SelectionPolicy,
    Superbatch,
    fill_quota,
    step_keys,
)


def balanced_draw_keys(
    sb: Superbatch, seed: int, step: int, counts: np.ndarray, threshold: float
) -> np.ndarray:
    """The draw's keys ``-log1p(-u_g) / p_g`` (``inf`` where ``p_g = 0``: no concepts, filtered).

    ``p_g = 1 - prod over c in C_g of (1 - min(1, t / N_c))``; ``u_g`` are the step's keys;
    ``log1p`` is numpy's, so the keys are the same wherever numpy is the same.
    """
    if counts.shape[0] < sb.num_concepts:
        raise ValueError(
            f"the concept counts cover {counts.shape[0]} concepts but the superbatch has ids "
            f"up to {sb.num_concepts - 1}; the counts and the data must share one vocabulary"
        )
    d_offsets, d_ids, _ = _kernels.distinct_lists(sb.offsets, sb.ids, sb.num_concepts)
    p = _kernels.balanced_probability(d_offsets, d_ids, counts, threshold, sb.allowed_or_all)
    u = step_keys(seed, step, sb.size)
    keys = np.full(sb.size, np.inf)
    drawn = p > 0.0
    keys[drawn] = -np.log1p(-u[drawn]) / p[drawn]
    return keys


def balanced_keep(
    sb: Superbatch, k: int, seed: int, step: int, counts: np.ndarray, threshold: float
) -> Kept:
    """Each rank keeps its ``k`` samples with the smallest draw keys, then the fill.

    Smallest ``-log(1 - u_g) / p_g`` first is a draw without replacement with probability
    proportional to ``p_g`` at every pick (exponential races, Efraimidis and Spirakis). Samples
    without concepts have ``p_g = 0``: like MetaCLIP's unmatched texts they are never drawn, and
    the fill takes them (in the step's seeded order) only when a rank has too few others.
    """
    keys = balanced_draw_keys(sb, seed, step, counts, threshold)
    mask = np.zeros(sb.size, dtype=np.bool_)
    _kernels.take_smallest_per_rank(keys, sb.world, k, mask)
    filled = fill_quota(sb, mask, k, seed, step)
    return Kept(mask, filled=filled)


@dataclass(frozen=True)
class Balanced(SelectionPolicy):
    """MetaCLIP's balancing: keep probability ``1 - prod(1 - min(1, t / N_c))``, exactly ``k``.

    ``threshold`` is MetaCLIP's ``t`` (20,000 for its 400M set): a concept with ``N_c <= t``
    samples in the whole dataset is never held back; ``t`` at or above every count draws like
    IID among the samples with concepts. Needs the dataset-wide counts
    (``concept_counts.json``, :meth:`bind`).
    """

    name = "balanced"
    threshold: float = 20000.0
    counts: np.ndarray | None = field(
        default=None, compare=False, repr=False, metadata={"bound": True}
    )

    def __post_init__(self) -> None:
        value = self.threshold
        if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not (
            math.isfinite(value) and value > 0
        ):
            raise ValueError(f"threshold must be a positive number, got {value!r}")

    def bind(self, facts: DatasetFacts) -> Balanced:
        """Take ``N_c`` from the dataset-wide counts."""
        if facts.concept_samples is None:
            raise ValueError(
                f"selection policy 'balanced' needs the dataset-wide concept counts, and "
                f"{facts.source} has none: convert it with this version of cabs-convert (it "
                "writes concept_counts.json beside vocabulary.json)"
            )
        counts = np.ascontiguousarray(facts.concept_samples, dtype=np.float64)
        return dataclasses.replace(self, counts=counts)

    def _counts(self) -> np.ndarray:
        if self.counts is None:
            raise ValueError(
                "selection policy 'balanced' needs the dataset-wide concept counts: call "
                "policy.bind(DatasetFacts(concept_samples=...)) first (the trainer does)"
            )
        return self.counts

    def keep(self, sb: Superbatch, k: int, seed: int, step: int) -> Kept:
        """See :func:`balanced_keep`."""
        return balanced_keep(sb, k, seed, step, self._counts(), float(self.threshold))

    def reserve(
        self, sb: Superbatch, kept: np.ndarray, rank: int, seed: int, step: int
    ) -> np.ndarray:
        """The rank's unkept samples by draw key, smallest first (the draw's next picks)."""
        n = sb.per_rank
        keys = balanced_draw_keys(sb, seed, step, self._counts(), float(self.threshold))
        row = keys[rank * n : (rank + 1) * n]
        unkept = np.flatnonzero(~kept[rank * n : (rank + 1) * n])
        return unkept[np.argsort(row[unkept], kind="stable")]
