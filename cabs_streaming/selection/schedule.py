"""``selection.schedule``: the policy, or one of its options, as a function of training time.

The paper leaves open a score that changes during training (single objects first, complex scenes
later); Streaming's users ask for curricula. A schedule is itself a policy whose choice at step
``t`` is a pure function of ``t``, so every rank agrees and a resumed run repeats it
(docs/selection.md#schedules). Times are written as Composer writes them (``500ba``, ``2ep``,
``0.5dur``) and turned into steps once the run's length is known (:meth:`Schedule.resolve`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cabs_streaming.selection.base import DatasetFacts, Kept, SelectionPolicy, Superbatch

_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ba|ep|dur)\s*$")


def parse_time(value: Any) -> tuple[float, str]:
    """``"500ba"`` -> ``(500, "ba")``; a bare number in ``(0, 1]`` is a fraction of the run."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a training time")
    if isinstance(value, int | float):
        if not 0.0 < float(value) <= 1.0:
            raise ValueError(
                f"a bare number as a time is a fraction of max_duration in (0, 1], got {value}; "
                "write steps as '500ba' and epochs as '2ep'"
            )
        return float(value), "dur"
    match = _TIME.match(str(value))
    if not match:
        raise ValueError(
            f"{value!r} is not a training time: write steps as '500ba', epochs as '2ep' or a "
            "fraction of max_duration as '0.5dur'"
        )
    number, unit = float(match.group(1)), match.group(2)
    if unit in ("ba", "ep") and number != int(number):
        raise ValueError(f"{value!r}: {unit} counts must be whole numbers")
    return number, unit


def time_in_steps(
    value: Any, batches_per_epoch: int | None, max_batches: int | None
) -> int:
    """A training time in steps (global batches); ``dur`` fractions are rounded down."""
    number, unit = parse_time(value)
    if unit == "ba":
        return int(number)
    if unit == "ep":
        if batches_per_epoch is None:
            raise ValueError(f"the schedule time {value!r} needs the number of steps per epoch")
        return int(number) * int(batches_per_epoch)
    if max_batches is None:
        raise ValueError(
            f"the schedule time {value!r} needs max_duration in steps or epochs"
        )
    return int(math.floor(number * max_batches))


@dataclass(frozen=True)
class Ramp:
    """A linear ramp of one numeric option over its phase.

    ``start`` at the phase's first step, ``end`` at its last (``until``).
    """

    option: str
    start: float
    end: float

    @classmethod
    def from_config(cls, entry: Mapping[str, Any]) -> Ramp:
        """From ``{option, from, to}``."""
        unknown = sorted(set(entry) - {"option", "from", "to"})
        missing = sorted({"option", "from", "to"} - set(entry))
        if unknown or missing:
            raise ValueError(
                f"a ramp is {{option, from, to}}; got unknown {unknown}, missing {missing}"
            )
        for key in ("from", "to"):
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"ramp of {entry['option']!r}: {key} must be a number")
        return cls(str(entry["option"]), float(entry["from"]), float(entry["to"]))


@dataclass(frozen=True)
class Phase:
    """One phase: ``policy`` (optionally with a ramped option) until the time ``until``."""

    policy: SelectionPolicy
    until: Any = None
    """Composer time string, a fraction of the run, or None (to the end; the last phase only)."""
    ramp: Ramp | None = None
    stop: int | None = None
    """``until`` in steps, once resolved."""


