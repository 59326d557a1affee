"""The policy table and the one entry point, :func:`select`.

Like Streaming's table of MDS encodings, adding a policy is adding a module with a
:class:`SelectionPolicy` subclass and a row in :data:`POLICIES`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from cabs_streaming.selection.balanced import Balanced
from cabs_streaming.selection.base import (
    SelectionPolicy,
    SelectionResult,
    Superbatch,
    compute_stats,
)
from cabs_streaming.selection.diversity import Diversity, Mixed
from cabs_streaming.selection.frequency import Frequency
from cabs_streaming.selection.iid import IID

POLICIES: dict[str, type[SelectionPolicy]] = {
    IID.name: IID,
    Frequency.name: Frequency,
    Diversity.name: Diversity,
    Mixed.name: Mixed,
    Balanced.name: Balanced,
}


def get_policy(name: str, options: Mapping[str, Any] | None = None) -> SelectionPolicy:
    """Build the policy registered as ``name`` with ``options``; errors list what is valid."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown selection policy {name!r}; registered policies: {sorted(POLICIES)}"
        ) from None
    return cls.from_options(options or {})


def _check_int(label: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
        raise TypeError(f"{label} must be an int, got {value!r}")
    value = int(value)
    if value < low:
        raise ValueError(f"{label} must be >= {low}, got {value}")
    return value


def select(
    policy: str | SelectionPolicy,
    offsets: Any,
    ids: Any,
    world: int,
    k: int,
    seed: int,
    step: int,
    num_concepts: int | None = None,
    columns: Mapping[str, Any] | None = None,
    **options: Any,
) -> SelectionResult:
    """Select ``k`` samples on each of ``world`` ranks from a global ragged superbatch.

    ``policy`` is a registered name (with ``options``) or a built :class:`SelectionPolicy`.
    ``offsets``/``ids`` are the rank-major CSR concept lists of all ``world * n`` samples;
    ``num_concepts`` (the vocabulary size) is optional and only tightens validation;
    ``columns`` are numeric per-sample values (``[N]`` each) for filters. The result
    holds ``int64 [world, k]`` ascending local indices and the spec's statistics. Pure: the same
    arguments give the same answer on every rank, in every process, on every resume.
    """
    started = time.perf_counter()
    if isinstance(policy, str):
        policy = get_policy(policy, options)
    elif options:
        raise TypeError("pass options either in a built policy or with a policy name, not both")
    sb = Superbatch.from_arrays(offsets, ids, world, num_concepts, columns)
    k = _check_int("k (samples kept per rank)", k, 1)
    if k > sb.per_rank:
        raise ValueError(
            f"cannot keep k={k} samples per rank from a superbatch of {sb.per_rank} per rank"
        )
    seed = _check_int("seed", seed, 0)
    step = _check_int("step", step, 0)
    kept = policy.keep(sb, k, seed, step)
    kept_global = np.flatnonzero(kept.mask)
    local = sb.local(kept_global, k)
    return SelectionResult(kept=local, stats=compute_stats(sb, kept, kept_global, started))


def stand_ins(
    policy: str | SelectionPolicy,
    offsets: Any,
    ids: Any,
    world: int,
    kept: np.ndarray,
    rank: int,
    seed: int,
    step: int,
    num_concepts: int | None = None,
    columns: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Rank ``rank``'s unkept local indices in the policy's order of preference.

    ``kept`` is ``SelectionResult.kept`` (``int64 [world, k]``) of :func:`select` with the same
    arguments. Used to replace a kept sample whose image cannot be decoded; pure like
    :func:`select`, so every rank and every resumed run picks the same stand-in.
    """
    if isinstance(policy, str):
        policy = get_policy(policy)
    sb = Superbatch.from_arrays(offsets, ids, world, num_concepts, columns)
    mask = np.zeros(sb.size, dtype=np.bool_)
    mask[(np.asarray(kept, dtype=np.int64) + sb.starts[:, None]).ravel()] = True
    return policy.reserve(sb, mask, rank, seed, step)
