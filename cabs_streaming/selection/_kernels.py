"""Compiled kernels of the selection engine (numba, single-threaded, cached on disk).

Everything here works on the ragged CSR form of a superbatch: ``offsets`` int64 ``[N + 1]`` and
``ids`` int32 ``[nnz]``, rank-major. The kernels are O(nnz) preprocessing plus an exact lazy
greedy on a monotone bucket queue; no per-sample sorting and no Python loop over samples. They
are private: the policies in this package wrap them with validation and documentation.

The machine they must be fast on has small, slow caches relative to the data (a superbatch of
20k samples touches a few MB), so the hot loops are written to touch few cache lines: per-concept
state lives in one packed table row, bucket contents are contiguous where they can be, and
branches on data are avoided where it is cheap.
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)

#: Columns of the packed per-concept table: count so far, target ``t_c``, ``1 / F_c``, and a spare
#: slot that pads a row to 32 bytes (one cache line holds two whole rows). The greedy keeps each
#: concept's current term in its own dense array instead (:func:`_gain_from_terms`).
COUNT, _TARGET, _INV_FREQ, _SPARE = 0, 1, 2, 3
#: Most buckets of the monotone priority queue of :func:`lazy_greedy`; a greedy over fewer
#: samples uses one per sample (at least ``_MIN_BUCKETS``), so that setting up the queue stays
#: proportional to the samples when ``official_compat`` runs one small greedy per rank.
_BUCKETS = 4096
_MIN_BUCKETS = 16
#: No gain exceeds 2: a term is at most ``(t - 0) / t + 1 / 1``.
_MAX_GAIN = 2.0
#: "No bonus" / "no filter" for the kernels' optional per-sample arrays (numba needs an array).
NO_BONUS = np.zeros(0, dtype=np.float64)
NO_FILTER = np.zeros(0, dtype=np.bool_)


@_jit
def ragged_bounds(offsets: np.ndarray, ids: np.ndarray):
    """``(offsets non-decreasing, smallest id, largest id)`` in one pass each, for validation.

    numpy needs a temporary array for the first and one pass each for ``min`` and ``max``; this
    is the 0.4 ms of checks at 163,840 samples down to about a third. ``ids`` must be non-empty.
    """
    ordered = True
    for g in range(offsets.shape[0] - 1):
        ordered &= offsets[g] <= offsets[g + 1]
    lo = ids[0]
    hi = ids[0]
    for e in range(ids.shape[0]):
        value = ids[e]
        lo = min(lo, value)
        hi = max(hi, value)
    return ordered, np.int64(lo), np.int64(hi)


@_jit
def distinct_lists(offsets: np.ndarray, ids: np.ndarray, num_concepts: int):
    """Per-sample distinct concepts (first-appearance order) and superbatch document frequency.

    Returns ``(d_offsets, d_ids, doc_freq)``: the CSR of ``C_g = set(L_g)`` keeping each id's first
    occurrence, and ``F_c`` = number of samples whose ``C_g`` contains ``c``. One pass with a
    "last sample seen" marker per concept, so it is O(nnz + num_concepts) with no sorting.
    """
    n = offsets.shape[0] - 1
    last = np.full(num_concepts, -1, dtype=np.int32)
    doc_freq = np.zeros(num_concepts, dtype=np.int32)
    d_offsets = np.zeros(n + 1, dtype=np.int64)
    d_ids = np.empty(ids.shape[0], dtype=np.int32)
    pos = 0
    for g in range(n):
        mark = np.int32(g)
        # Unsigned indices: numba then emits no negative-index wrap code in this hot loop.
        for e in range(np.uint64(offsets[g]), np.uint64(offsets[g + 1])):
            c = np.uint32(ids[e])
            new = last[c] != mark  # branch-free: repeats are frequent and unpredictable
            last[c] = mark
            doc_freq[c] += new
            d_ids[pos] = c
            pos += new
        d_offsets[g + 1] = pos
    return d_offsets, d_ids[:pos], doc_freq


@_jit
def concept_table(doc_freq: np.ndarray, b: int, cap: int):
    """Targets ``t_c`` (docs/selection.md#cabs-dm) packed with ``1 / F_c``; returns ``(table, K)``.

    ``table`` is ``float64 [V, 4]``: count (0), ``t_c``, ``1 / F_c``, and a spare slot that pads
    a row to 32 bytes, so a concept visit in the greedy touches one cache line instead of three;
    counts and targets are small integers, exact in float64. Absent concepts get zeros.

    Targets: ``base = min(b // K, M)``; the ``b mod K`` present concepts with the lowest ids get
    ``+1`` while ``base < M``; each is clamped to ``[1, M]``; if they sum to more than ``b`` they
    are rescaled to ``max(1, min(floor(t_c * b / sum), M))``.
    """
    v = doc_freq.shape[0]
    table = np.zeros((v, 4), dtype=np.float64)
    present = 0
    for c in range(v):
        present += doc_freq[c] > 0
    if present == 0:
        return table, 0
    base = min(b // present, cap)
    extra = b % present if base < cap else 0
    # Present and absent concepts interleave at random, so this loop computes every row
    # without branching on which it is (an absent concept multiplies out to zeros).
    total = 0
    seen = 0  # present concepts before c
    for c in range(v):
        f = doc_freq[c]
        here = np.int64(f > 0)
        t = min(max(base + np.int64(seen < extra), 1), cap) * here
        seen += here
        table[c, _TARGET] = t
        table[c, _INV_FREQ] = np.float64(here) / max(f, 1)
        total += t
    if total > b:
        for c in range(v):
            scaled = np.int64(table[c, _TARGET]) * b
            if scaled >= total:
                table[c, _TARGET] = min(scaled // total, cap)
            else:  # floor(t_c * b / sum) is 0: max(1, 0) if present, 0 if absent
                table[c, _TARGET] = np.float64(scaled > 0)
    return table, present


@_jit
def weighted_concept_table(doc_freq: np.ndarray, weights: np.ndarray, b: int, cap: int):
    """Targets from per-concept weights (docs/selection.md#target-distributions).

    Present concepts share ``b`` in proportion to ``weights``: ``q_c = b * w_c / W`` (``W`` the
    sum over present concepts; all-zero weights count as equal), ``t_c = floor(q_c)`` plus one
    for the ``b - sum(floor)`` concepts with the largest remainders (ties to the lower id), then
    the clamp to ``[1, M]`` and the rescale of :func:`concept_table`. Equal weights give exactly
    :func:`concept_table`'s targets. Same ``(table, K)`` layout.
    """
    v = doc_freq.shape[0]
    table = np.zeros((v, 4), dtype=np.float64)
    present = 0
    total_w = 0.0
    for c in range(v):
        if doc_freq[c] > 0:
            present += 1
            total_w += weights[c]
    if present == 0:
        return table, 0
    uniform = not total_w > 0.0
    members = np.empty(present, dtype=np.int64)
    remainder = np.empty(present, dtype=np.float64)
    j = 0
    given = 0
    for c in range(v):
        if doc_freq[c] > 0:
            q = b / present if uniform else b * weights[c] / total_w
            whole = np.floor(q)
            table[c, _TARGET] = whole
            table[c, _INV_FREQ] = 1.0 / doc_freq[c]
            given += np.int64(whole)
            members[j] = c
            remainder[j] = whole - q  # ascending order = largest remainder first
            j += 1
    left = min(b - given, present)
    if left > 0:
        # The ``left`` largest remainders, ties to the lower id, by a selection rather than a
        # sort: the ``left``-th smallest ``floor - q`` is the threshold; everything below it
        # gets +1, and of the ties at it the lowest ids (``members`` ascends) as many as remain.
        threshold = np.partition(remainder, left - 1)[left - 1]
        ties = left
        for i in range(present):
            ties -= remainder[i] < threshold
        for i in range(present):
            r = remainder[i]
            if r < threshold:
                table[members[i], _TARGET] += 1.0
            elif r == threshold and ties > 0:
                table[members[i], _TARGET] += 1.0
                ties -= 1
    total = 0
    for i in range(present):
        c = members[i]
        t = min(max(table[c, _TARGET], 1.0), float(cap))
        table[c, _TARGET] = t
        total += np.int64(t)
    if total > b:
        for i in range(present):
            c = members[i]
            scaled = np.int64(table[c, _TARGET]) * b
            if scaled >= total:
                table[c, _TARGET] = min(scaled // total, cap)
            else:
                table[c, _TARGET] = 1.0
    return table, present


@_jit
def _sift_down(heap: np.ndarray, size: int, pos: int) -> None:
    """Restore the max-heap below ``pos``.

    Rows are (gain, index), higher gain first, ties to the lower index; indices are exact float64
    integers so that a node is one contiguous row.
    """
    gain = heap[pos, 0]
    idx = heap[pos, 1]
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        right = child + 1
        if right < size and (
            heap[right, 0] > heap[child, 0]
            or (heap[right, 0] == heap[child, 0] and heap[right, 1] < heap[child, 1])
        ):
            child = right
        if not (heap[child, 0] > gain or (heap[child, 0] == gain and heap[child, 1] < idx)):
            break
        heap[pos, 0] = heap[child, 0]
        heap[pos, 1] = heap[child, 1]
        pos = child
    heap[pos, 0] = gain
    heap[pos, 1] = idx


@_jit
def _pop(heap: np.ndarray, size: int) -> int:
    """Remove the top row; returns the new size."""
    size -= 1
    heap[0, 0] = heap[size, 0]
    heap[0, 1] = heap[size, 1]
    _sift_down(heap, size, 0)
    return size


@_jit
def _gain(
    g: int, offsets: np.ndarray, ids: np.ndarray, table: np.ndarray, cap: float, over_value: float
) -> float:
    """Gain of sample ``g`` under the current counts, or NaN when a concept is at the cap.

    Terms are summed in list order so that a re-evaluation with unchanged counts reproduces the
    stored gain bit for bit (the lazy greedy relies on it). ``(t - n) / t`` in float64 equals the
    correctly rounded quotient of the integers, as in a plain Python transcription of the spec.
    """
    start = offsets[g]
    end = offsets[g + 1]
    total = 0.0
    for e in range(start, end):
        c = ids[e]
        n_c = table[c, COUNT]
        if n_c >= cap:
            return np.nan
        t_c = table[c, _TARGET]
        if n_c < t_c:
            total += (t_c - n_c) / t_c + table[c, _INV_FREQ]
        else:
            total += over_value
    return total / (end - start)


@_jit
def _term(table: np.ndarray, c: int, cap: float, over_value: float) -> float:
    """Concept ``c``'s term of a gain under the current count; NaN when it is at the cap.

    The same float64 operations as :func:`_gain`, so a gain summed from stored terms has the
    bits of one computed directly.
    """
    n_c = table[c, COUNT]
    if n_c >= cap:
        return np.nan
    t_c = table[c, _TARGET]
    if n_c < t_c:
        return (t_c - n_c) / t_c + table[c, _INV_FREQ]
    return over_value


@_jit
def _gain_from_terms(g: int, offsets: np.ndarray, ids: np.ndarray, terms: np.ndarray) -> float:
    """:func:`_gain` from the per-concept terms :func:`lazy_greedy` keeps in ``terms``.

    One load and one add per concept, no division and no data-dependent branch: the greedy
    evaluates gains about twice per sample, and this loop is most of its time. ``terms`` is its
    own dense float64 array (8 bytes a concept, not a 32-byte table row), so the concepts this
    loop touches share cache lines: 150 KB for 19k concepts instead of 600 KB. A concept at the
    cap stores NaN, which the sum propagates, so the result is NaN exactly when :func:`_gain`'s
    is; otherwise the terms are added in list order, so the bits are :func:`_gain`'s too.
    """
    start = offsets[np.uint64(g)]
    end = offsets[np.uint64(g) + np.uint64(1)]
    total = 0.0
    for e in range(np.uint64(start), np.uint64(end)):  # unsigned: no negative-index wrap code
        total += terms[np.uint32(ids[e])]
    return total / (end - start)


@_jit
def _eligible(g: int, offsets: np.ndarray, ids: np.ndarray, table: np.ndarray, cap: float) -> bool:
    for e in range(offsets[g], offsets[g + 1]):
        if table[ids[e], COUNT] >= cap:
            return False
    return True


@_jit
def _take(
    g: int,
    offsets: np.ndarray,
    ids: np.ndarray,
    table: np.ndarray,
    terms: np.ndarray,
    kept: np.ndarray,
    cap: float,
    over_value: float,
):
    """Keep sample ``g``: count its concepts and bring their stored terms up to date."""
    kept[g] = True
    for e in range(np.uint64(offsets[g]), np.uint64(offsets[g + 1])):  # unsigned: no wrap code
        c = np.uint32(ids[e])
        table[c, COUNT] += 1.0
        terms[c] = _term(table, c, cap, over_value)


@_jit
def _bucket(gain: float, low: float, scale: float, buckets: int) -> int:
    """Monotone map of a gain to a bucket: a higher gain never lands in a lower bucket."""
    b = int((gain - low) * scale)
    if b < 0:
        return 0
    if b >= buckets:
        return buckets - 1
    return b


@_jit
def _admit(
    h: int,
    first: int,
    offsets: np.ndarray,
    ids: np.ndarray,
    n_per_rank: int,
    quota: np.ndarray,
    terms: np.ndarray,
    low: float,
    scale: float,
    buckets: int,
    active: int,
    link: np.ndarray,
    head: np.ndarray,
    heap: np.ndarray,
    size: int,
    any_full: bool,
    bonus: np.ndarray,
) -> int:
    """Bring entry ``h`` of the opening bucket up to date; returns the heap size.

    The entry is dropped if ineligible, re-parked if its gain fell below the bucket, else added
    to the open heap.

    Re-evaluating here, once per entry, is cheaper than heap-inserting stale entries only to pop
    and park them again when they surface.
    """
    g = first + h
    if any_full and quota[g // n_per_rank] == 0:  # skip the division while no rank is full
        return size
    gain = _gain_from_terms(g, offsets, ids, terms)
    if bonus.shape[0]:
        gain += bonus[g]
    if gain != gain:
        return size
    b = _bucket(gain, low, scale, buckets)
    if b == active:
        top = np.uint64(size)
        heap[top, 0] = gain
        heap[top, 1] = g
        return size + 1
    link[np.uint64(h)] = head[np.uint64(b)]
    head[np.uint64(b)] = np.int32(h)
    return size


@_jit
def lazy_greedy(
    offsets: np.ndarray,
    ids: np.ndarray,
    first: int,
    stop: int,
    n_per_rank: int,
    quota: np.ndarray,
    table: np.ndarray,
    cap: int,
    over_value: float,
    kept: np.ndarray,
    bonus: np.ndarray,
    allowed: np.ndarray,
) -> int:
    """Exact greedy over samples ``first..stop-1``, recording picks in ``kept`` (bool, global).

    Each sample's list ``ids[offsets[g]:offsets[g+1]]`` is what counts and divides: distinct
    concepts in the default form, instances in ``official_compat``. A pick adds 1 to the count
    (column ``COUNT`` of ``table``, updated in place) per list entry and takes one unit of
    ``quota[g // n_per_rank]``. A sample is eligible while its rank has quota and none of its
    concepts has reached ``cap``; both only ever get worse, and gains only fall as counts rise.
    Samples with an empty list never enter. Returns the number of picks.

    The queue is a monotone bucket queue: gains map to ordered buckets (``_BUCKETS``, or one per
    sample for a small greedy; any number is exact), and only the
    highest non-empty bucket is held in an exact (gain desc, index asc) heap. Re-evaluated gains
    only fall, so entries only move to the open bucket or a lower one, and the open bucket's heap
    top, re-evaluated and found unchanged, is the exact arg-max with ties to the lower index.
    Entries are re-evaluated when their bucket opens (:func:`_admit`): ineligible ones are dropped
    for good, stale ones re-parked lower. Initial entries sit in contiguous per-bucket segments
    (a counting sort); re-parked ones in linked lists.
    No gain is below ``low = min(over_value, 0)`` (a term is positive or ``over_value``), so once
    the best stored gain is ``low`` every remaining eligible sample has gain exactly ``low`` (all
    its concepts over target) and the order is plain index order: the rest is a linear scan.

    ``bonus`` (float64 ``[N]``, or empty for none) is a fixed, non-negative per-sample addition
    to the gain (``mixed``'s FM term): it does not change as counts rise, so gains still only
    fall, and a candidate at ``low`` still has a zero bonus, so the floor scan stays exact.
    ``allowed`` (bool ``[N]``, or empty for all) keeps samples that failed the filters out.
    """
    local = stop - first
    fcap = float(cap)
    low = over_value if over_value < 0.0 else 0.0
    buckets = min(_BUCKETS, max(_MIN_BUCKETS, local))
    high = _MAX_GAIN
    has_bonus = bonus.shape[0] > 0
    if has_bonus:
        largest = 0.0
        for g in range(first, stop):
            largest = max(largest, bonus[g])
        high += largest
    filtered = allowed.shape[0] > 0
    scale = buckets / (high - low)

    terms = np.empty(table.shape[0], dtype=np.float64)  # only read for concepts set below
    # Initial gains, then a counting sort of the candidates into contiguous bucket segments.
    bucket_of = np.full(local, -1, dtype=np.int32)
    segment = np.zeros(buckets + 1, dtype=np.int64)
    for h in range(local):
        g = first + h
        start = offsets[g]
        end = offsets[g + 1]
        if filtered and not allowed[g]:
            continue
        if end > start:
            # Store every concept's term for the counts the table starts with (0 in both
            # forms) and sum them in list order: the same bits _gain computes.
            total = 0.0
            for e in range(np.uint64(start), np.uint64(end)):  # unsigned: no wrap code
                c = np.uint32(ids[e])
                if table[c, COUNT] == 0.0 and table[c, _TARGET] > 0.0 and fcap > 0.0:
                    # _term without its division: (t - 0) / t is exactly 1.0
                    term = 1.0 + table[c, _INV_FREQ]
                else:
                    term = _term(table, c, fcap, over_value)
                terms[c] = term
                total += term
            gain = total / (end - start)
            if has_bonus:
                gain += bonus[g]
            if gain != gain:  # a concept already at the cap: never eligible
                continue
            b = _bucket(gain, low, scale, buckets)
            bucket_of[h] = b
            segment[np.uint64(b) + np.uint64(1)] += 1
    for b in range(buckets):
        segment[b + 1] += segment[b]
    cursor = segment[:-1].copy()
    members = np.empty(segment[buckets], dtype=np.int32)
    for h in range(local):
        b = bucket_of[h]
        if b >= 0:
            slot = np.uint32(b)
            members[np.uint64(cursor[slot])] = h
            cursor[slot] += 1
    link = np.empty(local, dtype=np.int32)
    head = np.full(buckets, -1, dtype=np.int32)

    heap = np.empty((local, 2), dtype=np.float64)
    size = 0
    active = buckets
    remaining = 0
    any_full = False
    for r in range(quota.shape[0]):
        remaining += quota[r]
        any_full |= quota[r] == 0
    picks = 0
    floor_phase = False
    while remaining > 0:
        if size == 0:  # open the next non-empty bucket into the heap
            active -= 1
            while active >= 0 and head[active] == -1 and segment[active] == segment[active + 1]:
                active -= 1
            if active < 0:
                break
            for m in range(np.uint64(segment[active]), np.uint64(segment[active + 1])):
                size = _admit(
                    members[m], first, offsets, ids, n_per_rank, quota, terms, low, scale,
                    buckets, active, link, head, heap, size, any_full, bonus,
                )
            h = head[active]
            head[active] = -1
            while h != -1:
                following = link[np.uint64(h)]
                size = _admit(
                    h, first, offsets, ids, n_per_rank, quota, terms, low, scale, buckets,
                    active, link, head, heap, size, any_full, bonus,
                )
                h = following
            for pos in range((size - 2) // 2, -1, -1):
                _sift_down(heap, size, pos)
            continue
        top = heap[0, 0]
        if top == low:
            floor_phase = True
            break
        g = np.int64(heap[0, 1])
        rank = g // n_per_rank
        gain = np.nan
        if quota[rank] > 0:
            gain = _gain_from_terms(g, offsets, ids, terms)
            if has_bonus:
                gain += bonus[g]
        if gain != gain:  # rank full or a concept at the cap: ineligible for good
            size = _pop(heap, size)
        elif gain >= top:  # unchanged since stored: the true maximum
            size = _pop(heap, size)
            _take(g, offsets, ids, table, terms, kept, fcap, over_value)
            quota[rank] -= 1
            any_full |= quota[rank] == 0
            remaining -= 1
            picks += 1
        else:
            b = _bucket(gain, low, scale, buckets)
            if b == active:  # still in the open bucket: let it sink
                heap[0, 0] = gain
                _sift_down(heap, size, 0)
            else:  # park it in its lower bucket
                size = _pop(heap, size)
                h = g - first
                link[h] = head[b]
                head[b] = np.int32(h)

    if floor_phase:
        # The open bucket is the lowest and its heap top is the lowest possible gain, so the heap
        # holds every remaining candidate, all at that gain: take them in index order while they
        # stay eligible.
        live = np.zeros(local, dtype=np.bool_)
        for pos in range(size):
            live[np.int64(heap[pos, 1]) - first] = True
        for h in range(local):
            if remaining == 0:
                break
            if not live[h]:
                continue
            g = first + h
            rank = g // n_per_rank
            if quota[rank] > 0 and _eligible(g, offsets, ids, table, fcap):
                _take(g, offsets, ids, table, terms, kept, fcap, over_value)
                quota[rank] -= 1
                remaining -= 1
                picks += 1
    return picks


@_jit
def per_rank_greedy(
    offsets: np.ndarray,
    ids: np.ndarray,
    world: int,
    quota: np.ndarray,
    table: np.ndarray,
    cap: int,
    over_value: float,
    kept: np.ndarray,
    allowed: np.ndarray,
) -> int:
    """``official_compat``: :func:`lazy_greedy` on every rank's samples alone, with its own counts.

    Before a rank's greedy only the counts of the concepts in that rank's lists are reset: the
    greedy reads no others, so the work is O(nnz) over all ranks, not O(world * vocabulary), and
    the loop over ranks stays compiled (1,024 ranks cost no Python calls).
    """
    n = (offsets.shape[0] - 1) // world
    picks = 0
    for rank in range(world):
        for e in range(offsets[rank * n], offsets[(rank + 1) * n]):
            table[ids[e], COUNT] = 0.0
        picks += lazy_greedy(
            offsets, ids, rank * n, (rank + 1) * n, n, quota, table, cap, over_value, kept,
            NO_BONUS, allowed,
        )
    return picks


@_jit
def kept_statistics(
    offsets: np.ndarray, ids: np.ndarray, kept_global: np.ndarray, num_concepts: int
):
    """Statistics of the kept global batch.

    Returns (distinct concepts, empty samples, max concept count, total instances); a concept's
    count is the number of kept samples that contain it.
    """
    last = np.full(num_concepts, -1, dtype=np.int32)
    count = np.zeros(num_concepts, dtype=np.int32)
    empty = 0
    instances = 0
    for i in range(kept_global.shape[0]):
        g = kept_global[i]
        mark = np.int32(i)
        start = offsets[g]
        end = offsets[g + 1]
        empty += end == start
        instances += end - start
        for e in range(np.uint64(start), np.uint64(end)):  # unsigned: no wrap code
            c = np.uint32(ids[e])
            count[c] += last[c] != mark
            last[c] = mark
    distinct = 0
    largest = 0
    for c in range(num_concepts):
        distinct += count[c] > 0
        largest = max(largest, count[c])
    return distinct, empty, largest, instances


@_jit
def count_present(ids: np.ndarray, num_concepts: int) -> int:
    """``K``: the number of distinct concept ids in ``ids`` (branch-free marking, then a sum)."""
    seen = np.zeros(num_concepts, dtype=np.uint8)
    for e in range(ids.shape[0]):
        seen[ids[e]] = 1
    present = 0
    for c in range(num_concepts):
        present += seen[c]
    return present


@_jit
def top_k_by_length(offsets: np.ndarray, world: int, k: int, allowed: np.ndarray) -> np.ndarray:
    """Per rank, mark the ``k`` samples with the longest lists, ties to the lower index.

    A counting selection instead of a sort: find the length ``s*`` of the k-th best sample from a
    histogram of lengths, keep everything longer and the first samples of length ``s*``. With
    ``allowed`` non-empty (filters on) only passing samples count; a rank with fewer than ``k``
    keeps them all (the fill completes it).
    """
    size = offsets.shape[0] - 1
    n = size // world
    filtered = allowed.shape[0] > 0
    longest = 0
    for g in range(size):
        longest = max(longest, offsets[g + 1] - offsets[g])
    mask = np.zeros(size, dtype=np.bool_)
    histogram = np.zeros(longest + 1, dtype=np.int64)
    for rank in range(world):
        histogram[:] = 0
        passing = 0
        for g in range(rank * n, (rank + 1) * n):
            if filtered and not allowed[g]:
                continue
            histogram[offsets[g + 1] - offsets[g]] += 1
            passing += 1
        want = min(k, passing)
        if want == 0:
            continue
        threshold = longest
        above = 0  # samples strictly longer than threshold
        while above + histogram[threshold] < want:
            above += histogram[threshold]
            threshold -= 1
        ties = want - above  # samples of length == threshold to keep, lowest index first
        for g in range(rank * n, (rank + 1) * n):
            if filtered and not allowed[g]:
                continue
            length = offsets[g + 1] - offsets[g]
            if length > threshold:
                mask[g] = True
            elif length == threshold and ties > 0:
                mask[g] = True
                ties -= 1
    return mask


@_jit
def reserve_scores(
    offsets: np.ndarray,
    ids: np.ndarray,
    lo: int,
    hi: int,
    kept: np.ndarray,
    counted: np.ndarray,
    table: np.ndarray,
    cap: int,
    over_value: float,
    bonus: np.ndarray,
) -> np.ndarray:
    """CABS-DM's preference for the unkept samples ``lo..hi`` once the kept batch is final.

    Counts ``n_c`` are rebuilt from the kept samples flagged in ``counted`` (all ranks for the
    default form, one rank for compat), then each unkept sample gets the gain the greedy would
    give it next: its DM gain while eligible, ``low - 1`` when it has no concepts (the fill takes
    those first), ``low - 2`` when a concept is at the cap. Kept samples get ``-inf``.
    """
    table[:, COUNT] = 0.0
    for g in range(offsets.shape[0] - 1):
        if counted[g]:
            for e in range(offsets[g], offsets[g + 1]):
                table[ids[e], COUNT] += 1.0
    low = min(0.0, over_value)
    out = np.empty(hi - lo, dtype=np.float64)
    for g in range(lo, hi):
        if kept[g]:
            out[g - lo] = -np.inf
        elif offsets[g] == offsets[g + 1]:
            out[g - lo] = low - 1.0
        else:
            gain = _gain(g, offsets, ids, table, float(cap), over_value)
            if bonus.shape[0] and not np.isnan(gain):
                gain += bonus[g]
            out[g - lo] = low - 2.0 if np.isnan(gain) else gain
    return out


@_jit
def _kth_smallest_key(values: np.ndarray, count: int, m: int) -> float:
    """The ``m``-th smallest (1-based) of ``values[:count]``, keys in ``[0, 1)``.

    A one-level radix selection for uniform keys: ``floor(u * count)`` is monotone in ``u``, so a
    histogram over ``count`` buckets finds the bucket holding the ``m``-th key, and only that
    bucket (about one key) is sorted. O(count), with no copy of the keys.
    """
    histogram = np.zeros(count, dtype=np.int64)
    for i in range(count):
        histogram[np.uint64(min(int(values[i] * count), count - 1))] += 1  # unsigned: no wrap
    below = 0
    bucket = 0
    while below + histogram[bucket] < m:
        below += histogram[bucket]
        bucket += 1
    inside = np.empty(histogram[bucket], dtype=np.float64)
    j = 0
    for i in range(count):
        if min(int(values[i] * count), count - 1) == bucket:  # rare: about one key matches
            inside[j] = values[i]
            j += 1
    inside.sort()
    return inside[m - below - 1]


@_jit
def _take_lowest(keys: np.ndarray, idx: np.ndarray, count: int, m: int, buffer, kept) -> int:
    """Keep the ``m`` of samples ``idx[:count]`` (ascending) that come first by ``(key, index)``.

    All of them when there are no more than ``m``. Otherwise a selection, not a sort: the
    ``m``-th smallest key ``u*`` (:func:`_kth_smallest_key`, O(count)), then one scan in index
    order keeps every key below ``u*`` and the lowest-index ties at ``u*``. Returns how many.
    """
    if count <= m:
        for i in range(count):
            kept[idx[i]] = True
        return count
    for i in range(count):
        buffer[i] = keys[np.uint64(idx[i])]
    threshold = _kth_smallest_key(buffer, count, m)
    ties = m
    for i in range(count):
        ties -= buffer[i] < threshold
    for i in range(count):
        # Without branches: whether a key is below the threshold is a coin toss.
        u = buffer[i]
        tie = u == threshold and ties > 0
        ties -= tie
        j = np.uint64(idx[i])
        kept[j] = kept[j] | (u < threshold) | tie
    return m


@_jit
def iid_in_order(keys: np.ndarray, world: int, k: int, kept: np.ndarray) -> None:
    """IID (docs/selection.md#iid): every rank keeps its ``k`` samples first by ``(key, index)``."""
    n = keys.shape[0] // world
    idx = np.arange(n, dtype=np.int64)
    buffer = np.empty(n, dtype=np.float64)
    for r in range(world):
        _take_lowest(keys[r * n : (r + 1) * n], idx, n, k, buffer, kept[r * n : (r + 1) * n])


@_jit
def fill_in_order(
    keys: np.ndarray, offsets: np.ndarray, world: int, k: int, kept, allowed: np.ndarray
) -> int:
    """The fill (docs/selection.md#the-fill): empty samples first, then the others.

    A rank short of ``k`` takes, by ``(key, index)``, its unkept samples without concepts
    first, then its other unkept samples, and only then (``allowed`` non-empty: filters are on)
    its samples that failed the filters. One scan per rank sorts its unkept samples into the
    groups (each in index order); ranks already full cost one count. Returns the number of
    samples added.
    """
    n = (offsets.shape[0] - 1) // world
    filtered = allowed.shape[0] > 0
    empty = np.empty(n, dtype=np.int64)
    other = np.empty(n, dtype=np.int64)
    failed = np.empty(n if filtered else 0, dtype=np.int64)
    buffer = np.empty(n, dtype=np.float64)
    added = 0
    for r in range(world):
        need = k
        for g in range(r * n, (r + 1) * n):
            need -= kept[g]
        if need <= 0:
            continue
        n_empty = 0
        n_other = 0
        n_failed = 0
        if filtered:
            for g in range(r * n, (r + 1) * n):
                if kept[g]:
                    continue
                if not allowed[g]:
                    failed[n_failed] = g
                    n_failed += 1
                elif offsets[g] == offsets[g + 1]:
                    empty[n_empty] = g
                    n_empty += 1
                else:
                    other[n_other] = g
                    n_other += 1
        else:
            # Without branches (kept or not is a coin toss): every index is written to both
            # lists, and only the list it belongs to advances over it.
            for g in range(r * n, (r + 1) * n):
                open_ = not kept[g]
                blank = offsets[g] == offsets[g + 1]
                empty[np.uint64(n_empty)] = g
                other[np.uint64(n_other)] = g
                n_empty += open_ and blank
                n_other += open_ and not blank
        taken = _take_lowest(keys, empty, n_empty, need, buffer, kept)
        if taken < need:
            taken += _take_lowest(keys, other, n_other, need - taken, buffer, kept)
        if taken < need:
            taken += _take_lowest(keys, failed, n_failed, need - taken, buffer, kept)
        added += taken
    return added


@_jit
def iid_allowed(keys: np.ndarray, world: int, k: int, allowed: np.ndarray, kept) -> int:
    """IID under filters: each rank's passing samples by ``(key, index)``, up to ``k``.

    Returns how many were kept; the fill then completes short ranks from the failing samples in
    the same order.
    """
    n = keys.shape[0] // world
    idx = np.empty(n, dtype=np.int64)
    buffer = np.empty(n, dtype=np.float64)
    total = 0
    for r in range(world):
        count = 0
        for g in range(r * n, (r + 1) * n):
            if allowed[g]:
                idx[count] = g
                count += 1
        total += _take_lowest(keys, idx, count, k, buffer, kept)
    return total


@_jit
def balanced_probability(
    d_offsets: np.ndarray, d_ids: np.ndarray, counts: np.ndarray, threshold: float,
    allowed: np.ndarray,
) -> np.ndarray:
    """``balanced``'s keep probability per sample (docs/selection.md#balanced).

    ``p_g = 1 - prod over c in C_g of (1 - min(1, threshold / N_c))``, multiplied in
    first-appearance order, a concept with ``N_c = 0`` counting as ``min(...) = 1``; 0 for a
    sample without concepts or failing the filters.
    """
    n = d_offsets.shape[0] - 1
    filtered = allowed.shape[0] > 0
    out = np.zeros(n, dtype=np.float64)
    for g in range(n):
        start = d_offsets[g]
        end = d_offsets[g + 1]
        if end == start or (filtered and not allowed[g]):
            continue
        miss = 1.0
        for e in range(start, end):
            count = counts[d_ids[e]]
            share = 1.0 if count <= 0.0 else min(1.0, threshold / count)
            miss *= 1.0 - share
        out[g] = 1.0 - miss
    return out


@_jit
def take_smallest_per_rank(values: np.ndarray, world: int, k: int, kept) -> int:
    """Mark, per rank, up to ``k`` samples with the smallest finite ``(values[g], g)``.

    A sort of each rank's finite values (a stable argsort: ties to the lower index); samples
    whose value is ``inf`` are never taken here (the fill takes them). Returns how many.
    """
    n = values.shape[0] // world
    total = 0
    for r in range(world):
        row = values[r * n : (r + 1) * n]
        order = np.argsort(row, kind="mergesort")
        taken = 0
        for j in range(n):
            if taken == k:
                break
            i = order[j]
            if row[i] == np.inf:
                break
            kept[r * n + i] = True
            taken += 1
        total += taken
    return total
