"""World-invariant selection: the kept global batch does not depend on how samples sit on ranks.

Rank-local selection (``select``) keys its randomness by rank and gives every rank a quota of
``k`` over the samples that rank happened to load, so the same global superbatch spread over 2
or 4 ranks keeps different samples. Streaming's relaxed partitioning already gives the same
*set* of samples in every global superbatch on any number of ranks (for a constant global batch
and ``num_canonical_nodes``); this module keeps that invariance through selection
(docs/selection.md#world-invariant-selection):

1. :func:`canonical_order` sorts the global superbatch by each sample's global index in the
   dataset (what Streaming's ``__getitem__`` was called with), so the policy sees the same
   input whatever the world size and whichever rank loaded what;
2. :func:`select_invariant` runs the policy once over that canonical superbatch as a single
   rank with the global quota ``world * k``: ties go to the lower sample index and the
   randomness is the step's keys ``default_rng([seed, step]).random(N)`` over the canonical
   order, which is a function of the samples, the seed and the step only;
3. :func:`assign_to_ranks` then gives every rank exactly ``k`` of the kept samples, moving as
   few as possible between ranks (only a rank's surplus over ``k``, the least possible).

Pure numpy, like the rest of ``cabs_streaming.selection``: the collective that moves the bytes
of the samples that change rank lives in ``cabs_streaming.algorithm``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cabs_streaming.selection.base import SelectionPolicy, SelectionResult, Superbatch
from cabs_streaming.selection.registry import get_policy, select

__all__ = [
    "InvariantSelection",
    "assign_to_ranks",
    "canonical_order",
    "invariant_stand_ins",
    "reorder_ragged",
    "select_invariant",
]


def canonical_order(indices: Any) -> np.ndarray:
    """The permutation that sorts a superbatch by global sample index (stable).

    Streaming repeats a sample only to pad the end of an epoch, and a repeat has the same
    index, bytes and concepts as the original, so a tie between duplicates cannot change what
    is kept.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1:
        raise ValueError(f"sample indices must be 1-D, got shape {indices.shape}")
    return np.argsort(indices, kind="stable")


