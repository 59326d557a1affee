"""What a conversion counted, and the report built from it.

Parts are tallied independently and added in input order, so the report is the same for any
number of workers (or engines). ``read == written + sum(skipped)`` always holds; ``build_report``
checks it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cabs_streaming.concepts import ConceptCounts
from cabs_streaming.converter.records import INVALID_UTF8, SKIP_ALARM_SHARE, SKIP_REASONS
from cabs_streaming.tagging import names_report


@dataclass
class Tally:
    """Counts and examples of one part; parts add up in input order."""

    read: int = 0
    written: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    repaired: int = 0
    repaired_examples: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    instances: int = 0
    without_concepts: int = 0
    shards: int = 0
    unknown_names: Counter[str] = field(default_factory=Counter)
    normalised_names: Counter[tuple[str, str]] = field(default_factory=Counter)
    concept_instances: Counter[int] = field(default_factory=Counter)  # id -> written instances
    concept_samples: Counter[int] = field(default_factory=Counter)  # id -> written samples

    def skip(self, reason: str, example: dict[str, str], limit: int) -> None:
        """Count a skip, keeping up to ``limit`` examples per reason."""
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < limit:
            shown.append(example)

    def add(self, other: Tally, limit: int) -> None:
        """Add the next part's tally (parts are added in input order)."""
        self.read += other.read
        self.written += other.written
        self.skipped.update(other.skipped)
        for reason, shown in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(shown[: max(0, limit - len(mine))])
        self.repaired += other.repaired
        self.repaired_examples.extend(
            other.repaired_examples[: max(0, limit - len(self.repaired_examples))]
        )
        self.errors.extend(other.errors)
        self.instances += other.instances
        self.without_concepts += other.without_concepts
        self.shards += other.shards
        self.unknown_names.update(other.unknown_names)
        self.normalised_names.update(other.normalised_names)
        self.concept_instances.update(other.concept_instances)
        self.concept_samples.update(other.concept_samples)


def tally_to_json(tally: Tally) -> dict[str, Any]:
    """``tally`` as plain JSON, for a part's completion marker (Counter keys become lists)."""
    data = asdict(tally)
    for name in ("skipped", "unknown_names", "concept_instances", "concept_samples"):
        data[name] = sorted(getattr(tally, name).items())
    data["normalised_names"] = sorted([[a, b], n] for (a, b), n in tally.normalised_names.items())
    return data


def tally_from_json(data: dict[str, Any]) -> Tally:
    """The :class:`Tally` that :func:`tally_to_json` wrote."""
    data = dict(data)
    for name in ("skipped", "unknown_names", "concept_instances", "concept_samples"):
        data[name] = Counter({key: n for key, n in data[name]})
    data["normalised_names"] = Counter({(a, b): n for (a, b), n in data["normalised_names"]})
    return Tally(**data)


def concept_counts(tally: Tally, names: Sequence[str], shown: int = 10) -> dict[str, Any]:
    """Per-concept counts of the written samples: aligned lists, and the head and tail.

    ``per_concept`` lists are indexed by concept id (``vocabulary.json`` order), so a program
    (e.g. a balancing policy) reads dataset-wide counts without another pass over the shards.
    """
    samples = [tally.concept_samples.get(i, 0) for i in range(len(names))]
    instances = [tally.concept_instances.get(i, 0) for i in range(len(names))]
    used = [i for i in range(len(names)) if samples[i]]

    def row(i: int) -> dict[str, Any]:
        return {"concept": names[i], "id": i, "samples": samples[i], "instances": instances[i]}

    return {
        "instances": tally.instances,
        "samples_without_concepts": tally.without_concepts,
        "distinct": len(used),
        "unused": len(names) - len(used),
        "head": [row(i) for i in sorted(used, key=lambda i: (-samples[i], i))[:shown]],
        "tail": [row(i) for i in sorted(used, key=lambda i: (samples[i], i))[:shown]],
        "per_concept": {"samples": samples, "instances": instances},
    }


def counts_of(tally: Tally, size: int) -> ConceptCounts:
    """The ``concept_counts.json`` of a conversion: the report's ``per_concept`` lists."""
    return ConceptCounts(
        samples=[tally.concept_samples.get(i, 0) for i in range(size)],
        instances=[tally.concept_instances.get(i, 0) for i in range(size)],
        written=tally.written,
    )


def skip_alarm(report: dict[str, Any]) -> str | None:
    """Why a finished conversion should not look like a success, or None.

    Nothing was written, or one skip reason took over ``SKIP_ALARM_SHARE`` of the input; the
    first example of that reason says why.
    """
    read = report["read"]
    reason, count = max(report["skipped"].items(), key=lambda item: item[1])
    example = (report["examples"].get(reason) or [None])[0] if count else None
    why = f"; e.g. {example['key']!r} in {example['file']}: {example['detail']}" if example else ""
    if report["written"] == 0:
        if not read:
            return "no sample was written: the input holds no samples"
        return f"no sample was written; {count:,} of {read:,} were skipped as {reason!r}{why}"
    if count > SKIP_ALARM_SHARE * read:
        return f"{count:,} of {read:,} samples ({count / read:.0%}) were skipped as {reason!r}{why}"
    return None


def build_report(tally: Tally, **facts: Any) -> dict[str, Any]:
    """Assemble the report: counts first, then examples, damage, vocabulary, provenance."""
    skipped = {reason: tally.skipped.get(reason, 0) for reason in SKIP_REASONS}
    if tally.read != tally.written + sum(skipped.values()):
        raise RuntimeError(
            f"internal error: read {tally.read} != written {tally.written} + skipped "
            f"{sum(skipped.values())}; please report this with the input that caused it"
        )
    report = {
        "read": tally.read,
        "written": tally.written,
        "skipped": skipped,
        "warnings": list(facts["notes"]),
        "examples": {r: tally.examples[r] for r in SKIP_REASONS if r in tally.examples},
        "repaired": {INVALID_UTF8: {"count": tally.repaired, "examples": tally.repaired_examples}},
        "errors": tally.errors,
        "concepts": concept_counts(tally, facts["names"]),
        "concept_source": facts["concept_source"],
        "concept_names": names_report(tally.unknown_names, tally.normalised_names),
        "vocabulary": facts["vocabulary"],
        "shards": tally.shards,
        "format": facts["fmt"],
        "inputs": list(facts["files"]),
        "out": facts["out"],
        "workers": facts["workers"],
        "parts": facts["parts"],
        "limits": facts["limits"],
        "numeric_columns": facts["numeric_columns"],
        "seconds": round(facts["seconds"], 3),
    }
    alarm = skip_alarm(report)
    if alarm is not None:
        report["warnings"].insert(0, alarm)
    return report
