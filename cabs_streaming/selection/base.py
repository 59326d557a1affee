"""Shared parts of the selection policies: validated input, result, statistics, seeded fill.

A selection call sees the *global* superbatch (every rank's concept ids, all-gathered, rank-major)
and returns, for every rank, the local indices it keeps. It is a pure function of (inputs, policy
configuration, seed, step): every rank computes the same global answer and keeps its own row.
Nothing here imports Composer or torch.distributed.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from cabs_streaming.selection import _kernels

#: Concept ids index dense per-concept arrays; an id beyond this is almost surely corrupt data.
MAX_CONCEPT_ID = 1 << 27


def step_keys(seed: int, step: int, size: int) -> np.ndarray:
    """The only source of randomness in selection: one key per global sample, float64 ``[N]``.

    ``default_rng([seed, step]).random(size)``: one generator per step, not one per rank, since
    building a generator costs 10-20 us, i.e. 15-20 ms a step on 1,024 ranks, while these keys
    cost about 1 ms for 163,840 samples. A rank orders its samples by ``(key, index)``.
    """
    return np.random.default_rng([seed, step]).random(size)


@dataclass(frozen=True)
class Superbatch:
    """The global superbatch's concept ids in CSR form, validated once per call.

    ``offsets`` (int64 ``[N + 1]``) and ``ids`` (int32 ``[nnz]``) are rank-major: sample ``j`` of
    rank ``r`` is global sample ``g = r * n + j`` with concepts ``ids[offsets[g]:offsets[g+1]]``
    (one entry per detected instance, so ids may repeat; a list may be empty).

    ``columns`` are numeric per-sample values (float64 ``[N]``, same order) for the filters;
    ``allowed`` is the filters' verdict (bool ``[N]``), ``None`` when no filter is on. Every
    policy keeps failing samples out of its own ranking; only the fill may take them.
    """

    offsets: np.ndarray
    ids: np.ndarray
    world: int
    num_concepts: int
    columns: Mapping[str, np.ndarray] = field(default_factory=dict)
    allowed: np.ndarray | None = None

    @property
    def allowed_or_all(self) -> np.ndarray:
        """``allowed`` in the kernels' form: an empty array when no filter is on."""
        return _kernels.NO_FILTER if self.allowed is None else self.allowed

    @property
    def size(self) -> int:
        """``N``, the number of samples in the global superbatch."""
        return self.offsets.shape[0] - 1

    @property
    def per_rank(self) -> int:
        """``n``, the superbatch size on each rank."""
        return self.size // self.world

    @classmethod
    def from_arrays(
        cls,
        offsets: Any,
        ids: Any,
        world: int,
        num_concepts: int | None = None,
        columns: Mapping[str, Any] | None = None,
    ) -> Superbatch:
        """Check and normalise the ragged input; errors say which invariant failed."""
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        ids_in = np.asarray(ids)
        if offsets.ndim != 1 or ids_in.ndim != 1:
            raise ValueError(
                f"offsets and ids must be 1-D (got shapes {offsets.shape} and {ids_in.shape})"
            )
        if ids_in.size and not np.issubdtype(ids_in.dtype, np.integer):
            raise TypeError(f"concept ids must be integers, got dtype {ids_in.dtype}")
        if not isinstance(world, int | np.integer) or world < 1:
            raise ValueError(f"world must be a positive int, got {world!r}")
        if offsets.shape[0] < 2:
            raise ValueError("the superbatch is empty: offsets needs at least 2 entries")
        if offsets[0] != 0 or offsets[-1] != ids_in.shape[0]:
            raise ValueError(
                f"offsets must start at 0 and end at len(ids) = {ids_in.shape[0]}; "
                f"got {offsets[0]} and {offsets[-1]}"
            )
        if ids_in.size and ids_in.dtype in (np.int32, np.int64):  # the common case: compiled
            ordered, lo, hi = _kernels.ragged_bounds(offsets, np.ascontiguousarray(ids_in))
        else:
            ordered = not np.any(offsets[1:] < offsets[:-1])
            lo = int(ids_in.min()) if ids_in.size else 0
            hi = int(ids_in.max()) if ids_in.size else -1
        if not ordered:
            raise ValueError("offsets must be non-decreasing (a sample cannot have negative size)")
        size = offsets.shape[0] - 1
        if size % world:
            raise ValueError(
                f"the global superbatch of {size} samples does not split over world={world} ranks"
            )
        if lo < 0:
            raise ValueError(f"concept ids must be >= 0, found {lo}")
        if num_concepts is None:
            num_concepts = hi + 1
        elif hi >= num_concepts:
            raise ValueError(
                f"concept id {hi} is outside the vocabulary of {num_concepts} concepts; "
                "check that the data and vocabulary.json belong together"
            )
        if num_concepts > MAX_CONCEPT_ID:
            raise ValueError(
                f"{num_concepts} concepts is beyond the supported {MAX_CONCEPT_ID}: ids must be "
                "dense positions in vocabulary.json"
            )
        ids_arr = np.ascontiguousarray(ids_in, dtype=np.int32)
        checked: dict[str, np.ndarray] = {}
        for name, values in (columns or {}).items():
            arr = np.ascontiguousarray(values, dtype=np.float64)
            if arr.shape != (size,):
                raise ValueError(
                    f"column {name!r} has shape {arr.shape}; it needs one value per sample of "
                    f"the global superbatch ({size},)"
                )
            checked[name] = arr
        return cls(
            offsets=offsets, ids=ids_arr, world=int(world), num_concepts=int(num_concepts),
            columns=checked,
        )

    def local(self, kept_global: np.ndarray, k: int) -> np.ndarray:
        """Ascending kept global indices (exactly ``k`` per rank) to ``[world, k]`` local ones."""
        if kept_global.shape[0] != k * self.world:  # a bug in a policy, never bad input
            raise AssertionError(f"a policy kept {kept_global.shape[0]} samples, not {k} per rank")
        kept = kept_global.reshape(self.world, k) - self.starts[:, None]
        if kept[:, 0].min() < 0 or kept[:, -1].max() >= self.per_rank:
            raise AssertionError("a policy kept an unequal number of samples per rank")
        return kept

    @property
    def starts(self) -> np.ndarray:
        """Global index of every rank's first sample, int64 ``[world]``."""
        return np.arange(self.world, dtype=np.int64) * self.per_rank