def reorder_ragged(
    offsets: np.ndarray, ids: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """CSR concept lists with the samples in ``order`` (result sample ``i`` is ``order[i]``)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)[order]
    new_offsets = np.zeros(order.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    gather = np.arange(int(new_offsets[-1]), dtype=np.int64)
    gather += np.repeat(offsets[:-1][order] - new_offsets[:-1], lengths)
    return new_offsets, np.asarray(ids)[gather]


def assign_to_ranks(kept: np.ndarray, indices: np.ndarray, world: int, k: int) -> np.ndarray:
    """Give each of ``world`` ranks exactly ``k`` of the ``kept`` samples, moving the fewest.

    ``kept`` are rank-major positions in the gathered superbatch (position ``p`` was loaded by
    rank ``p // n``, ``n = len(indices) // world``) and ``indices`` the global sample index of
    every position. A rank keeps its own kept samples up to ``k``, those of lowest sample index
    first; its surplus (the highest indices) goes, in sample-index order, to the ranks short of
    ``k``, in rank order. Only surplus moves, and every rank over ``k`` must lose at least its
    surplus, so no assignment moves fewer samples. Returns ``int64 [world, k]``: the positions
    each rank trains on, each row in sample-index order. Deterministic in its arguments.
    """
    kept = np.asarray(kept, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    if kept.shape[0] != world * k:
        raise ValueError(f"{kept.shape[0]} kept samples do not give {world} ranks {k} each")
    n = indices.shape[0] // world
    kept = kept[np.lexsort((kept, indices[kept]))]  # by sample index, then position
    owner = kept // n
    rows: list[list[int]] = [[] for _ in range(world)]
    surplus: list[int] = []
    for position, rank in zip(kept.tolist(), owner.tolist(), strict=True):
        (rows[rank] if len(rows[rank]) < k else surplus).append(position)
    surplus.sort(key=lambda p: (int(indices[p]), p))
    given = iter(surplus)
    for row in rows:
        row.extend(next(given) for _ in range(k - len(row)))
    out = np.array(rows, dtype=np.int64).reshape(world, k)
    order = np.lexsort((out, indices[out]), axis=1)
    return np.take_along_axis(out, order, axis=1)


@dataclass(frozen=True)
class InvariantSelection:
    """One world-invariant selection: what is kept, and who trains on it.

    ``kept`` is the kept global set as ascending global sample indices (the world-invariant
    part); ``sources`` is ``int64 [world, k]``, the rank-major positions of the gathered
    superbatch each rank trains on (:func:`assign_to_ranks`); ``moved`` counts the samples
    whose rank changes. ``result`` is the policy's result over the canonical superbatch (one
    rank, ``world * k`` kept) with its statistics.
    """

    kept: np.ndarray
    sources: np.ndarray
    moved: int
    result: SelectionResult


def _reorder_columns(
    columns: Mapping[str, Any] | None, order: np.ndarray
) -> dict[str, np.ndarray] | None:
    """The numeric columns in canonical order, like the concept lists."""
    if not columns:
        return None
    return {name: np.asarray(values, dtype=np.float64)[order] for name, values in columns.items()}


def select_invariant(
    policy: str | SelectionPolicy,
    offsets: Any,
    ids: Any,
    indices: Any,
    world: int,
    k: int,
    seed: int,
    step: int,
    num_concepts: int | None = None,
    columns: Mapping[str, Any] | None = None,
) -> InvariantSelection:
    """Select ``world * k`` samples from the global superbatch as one rank, then assign them.

    ``offsets``/``ids`` are the gathered rank-major CSR concept lists and ``indices`` the global
    sample index of every position. The kept set is :func:`select` of the canonically ordered
    superbatch with ``world=1`` and ``k = world * k``, so it depends on the set of samples,
    the policy, the seed and the step only; the assignment to ranks is :func:`assign_to_ranks`.
    """
    indices = np.asarray(indices, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    if indices.shape[0] != offsets.shape[0] - 1:
        raise ValueError(
            f"{indices.shape[0]} sample indices for a superbatch of {offsets.shape[0] - 1} samples"
        )
    if indices.shape[0] % world:
        raise ValueError(
            f"the global superbatch of {indices.shape[0]} samples does not split over "
            f"world={world} ranks"
        )
    order = canonical_order(indices)
    c_offsets, c_ids = reorder_ragged(offsets, np.asarray(ids), order)
    result = select(
        policy,
        c_offsets,
        c_ids,
        world=1,
        k=world * k,
        seed=seed,
        step=step,
        num_concepts=num_concepts,
        columns=_reorder_columns(columns, order),
    )
    kept_positions = order[result.kept[0]]
    sources = assign_to_ranks(kept_positions, indices, world, k)
    n = indices.shape[0] // world
    moved = int(np.count_nonzero(sources // n != np.arange(world)[:, None]))
    return InvariantSelection(
        kept=np.sort(indices[kept_positions]), sources=sources, moved=moved, result=result
    )


def invariant_stand_ins(
    policy: str | SelectionPolicy,
    offsets: Any,
    ids: Any,
    indices: Any,
    world: int,
    sources: np.ndarray,
    rank: int,
    seed: int,
    step: int,
    num_concepts: int | None = None,
    columns: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Rank ``rank``'s own unkept samples (local indices) in the policy's order of preference.

    The policy's stand-in order over the canonical superbatch (as in :func:`select_invariant`),
    restricted to the samples this rank loaded itself: a stand-in replaces a kept image that
    cannot be decoded, and only the rank's own encoded bytes are at hand.
    """
    if isinstance(policy, str):
        policy = get_policy(policy)
    indices = np.asarray(indices, dtype=np.int64)
    order = canonical_order(indices)
    c_offsets, c_ids = reorder_ragged(np.asarray(offsets, dtype=np.int64), np.asarray(ids), order)
    sb = Superbatch.from_arrays(
        c_offsets, c_ids, 1, num_concepts, _reorder_columns(columns, order)
    )
    mask = np.zeros(sb.size, dtype=np.bool_)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.shape[0])
    mask[inverse[np.asarray(sources, dtype=np.int64).ravel()]] = True
    preferred = order[policy.reserve(sb, mask, 0, seed, step)]
    n = indices.shape[0] // world
    mine = preferred[preferred // n == rank]
    return mine - rank * n
