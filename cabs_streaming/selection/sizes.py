"""How many samples to draw and to keep: the one home of the batch arithmetic.

The trainer (from the recipe's global batch), the algorithm (from the superbatch it is handed),
the concept report and the benchmarks all size batches here, with one rule: a size that is not a
whole number is an error naming a working alternative, never a silent rounding, because a
rounded superbatch would change the filter ratio. The rule is
docs/selection.md#batch-sizes-and-the-filter-ratio.
Plain Python: the recipe is checked with it before the heavy stack is imported.
"""

from __future__ import annotations

__all__ = ["check_filter_ratio", "keep_per_rank", "superbatch_per_rank", "superbatch_size"]

#: How far ``n * (1 - f)`` may lie from a whole number and still be one (``1 - 0.8`` is not
#: exact in binary).
TOLERANCE = 1e-6


def check_filter_ratio(filter_ratio: float) -> float:
    """``filter_ratio`` as a float, or ``ValueError`` unless it lies in ``[0, 1)``."""
    if isinstance(filter_ratio, bool) or not 0.0 <= filter_ratio < 1.0:
        raise ValueError(f"filter_ratio must lie in [0, 1), got {filter_ratio}")
    return float(filter_ratio)


def _whole(value: float) -> int | None:
    """``value`` as an int when it is one (within ``TOLERANCE``), else None."""
    nearest = round(value)
    return nearest if abs(value - nearest) <= TOLERANCE else None


def keep_per_rank(superbatch: int, filter_ratio: float) -> int:
    """Samples kept from a superbatch of ``superbatch``: ``superbatch * (1 - filter_ratio)``.

    It must be a whole number of at least 1: a fractional quota would make ranks disagree on
    the batch size or silently round.
    """
    kept = superbatch * (1.0 - check_filter_ratio(filter_ratio))
    k = _whole(kept)
    if k is None or k < 1:
        raise ValueError(
            f"a superbatch of {superbatch} per rank with filter_ratio={filter_ratio} keeps "
            f"{kept:g} samples, not a whole number: choose the batch size so that "
            "superbatch * (1 - filter_ratio) is an integer"
        )
    return k


def superbatch_size(kept: int, filter_ratio: float) -> int:
    """The superbatch that keeps ``kept`` samples: ``kept / (1 - filter_ratio)``, a whole number.

    The converse of :func:`keep_per_rank`, which it checks: ``keep_per_rank(n, f) == kept``.
    """
    exact = kept / (1.0 - check_filter_ratio(filter_ratio))
    n = _whole(exact)
    if kept < 1 or n is None:
        raise ValueError(
            f"keeping {kept} samples at filter_ratio={filter_ratio} needs a superbatch of "
            f"{exact:g} samples, not a whole number; choose a batch size that divided by "
            f"(1 - filter_ratio) = {1 - filter_ratio:g} is an integer"
        )
    keep_per_rank(n, filter_ratio)
    return n


def superbatch_per_rank(global_batch: int, world: int, filter_ratio: float) -> int:
    """Per-rank superbatch ``n = global_batch / (world * (1 - filter_ratio))``, a whole number.

    The kept per-rank batch ``global_batch / world`` must be whole too. Errors name the
    recipe's keys, because this is where a recipe's batch size meets the world size.
    """
    if global_batch < 1 or global_batch % world:
        raise ValueError(
            f"global_train_batch_size={global_batch} does not divide over {world} ranks; to "
            "resume a run on another number of ranks, keep global_train_batch_size and choose "
            "a number of ranks that divides it"
        )
    kept = global_batch // world
    try:
        return superbatch_size(kept, filter_ratio)
    except ValueError:
        exact = kept / (1.0 - check_filter_ratio(filter_ratio))
        raise ValueError(
            f"global_train_batch_size={global_batch} on {world} rank(s) with filter_ratio="
            f"{filter_ratio} needs a superbatch of {exact:g} samples per rank, not a whole "
            f"number; choose a batch size whose per-rank share {kept} divided by "
            f"(1 - filter_ratio) = {1 - filter_ratio:g} is an integer"
        ) from None