def fill_quota(sb: Superbatch, kept: np.ndarray, k: int, seed: int, step: int) -> int:
    """Complete every rank's quota in place: unkept empty samples first, then the rest.

    Each group is taken in the seeded order of the step, ascending ``(step_keys[g], g)``
    (docs/selection.md#the-fill), as far as the rank's quota needs; the keys are drawn only when
    some rank's quota is open. Returns how many samples were added.
    """
    if np.count_nonzero(kept) == k * sb.world:  # no policy keeps more than k on a rank
        return 0
    keys = step_keys(seed, step, sb.size)
    return _kernels.fill_in_order(keys, sb.offsets, sb.world, k, kept, sb.allowed_or_all)


@dataclass(frozen=True)
class SelectionStats:
    """What every selection reports for the logger (docs/selection.md#statistics)."""

    kept_distinct: int
    """Distinct concepts in the kept global batch."""
    superbatch_distinct: int
    """Distinct concepts in the global superbatch (``K``)."""
    kept_empty_share: float
    """Share of kept samples without any concept."""
    max_concept_count: int
    """Largest number of kept samples that contain one concept."""
    mean_instances: float
    """Mean concept instances (``len(L_g)``) per kept sample."""
    filled: int
    """Samples added by the seeded fill rather than by the policy's ranking (0 for IID / FM)."""
    filtered_out: int
    """Samples of the global superbatch that failed ``selection.filters`` (0 without filters)."""
    filter_shortfall: int
    """Kept samples that failed the filters: taken by the fill because too few passed."""
    wall_ms: float
    """Wall time of the whole call (validation, policy, fill, statistics), milliseconds."""

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat dict for Composer's logger, keys optionally prefixed (e.g. ``"cabs/"``)."""
        return {prefix + f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class SelectionResult:
    """Kept local indices per rank, ``int64 [world, k]`` ascending per row, and statistics."""

    kept: np.ndarray
    stats: SelectionStats

    def for_rank(self, rank: int) -> np.ndarray:
        """The local indices rank ``rank`` keeps."""
        return self.kept[rank]


@dataclass(frozen=True)
class Kept:
    """What a policy returns: the global keep mask and what it learnt on the way."""

    mask: np.ndarray
    """Global bool ``[N]``, exactly ``k`` True per rank."""
    filled: int = 0
    """How many of the kept samples came from :func:`fill_quota`."""
    superbatch_distinct: int | None = None
    """``K`` when the policy computed it anyway (saves the statistics a pass over the ids)."""
    allowed: np.ndarray | None = None
    """The filters' verdict when a filter wrapper applied them (for the statistics)."""


@dataclass(frozen=True)
class DatasetFacts:
    """What some policies need to know about the whole training set, not just the superbatch.

    ``concept_samples``: ``N_c``, the dataset-wide number of samples containing each concept id
    (``concept_counts.json`` beside ``vocabulary.json``, summed over streams); ``names``: the
    vocabulary, id order. Policies take them in :meth:`SelectionPolicy.bind`.
    """

    concept_samples: np.ndarray | None = None
    names: tuple[str, ...] | None = None
    source: str = "the training data"
    """Where the facts came from, for error messages."""


class SelectionPolicy(ABC):
    """A named selection policy; subclasses are frozen dataclasses of their options.

    Subclasses implement :meth:`keep`; :func:`cabs_streaming.selection.select` adds the
    validation, timing and statistics shared by all.
    """

    name: ClassVar[str]
    #: Option names users write that are not Python identifiers (``lambda`` -> ``lam``).
    aliases: ClassVar[dict[str, str]] = {}

    @abstractmethod
    def keep(self, sb: Superbatch, k: int, seed: int, step: int) -> Kept:
        """Choose exactly ``k`` samples on every rank of ``sb``."""

    def reserve(
        self, sb: Superbatch, kept: np.ndarray, rank: int, seed: int, step: int
    ) -> np.ndarray:
        """Rank ``rank``'s unkept local indices, most wanted first: the stand-ins for kept samples.

        ``kept`` is the global keep mask :meth:`keep` returned for the same arguments. When a
        kept image cannot be decoded, the trainer may take the first stand-in whose image can
        (``decode.on_error: replace``); the order must be a pure function of the arguments.
        This default is a uniformly random order from ``default_rng([seed, step, rank, 1])``,
        the order of a policy that has no preference among the samples it left out.
        """
        n = sb.per_rank
        unkept = np.flatnonzero(~kept[rank * n : (rank + 1) * n])
        return np.random.default_rng([seed, step, rank, 1]).permutation(unkept)

    def bind(self, facts: DatasetFacts) -> SelectionPolicy:
        """Return the policy with what it needs from the dataset (counts, names); default: self."""
        return self

    def resolve(self, batches_per_epoch: int | None, max_batches: int | None) -> SelectionPolicy:
        """Return the policy with training times (``ep``, ``dur``) in steps; default: self."""
        return self

    def required_columns(self) -> tuple[str, ...]:
        """Numeric per-sample columns the policy reads (``Superbatch.columns``); default none."""
        return ()

    @classmethod
    def option_names(cls) -> list[str]:
        """The options users may set, as they write them (aliases such as ``lambda``)."""
        back = {field: alias for alias, field in cls.aliases.items()}
        return [
            back.get(f.name, f.name)
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if not f.metadata.get("bound")
        ]

    def config(self) -> dict[str, Any]:
        """Plain-value description of the policy (saved with checkpoints, compared on load).

        Options added after a policy first shipped are left out while unset (``omit_none``), so
        a checkpoint of an earlier release resumes without a "configuration changed" warning.
        """
        back = {field: alias for alias, field in self.aliases.items()}
        options = {
            back.get(f.name, f.name): getattr(self, f.name)
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if not f.metadata.get("bound")
            and not (f.metadata.get("omit_none") and getattr(self, f.name) is None)
        }
        return {"name": self.name, **options}

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SelectionPolicy:
        """Build from a mapping of options; an unknown option is an error listing valid ones."""
        valid = cls.option_names()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for selection policy {cls.name!r}; "
                f"valid options: {valid or 'none'}"
            )
        return cls(**{cls.aliases.get(key, key): value for key, value in options.items()})


def compute_stats(
    sb: Superbatch, kept: Kept, kept_global: np.ndarray, started: float
) -> SelectionStats:
    """Statistics of the kept global batch; ``started`` is the call's ``perf_counter`` start."""
    distinct, empty, largest, instances = _kernels.kept_statistics(
        sb.offsets, sb.ids, kept_global, sb.num_concepts
    )
    present = kept.superbatch_distinct
    if present is None:
        present = _kernels.count_present(sb.ids, sb.num_concepts)
    total = kept_global.shape[0]
    failed = shortfall = 0
    allowed = kept.allowed  # set by the filter wrapper, which narrows its own copy of ``sb``
    if allowed is not None:
        failed = int(allowed.shape[0] - np.count_nonzero(allowed))
        shortfall = int(total - np.count_nonzero(allowed[kept_global]))
    return SelectionStats(
        kept_distinct=int(distinct),
        superbatch_distinct=int(present),
        kept_empty_share=empty / total,
        max_concept_count=int(largest),
        mean_instances=instances / total,
        filled=int(kept.filled),
        filtered_out=failed,
        filter_shortfall=shortfall,
        wall_ms=(time.perf_counter() - started) * 1e3,
    )
