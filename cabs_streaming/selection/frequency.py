"""CABS-FM (frequency maximisation): keep the samples with the most object instances.

Object-rich images pair with descriptive captions, which is what image-text retrieval rewards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cabs_streaming.selection import _kernels
from cabs_streaming.selection.base import Kept, SelectionPolicy, Superbatch, fill_quota


def frequency_keep(sb: Superbatch, k: int) -> np.ndarray:
    """Keep, on every rank, the ``k`` samples with the highest ``len(L_g)``.

    Repeats count (three boxes of "dog" score 3); ties go to the lower index. Needs no
    communication and no randomness: each rank's answer depends on its own samples only.
    Under filters, only passing samples are ranked; a rank left short is completed by the fill.
    """
    return _kernels.top_k_by_length(sb.offsets, sb.world, k, sb.allowed_or_all)


@dataclass(frozen=True)
class Frequency(SelectionPolicy):
    """CABS-FM: favour object multiplicity; the published recipe for retrieval."""

    name = "frequency"

    def keep(self, sb: Superbatch, k: int, seed: int, step: int) -> Kept:
        """See :func:`frequency_keep`; ``seed`` and ``step`` are unused but for the fill."""
        mask = frequency_keep(sb, k)
        filled = fill_quota(sb, mask, k, seed, step) if sb.allowed is not None else 0
        return Kept(mask, filled=filled)

    def reserve(
        self, sb: Superbatch, kept: np.ndarray, rank: int, seed: int, step: int
    ) -> np.ndarray:
        """The rank's unkept samples by FM's own ranking: most instances first, then index."""
        n = sb.per_rank
        lengths = np.diff(sb.offsets[rank * n : (rank + 1) * n + 1])
        unkept = np.flatnonzero(~kept[rank * n : (rank + 1) * n])
        return unkept[np.argsort(-lengths[unkept], kind="stable")]
