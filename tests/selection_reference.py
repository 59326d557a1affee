"""A slow, literal transcription of docs/selection.md, the oracle for the fast selection engine.

Plain Python lists and dicts, an O(N^2) greedy that recomputes every gain at every step, and no
shared code with ``cabs_streaming.selection`` beyond numpy's Generator. Floating-point sums are
taken in list order (first appearance of each concept), which the engine documents and matches.
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def seeded_order(seed: int, step: int, size: int, rank: int, n: int) -> list[int]:
    """Rank ``rank``'s local indices by ascending (key, global index), keys of the whole step."""
    keys = np.random.default_rng([seed, step]).random(size).tolist()
    return sorted(range(n), key=lambda j: (keys[rank * n + j], rank * n + j))


def targets(doc_freq: dict[int, int], b: int, cap: int) -> dict[int, int]:
    present = sorted(doc_freq)
    if not present:
        return {}
    base = min(b // len(present), cap)
    extra = b % len(present) if base < cap else 0
    t = {}
    for position, c in enumerate(present):
        t[c] = min(max(base + (1 if position < extra else 0), 1), cap)
    total = sum(t.values())
    if total > b:
        t = {c: max(1, min(v * b // total, cap)) for c, v in t.items()}
    return t


def greedy(
    candidates: list[int],
    entries: list[list[int]],
    counts: Counter,
    t: dict[int, int],
    doc_freq: dict[int, int],
    cap: int,
    over_value: float,
    quota: list[int],
    n: int,
    kept: set[int],
    bonus: list[float] | None = None,
    allowed: list[bool] | None = None,
) -> None:
    """The greedy; ``bonus`` is ``mixed``'s fixed per-sample term, ``allowed`` the filters'."""
    while True:
        best: tuple[float, int] | None = None
        for g in candidates:
            if g in kept or quota[g // n] == 0 or not entries[g]:
                continue
            if allowed is not None and not allowed[g]:
                continue
            if any(counts[c] >= cap for c in entries[g]):
                continue
            total = 0.0
            for c in entries[g]:
                if counts[c] < t[c]:
                    total += (t[c] - counts[c]) / t[c] + 1 / doc_freq[c]
                else:
                    total += over_value
            gain = total / len(entries[g]) + (bonus[g] if bonus is not None else 0.0)
            if best is None or gain > best[0]:  # ascending scan: ties keep the lower index
                best = (gain, g)
        if best is None:
            return
        g = best[1]
        kept.add(g)
        quota[g // n] -= 1
        for c in entries[g]:
            counts[c] += 1


def fill(
    lists: list[list[int]], world: int, k: int, seed: int, step: int, kept: set[int],
    allowed: list[bool] | None = None,
) -> None:
    """Empty samples first, then the others, each in the seeded order; with filters both
    groups hold passing samples only and the failing ones come last."""
    n = len(lists) // world
    allowed = allowed if allowed is not None else [True] * len(lists)
    for rank in range(world):
        need = k - sum(1 for j in range(n) if rank * n + j in kept)
        order = seeded_order(seed, step, len(lists), rank, n)
        free = [j for j in order if rank * n + j not in kept]
        groups = (
            [j for j in free if allowed[rank * n + j] and not lists[rank * n + j]],
            [j for j in free if allowed[rank * n + j] and lists[rank * n + j]],
            [j for j in free if not allowed[rank * n + j]],
        )
        for group in groups:
            take = group[: max(0, need)]
            for j in take:
                kept.add(rank * n + j)
            need -= len(take)


def to_local(kept: set[int], world: int, n: int) -> list[list[int]]:
    return [sorted(g - rank * n for g in kept if g // n == rank) for rank in range(world)]


def diversity(
    lists: list[list[int]],
    world: int,
    k: int,
    seed: int,
    step: int,
    concept_cap: int | None = None,
    official_compat: bool = False,
) -> list[list[int]]:
    if not official_compat:
        return general_dm(lists, world, k, seed, step, concept_cap)
    n = len(lists) // world
    distinct = [list(dict.fromkeys(items)) for items in lists]
    doc_freq = dict(Counter(c for items in distinct for c in items))
    kept: set[int] = set()
    quota = [k] * world
    cap = concept_cap if concept_cap is not None else 10
    t = targets(doc_freq, k, cap)
    for rank in range(world):
        candidates = list(range(rank * n, (rank + 1) * n))
        greedy(candidates, lists, Counter(), t, doc_freq, cap, -0.5, quota, n, kept)
    fill(lists, world, k, seed, step, kept)
    return to_local(kept, world, n)


def frequency(lists: list[list[int]], world: int, k: int) -> list[list[int]]:
    n = len(lists) // world
    out = []
    for rank in range(world):
        order = sorted(range(n), key=lambda j: (-len(lists[rank * n + j]), j))
        out.append(sorted(order[:k]))
    return out


def iid(n: int, world: int, k: int, seed: int, step: int) -> list[list[int]]:
    return [sorted(seeded_order(seed, step, n * world, rank, n)[:k]) for rank in range(world)]


# ------------------------------------------------ beyond the paper (docs/selection.md, 17)


def targets_weighted(
    doc_freq: dict[int, int], weights: list[float], b: int, cap: int
) -> dict[int, int]:
    """Largest-remainder shares of ``b`` in proportion to ``weights``, then clamp and rescale."""
    present = sorted(doc_freq)
    if not present:
        return {}
    total_w = sum(weights[c] for c in present)
    q = {c: (b / len(present) if not total_w > 0 else b * weights[c] / total_w) for c in present}
    t = {c: int(np.floor(q[c])) for c in present}
    left = b - sum(t.values())
    by_remainder = sorted(present, key=lambda c: (-(q[c] - np.floor(q[c])), c))
    for c in by_remainder[:left]:
        t[c] += 1
    t = {c: min(max(v, 1), cap) for c, v in t.items()}
    total = sum(t.values())
    if total > b:
        t = {c: max(1, min(v * b // total, cap)) for c, v in t.items()}
    return t


def general_dm(
    lists: list[list[int]],
    world: int,
    k: int,
    seed: int,
    step: int,
    concept_cap: int | None = None,
    weights: list[float] | None = None,
    lam: float | None = None,
    allowed: list[bool] | None = None,
) -> list[list[int]]:
    """CABS-DM (default form) with target weights, ``mixed``'s FM term and filters."""
    size = len(lists)
    n = size // world
    distinct = [list(dict.fromkeys(items)) for items in lists]
    doc_freq = dict(Counter(c for items in distinct for c in items))
    b = world * k
    cap = concept_cap if concept_cap is not None else max(1, round(b * 10 / 1024))
    if weights is None:
        t = targets(doc_freq, b, cap)
    else:
        t = targets_weighted(doc_freq, weights, b, cap)
    longest = max((len(items) for items in lists), default=0)
    bonus = None
    if lam is not None and longest:
        bonus = [lam * (len(items) / longest) for items in lists]
    kept: set[int] = set()
    greedy(list(range(size)), distinct, Counter(), t, doc_freq, cap, 0.0, [k] * world, n, kept,
           bonus, allowed)
    fill(lists, world, k, seed, step, kept, allowed)
    return to_local(kept, world, n)


def balanced(
    lists: list[list[int]], world: int, k: int, seed: int, step: int, counts: list[int],
    threshold: float, allowed: list[bool] | None = None,
) -> list[list[int]]:
    """Per rank, the ``k`` smallest ``-log(1 - u_g) / p_g`` (p > 0), then the fill."""
    size = len(lists)
    n = size // world
    allowed = allowed if allowed is not None else [True] * size
    keys = np.random.default_rng([seed, step]).random(size).tolist()
    kept: set[int] = set()
    for rank in range(world):
        race = []
        for g in range(rank * n, (rank + 1) * n):
            distinct = list(dict.fromkeys(lists[g]))
            if not distinct or not allowed[g]:
                continue
            miss = 1.0
            for c in distinct:
                miss *= 1.0 - (min(1.0, threshold / counts[c]) if counts[c] > 0 else 1.0)
            p = 1.0 - miss
            if p > 0:
                race.append((float(-np.log1p(-keys[g]) / p), g))
        for _, g in sorted(race)[:k]:
            kept.add(g)
    fill(lists, world, k, seed, step, kept, allowed)
    return to_local(kept, world, n)
