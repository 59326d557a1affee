"""IID selection: the baseline, and the special case of a constant score."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cabs_streaming.selection import _kernels
from cabs_streaming.selection.base import Kept, SelectionPolicy, Superbatch, fill_quota, step_keys


def iid_keep(sb: Superbatch, k: int, seed: int, step: int) -> np.ndarray:
    """Keep ``k`` samples per rank, uniformly without replacement.

    Rank ``r`` keeps its ``k`` samples with the smallest ``(step_keys(seed, step, N)[g], g)``
    (docs/selection.md#iid), so the answer changes with the step and is identical on every rank
    and on resume. With ``k == n`` (filter ratio 0) every sample is kept.
    """
    mask = np.zeros(sb.size, dtype=np.bool_)
    if sb.allowed is not None:  # passing samples in the seeded order; the fill does the rest
        _kernels.iid_allowed(step_keys(seed, step, sb.size), sb.world, k, sb.allowed, mask)
        return mask
    if k == sb.per_rank:
        mask[:] = True
        return mask
    _kernels.iid_in_order(step_keys(seed, step, sb.size), sb.world, k, mask)
    return mask


@dataclass(frozen=True)
class IID(SelectionPolicy):
    """Uniform random keep; use as the baseline of every CABS experiment."""

    name = "iid"

    def keep(self, sb: Superbatch, k: int, seed: int, step: int) -> Kept:
        """See :func:`iid_keep`."""
        mask = iid_keep(sb, k, seed, step)
        filled = fill_quota(sb, mask, k, seed, step) if sb.allowed is not None else 0
        return Kept(mask, filled=filled)