@dataclass(frozen=True)
class Schedule(SelectionPolicy):
    """Policies (or an option's values) by training time; a pure function of the step.

    Phase ``i`` covers steps ``[stop_{i-1}, stop_i)`` (the first starts at 0, the last may run to
    the end). A phase with a ramp sets its option to
    ``start + (end - start) * (t - first) / (stop - first)`` at step ``t``.
    """

    phases: tuple[Phase, ...]

    name = "schedule"

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("a schedule needs at least one phase")
        for i, phase in enumerate(self.phases):
            last = i == len(self.phases) - 1
            if phase.until is None and not last:
                raise ValueError(f"schedule phase {i}: only the last phase may omit 'until'")
            if phase.until is not None:
                parse_time(phase.until)
            if phase.ramp is not None:
                names = phase.policy.option_names()
                if phase.ramp.option not in names:
                    raise ValueError(
                        f"schedule phase {i}: policy {phase.policy.name!r} has no option "
                        f"{phase.ramp.option!r} to ramp (options: {names})"
                    )
                self._at(phase, phase.ramp.start)  # the policy accepts both ends
                self._at(phase, phase.ramp.end)

    @staticmethod
    def _at(phase: Phase, value: float) -> SelectionPolicy:
        assert phase.ramp is not None
        field = phase.policy.aliases.get(phase.ramp.option, phase.ramp.option)
        return dataclasses.replace(phase.policy, **{field: value})

    @classmethod
    def from_config(
        cls, entries: Sequence[Mapping[str, Any]], build: Any
    ) -> Schedule:
        """From config entries ``{until?, policy, options?, ramp?}``.

        ``build(name, options)`` makes a policy (the registry's ``get_policy``).
        """
        phases = []
        for i, entry in enumerate(entries):
            unknown = sorted(set(entry) - {"until", "policy", "options", "ramp"})
            if unknown:
                raise ValueError(
                    f"schedule phase {i}: unknown key(s) {unknown} (keys: until, policy, "
                    "options, ramp)"
                )
            if "policy" not in entry:
                raise ValueError(f"schedule phase {i} needs a policy")
            try:
                policy = build(entry["policy"], entry.get("options") or {})
                ramp = Ramp.from_config(entry["ramp"]) if entry.get("ramp") else None
            except (TypeError, ValueError) as err:
                raise ValueError(f"schedule phase {i}: {err}") from None
            phases.append(Phase(policy, entry.get("until"), ramp))
        return cls(tuple(phases))

    def resolve(self, batches_per_epoch: int | None, max_batches: int | None) -> Schedule:
        """Every phase's end in steps; errors if they do not increase."""
        resolved = []
        previous = 0
        for i, phase in enumerate(self.phases):
            stop = None
            if phase.until is not None:
                stop = time_in_steps(phase.until, batches_per_epoch, max_batches)
            elif phase.ramp is not None:
                stop = max_batches
            if stop is not None and stop <= previous:
                raise ValueError(
                    f"schedule phase {i} ends at step {stop}, not after the phase before it "
                    f"(step {previous}): phase ends must increase"
                )
            policy = phase.policy.resolve(batches_per_epoch, max_batches)
            resolved.append(dataclasses.replace(phase, policy=policy, stop=stop))
            previous = stop if stop is not None else previous
        return dataclasses.replace(self, phases=tuple(resolved))

    def _stops(self) -> list[int | None]:
        stops = [phase.stop for phase in self.phases]
        for phase, stop in zip(self.phases, stops, strict=True):
            if stop is None and (phase.until is not None or phase.ramp is not None):
                raise ValueError(
                    "the schedule's times are not in steps yet: call schedule.resolve("
                    "batches_per_epoch, max_batches) first (the trainer does at fit start)"
                )
        return stops

    def policy_at(self, step: int) -> SelectionPolicy:
        """The policy (with its ramped option's value) that selects step ``step``."""
        stops = self._stops()
        first = 0
        for phase, stop in zip(self.phases, stops, strict=True):
            if stop is None or step < stop:
                if phase.ramp is None:
                    return phase.policy
                span = max(1, (stop if stop is not None else step + 1) - first)
                share = min(1.0, max(0.0, (step - first) / span))
                value = phase.ramp.start + (phase.ramp.end - phase.ramp.start) * share
                return self._at(phase, value)
            first = stop
        last = self.phases[-1]  # past the last phase's end: it goes on, at the ramp's end value
        return last.policy if last.ramp is None else self._at(last, last.ramp.end)

    def keep(self, sb: Superbatch, k: int, seed: int, step: int) -> Kept:
        """The phase policy's choice at ``step``."""
        return self.policy_at(step).keep(sb, k, seed, step)

    def reserve(
        self, sb: Superbatch, kept: np.ndarray, rank: int, seed: int, step: int
    ) -> np.ndarray:
        """The phase policy's order of preference at ``step``."""
        return self.policy_at(step).reserve(sb, kept, rank, seed, step)

    def bind(self, facts: DatasetFacts) -> Schedule:
        """Bind every phase's policy."""
        return dataclasses.replace(
            self,
            phases=tuple(dataclasses.replace(p, policy=p.policy.bind(facts)) for p in self.phases),
        )

    def required_columns(self) -> tuple[str, ...]:
        """Every phase's columns."""
        names = [c for p in self.phases for c in p.policy.required_columns()]
        return tuple(dict.fromkeys(names))

    def config(self) -> dict[str, Any]:
        """The phases as written, each with its policy's description."""
        phases = []
        for phase in self.phases:
            entry: dict[str, Any] = {"until": phase.until, **phase.policy.config()}
            if phase.ramp is not None:
                entry["ramp"] = {
                    "option": phase.ramp.option, "from": phase.ramp.start, "to": phase.ramp.end
                }
            phases.append(entry)
        return {"name": self.name, "phases": phases}
