"""IID selection: the baseline, and the special case of a constant score."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cabs_streaming.selection.base import Kept, SelectionPolicy, Superbatch, rank_rng


def iid_keep(sb: Superbatch, k: int, seed: int, step: int) -> np.ndarray:
    """Keep ``k`` samples per rank, uniformly without replacement.

    Rank ``r`` draws ``rank_rng(seed, step, r).choice(n, k, replace=False)``, so the answer
    changes with the step and is identical on every rank and on resume. With ``k == n``
    (filter ratio 0) every sample is kept.
    """
    n = sb.per_rank
    mask = np.zeros(sb.size, dtype=np.bool_)
    for rank in range(sb.world):
        chosen = rank_rng(seed, step, rank).choice(n, size=k, replace=False)
        mask[rank * n + chosen] = True
    return mask


@dataclass(frozen=True)
class IID(SelectionPolicy):
    """Uniform random keep; use as the baseline of every CABS experiment."""

    name = "iid"

    def keep(self, sb: Superbatch, k: int, seed: int, step: int) -> Kept:
        """See :func:`iid_keep`."""
        return Kept(iid_keep(sb, k, seed, step))
