"""``selection.filters``: thresholds and top fractions on numeric per-sample columns.

Streaming's users ask for filtering while streaming that keeps resumption exact; selection after
Composer's sample count, on a deterministic global superbatch, is where it can be exact: a filter
only narrows what the policy may rank, the batch stays full, and how short the passing samples
fell is a metric (docs/selection.md#filters).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cabs_streaming.selection.base import (
    DatasetFacts,
    Kept,
    SelectionPolicy,
    Superbatch,
)


@dataclass(frozen=True)
class Filter:
    """One test on a numeric column: ``min <= value <= max`` and/or among the ``top`` share.

    ``top`` (in ``(0, 1]``) passes the ``ceil(top * N)`` highest values of the global
    superbatch, ties to the lower index. A missing value (NaN, e.g. ``concept_score_min`` of a
    sample without detections) fails every test.
    """

    column: str
    min: float | None = None
    max: float | None = None
    top: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.column, str) or not self.column:
            raise ValueError(f"a filter needs a column name, got {self.column!r}")
        for label in ("min", "max", "top"):
            value = getattr(self, label)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float | np.number)
                or not math.isfinite(value)
            ):
                raise ValueError(f"filter on {self.column!r}: {label} must be a number")
        if self.min is None and self.max is None and self.top is None:
            raise ValueError(f"filter on {self.column!r} needs min, max or top")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"filter on {self.column!r}: min {self.min} > max {self.max}")
        if self.top is not None and not 0.0 < self.top <= 1.0:
            raise ValueError(f"filter on {self.column!r}: top must lie in (0, 1], got {self.top}")

    @classmethod
    def from_config(cls, entry: Mapping[str, Any]) -> Filter:
        """From a mapping ``{column, min?, max?, top?}``; unknown keys are an error."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(entry) - set(valid))
        if unknown:
            raise ValueError(f"unknown filter key(s) {unknown}; valid keys: {valid}")
        return cls(**dict(entry))

    def passes(self, values: np.ndarray) -> np.ndarray:
        """Bool ``[N]``: which samples pass this filter."""
        ok = ~np.isnan(values)
        if self.min is not None:
            ok &= values >= self.min
        if self.max is not None:
            ok &= values <= self.max
        if self.top is not None:
            count = min(values.shape[0], math.ceil(self.top * values.shape[0]))
            ranked = np.where(np.isnan(values), -np.inf, values)
            order = np.argsort(-ranked, kind="stable")  # highest first, ties to the lower index
            top = np.zeros(values.shape[0], dtype=np.bool_)
            top[order[:count]] = True
            ok &= top
        return ok


def apply_filters(sb: Superbatch, filters: Sequence[Filter]) -> np.ndarray:
    """Bool ``[N]``: the samples that pass every filter (missing columns are errors)."""
    allowed = np.ones(sb.size, dtype=np.bool_)
    for f in filters:
        values = sb.columns.get(f.column)
        if values is None:
            raise ValueError(
                f"selection.filters uses column {f.column!r}, which the superbatch does not "
                f"carry (it has {sorted(sb.columns) or 'no columns'}); convert the data with "
                f"--numeric-column {f.column} or use concept_score_min / concept_score_max"
            )
        allowed &= f.passes(values)
    return allowed


@dataclass(frozen=True)
class Filtered(SelectionPolicy):
    """``policy`` on the samples that pass ``filters``; the fill takes failing ones last.

    A wrapper, so every policy, schedules, stand-ins and world-invariant selection get filters
    the same way. ``filter_shortfall`` (kept samples that failed) is logged every step.
    """

    policy: SelectionPolicy
    filters: tuple[Filter, ...]

    name = "filtered"

    def __post_init__(self) -> None:
        if not self.filters:
            raise ValueError("Filtered needs at least one filter")

    def _narrowed(self, sb: Superbatch) -> Superbatch:
        return dataclasses.replace(sb, allowed=apply_filters(sb, self.filters))

    def keep(self, sb: Superbatch, k: int, seed: int, step: int) -> Kept:
        """The wrapped policy's choice among passing samples, then the fill."""
        narrowed = self._narrowed(sb)
        kept = self.policy.keep(narrowed, k, seed, step)
        return dataclasses.replace(kept, allowed=narrowed.allowed)

    def reserve(
        self, sb: Superbatch, kept: np.ndarray, rank: int, seed: int, step: int
    ) -> np.ndarray:
        """The wrapped policy's order, passing samples first."""
        narrowed = self._narrowed(sb)
        order = self.policy.reserve(narrowed, kept, rank, seed, step)
        n = sb.per_rank
        passing = narrowed.allowed[rank * n : (rank + 1) * n][order]  # type: ignore[index]
        return np.concatenate([order[passing], order[~passing]])

    def bind(self, facts: DatasetFacts) -> Filtered:
        """Bind the wrapped policy."""
        return dataclasses.replace(self, policy=self.policy.bind(facts))

    def resolve(self, batches_per_epoch: int | None, max_batches: int | None) -> Filtered:
        """Resolve the wrapped policy's times."""
        return dataclasses.replace(
            self, policy=self.policy.resolve(batches_per_epoch, max_batches)
        )

    def required_columns(self) -> tuple[str, ...]:
        """The filters' columns and the wrapped policy's."""
        names = [f.column for f in self.filters] + list(self.policy.required_columns())
        return tuple(dict.fromkeys(names))

    def config(self) -> dict[str, Any]:
        """The wrapped policy's description with the filters."""
        return {
            **self.policy.config(),
            "filters": [
                {k: v for k, v in dataclasses.asdict(f).items() if v is not None}
                for f in self.filters
            ],
        }
