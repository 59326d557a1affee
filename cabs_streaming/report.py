"""Concept reports: what a dataset's concepts look like, and what CABS does to its batches.

CABS only helps when concept ids are there and long-tailed, and users choose a policy, a filter
ratio and a concept cap without seeing a batch. :func:`concept_report` reads the concept column of
an MDS dataset (local or ``s3://``) and writes a folder a person can open
(docs/design.md#files-a-person-can-open):

- ``concept_frequency.png``: samples per concept by rank, log-log, head and tail named;
- ``concepts_per_sample.png``: instances per sample, with the share of samples without concepts;
- ``distinct_per_batch.png``: distinct concepts per kept batch for IID, CABS-DM, CABS-FM and the
  newer policies (``mixed``, ``balanced``, CABS-DM with ``alpha`` targets) on the *same*
  superbatches (and the superbatch itself, the upper bound);
- ``kept_concepts.png``: how often each concept is kept under each policy, side by side, against
  what keeping every drawn sample with probability ``1 - f`` would give;
- ``summary.json``: every number behind the figures.

Superbatches are drawn as a shuffled loader would: ``default_rng(seed)`` permutations of the
samples read, cut into superbatches of ``n = k / (1 - f)``, a whole number (a new permutation
when one runs out). Each superbatch goes through :func:`cabs_streaming.selection.select` with
``world=1``, ``step`` = its index, and the same seed for every policy, so the policies are
compared on identical input. Only the concept column matters; images are never decoded.

``balanced`` and CABS-DM's ``alpha`` targets need dataset-wide counts ``N_c``: the report uses
the samples containing each concept among the samples it read (the whole dataset unless
``max_samples`` cuts it), the counts its long-tail figure shows.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from cabs_streaming.concepts import ConceptCounts, Vocabulary, ragged_from_lists
from cabs_streaming.selection import DatasetFacts, SelectionPolicy, get_policy, select
from cabs_streaming.selection.diversity import default_concept_cap
from cabs_streaming.selection.sizes import superbatch_size

__all__ = [
    "FIGURES",
    "POLICY_LABELS",
    "ConceptData",
    "build_policies",
    "concept_report",
    "count_concepts",
    "default_balanced_threshold",
    "read_concepts",
]

#: Policies compared, in plotting order, with the names the paper uses (and ours for the newer
#: policies; ``diversity_alpha`` is CABS-DM with targets ``N_c ** alpha``).
POLICY_LABELS: dict[str, str] = {
    "iid": "IID",
    "diversity": "CABS-DM",
    "frequency": "CABS-FM",
    "mixed": "mixed",
    "balanced": "balanced",
    "diversity_alpha": "CABS-DM α",
}
_COLORS = {
    "iid": "#7f7f7f",
    "diversity": "#1f77b4",
    "frequency": "#d62728",
    "mixed": "#9467bd",
    "balanced": "#2ca02c",
    "diversity_alpha": "#17becf",
}
FIGURES = (
    "concept_frequency.png",
    "concepts_per_sample.png",
    "distinct_per_batch.png",
    "kept_concepts.png",
)
SUMMARY = "summary.json"
_NAMED = 5  # head and tail concepts named in the long-tail figure
_BARS_UP_TO = 40  # vocabularies up to this size get one bar per concept; larger ones a curve
_NO_FILL = ("iid", "frequency")  # policies whose ranking always fills the batch itself


@dataclass(frozen=True)
class ConceptData:
    """The concept column of the samples read, in CSR form, with the vocabulary."""

    vocabulary: Vocabulary
    offsets: np.ndarray  # int64 [n + 1]
    ids: np.ndarray  # int32 [nnz]
    dataset_samples: int  # samples in the dataset (>= samples read)

    @property
    def samples(self) -> int:
        """Samples read."""
        return self.offsets.shape[0] - 1


def _is_remote(path: str) -> bool:
    return urllib.parse.urlparse(path).scheme not in ("", "file")


def read_concepts(
    dataset: str,
    *,
    split: str | None = None,
    max_samples: int | None = None,
    cache: str | None = None,
    progress: bool = True,
) -> ConceptData:
    """Read ``vocabulary.json`` and the concept ids of the first ``max_samples`` samples.

    ``dataset`` is a local MDS directory or a remote prefix (``s3://bucket/path``; endpoint and
    credentials as for Streaming). A remote dataset is downloaded into ``cache`` (a temporary
    directory, removed afterwards, when not given); only the shards holding the samples read are
    fetched, so ``max_samples`` bounds the download of a large dataset.
    """
    from cabs_streaming.dataset import ConceptStreamingDataset

    remote = _is_remote(dataset)
    temporary = tempfile.mkdtemp(prefix="cabs-report-") if remote and cache is None else None
    kwargs: dict[str, Any] = {"split": split, "shuffle": False, "batch_size": 1}
    if remote:
        kwargs.update(remote=dataset, local=cache or temporary)
    else:
        if not os.path.isfile(os.path.join(dataset, split or "", "index.json")):
            raise FileNotFoundError(
                f"{os.path.join(dataset, split or '', 'index.json')} does not exist: give the "
                "directory of an MDS dataset (the one holding index.json), or --split"
            )
        kwargs.update(local=dataset)
    try:
        data = ConceptStreamingDataset(**kwargs)
        total = int(data.num_samples)
        count = total if max_samples is None else min(total, max_samples)
        lists = [
            data[i]["concepts"]
            for i in tqdm(range(count), desc="read concepts", unit=" samples", disable=not progress)
        ]
        vocabulary = data.vocabulary
        del data
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    offsets, ids = ragged_from_lists(lists)
    if ids.size and ids.max() >= len(vocabulary):
        raise ValueError(
            f"{dataset}: concept id {int(ids.max())} is outside its vocabulary.json "
            f"({len(vocabulary)} names); the data and vocabulary do not belong together"
        )
    return ConceptData(vocabulary, offsets, ids, total)


def count_concepts(data: ConceptData) -> ConceptCounts:
    """The ``concept_counts.json`` of the samples read, as the converter counts written ones.

    For a dataset converted before the converter wrote that file (``cabs-count-concepts``):
    per concept id the samples holding it at least once and its instances.
    """
    size = len(data.vocabulary)
    rows = np.repeat(np.arange(data.samples, dtype=np.int64), np.diff(data.offsets))
    present = np.unique(rows * size + data.ids.astype(np.int64)) % size if size else data.ids
    return ConceptCounts(
        samples=np.bincount(present, minlength=size),
        instances=np.bincount(data.ids, minlength=size),
        written=data.samples,
    )


def draw_superbatches(samples: int, size: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` superbatches of ``size`` sample indices, as a shuffled loader draws them."""
    rng = np.random.default_rng([seed, 0x5B])
    order = np.zeros(0, dtype=np.int64)
    batches = []
    for _ in range(count):
        while order.shape[0] < size:
            order = np.concatenate([order, rng.permutation(samples)])
        batches.append(order[:size])
        order = order[size:]
    return batches


def _distinct_pairs(offsets: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Unique (position in ``rows``, concept) pairs as ``[m, 2]`` int64 (vectorised)."""
    lengths = offsets[rows + 1] - offsets[rows]
    owner = np.repeat(np.arange(rows.shape[0], dtype=np.int64), lengths)
    starts = np.repeat(offsets[rows] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    concept = ids[np.arange(owner.shape[0], dtype=np.int64) + starts].astype(np.int64)
    return np.unique(np.stack([owner, concept], axis=1), axis=0)


def _presence(offsets: np.ndarray, ids: np.ndarray, rows: np.ndarray, vocab: int) -> np.ndarray:
    """Samples among ``rows`` that contain each concept (a sample counts once per concept)."""
    pairs = _distinct_pairs(offsets, ids, rows)
    return np.bincount(pairs[:, 1], minlength=vocab).astype(np.int64)


def _subset(offsets: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """CSR of the samples ``rows`` in that order."""
    lengths = offsets[rows + 1] - offsets[rows]
    sub_offsets = np.zeros(rows.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=sub_offsets[1:])
    sub_ids = (
        np.concatenate([ids[offsets[r] : offsets[r + 1]] for r in rows])
        if sub_offsets[-1]
        else np.zeros(0, dtype=np.int32)
    )
    return sub_offsets, sub_ids


def _named(vocabulary: Vocabulary, counts: np.ndarray) -> dict[str, int]:
    """``{name: count}`` for non-zero counts, most frequent first (ties by id)."""
    order = np.argsort(-counts, kind="stable")
    return {vocabulary.names[i]: int(counts[i]) for i in order if counts[i] > 0}


def default_balanced_threshold(containing: np.ndarray) -> float:
    """The median number of samples per concept among the concepts present (1 if none is).

    Half the used concepts are then never held back and the other half are thinned in
    proportion to ``t / N_c``: a threshold at which ``balanced`` visibly balances any dataset,
    where MetaCLIP's 20,000 (chosen for 400M pairs) would keep every sample of a small one.
    """
    present = containing[containing > 0]
    return float(np.median(present)) if present.size else 1.0


def build_policies(
    cap: int,
    mixed_lambda: float,
    balanced_threshold: float,
    dm_alpha: float,
    facts: DatasetFacts,
) -> dict[str, SelectionPolicy]:
    """The compared policies by key of :data:`POLICY_LABELS`, bound to the dataset's facts.

    The CABS-DM family (``diversity``, ``mixed``, ``diversity_alpha``) share ``cap`` so that
    only the option under study differs.
    """
    policies = {
        "iid": get_policy("iid"),
        "diversity": get_policy("diversity", {"concept_cap": cap}),
        "frequency": get_policy("frequency"),
        "mixed": get_policy("mixed", {"concept_cap": cap, "lambda": mixed_lambda}),
        "balanced": get_policy("balanced", {"threshold": balanced_threshold}),
        "diversity_alpha": get_policy("diversity", {"concept_cap": cap, "alpha": dm_alpha}),
    }
    return {name: policy.bind(facts) for name, policy in policies.items()}


def concept_report(
    dataset: str,
    out: str,
    *,
    filter_ratio: float = 0.8,
    batch_size: int = 256,
    batches: int = 20,
    seed: int = 0,
    concept_cap: int | None = None,
    split: str | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    data: ConceptData | None = None,
    mixed_lambda: float = 1.0,
    balanced_threshold: float | None = None,
    dm_alpha: float = 0.5,
) -> dict[str, Any]:
    """Write the report folder ``out`` (figures and ``summary.json``); return the summary.

    Args:
        dataset: Local MDS directory or remote prefix (``s3://...``).
        out: Output folder (created; existing report files are replaced).
        filter_ratio: ``f``, the share of each superbatch that is dropped: ``n = k / (1 - f)``.
        batch_size: ``k``, samples kept per batch.
        batches: How many superbatches to draw.
        seed: Seeds the draw and every policy.
        concept_cap: CABS-DM's per-concept cap; default the policy's own
            (``max(1, round(k * 10 / 1024))``). Small vocabularies need a larger one, or the
            fill decides most of the batch; the summary says how much the fill decided.
        split: Sub-directory of ``dataset`` holding ``index.json``.
        max_samples: Read only the first this many samples (bounds a remote download).
        progress: Show tqdm progress bars.
        data: Already-read concepts (skips reading ``dataset``, which then only names it).
        mixed_lambda: ``mixed``'s ``lambda`` (0 is CABS-DM exactly).
        balanced_threshold: ``balanced``'s ``t``; default :func:`default_balanced_threshold`
            of the samples read.
        dm_alpha: ``alpha`` of the CABS-DM variant with targets ``N_c ** alpha`` (0 is uniform,
            i.e. CABS-DM itself; 1 the data's own distribution).
    """
    if batch_size < 1 or batches < 1:
        raise ValueError(f"--batch-size and --batches must be >= 1 (got {batch_size}, {batches})")
    try:
        superbatch = superbatch_size(batch_size, filter_ratio)  # whole, never rounded
    except ValueError as err:
        raise ValueError(
            f"--batch-size {batch_size}, --filter-ratio {filter_ratio}: {err}"
        ) from None
    if data is None:
        data = read_concepts(dataset, split=split, max_samples=max_samples, progress=progress)
    if superbatch > data.samples:
        raise ValueError(
            f"a superbatch of {superbatch} samples (--batch-size {batch_size} at --filter-ratio "
            f"{filter_ratio}) is larger than the {data.samples} samples read; lower --batch-size"
        )
    vocabulary, offsets, ids = data.vocabulary, data.offsets, data.ids
    vocab = len(vocabulary)
    cap = concept_cap if concept_cap is not None else default_concept_cap(batch_size)
    os.makedirs(out, exist_ok=True)

    # The dataset: frequencies and instances per sample.
    lengths = np.diff(offsets)
    instances = np.bincount(ids, minlength=vocab).astype(np.int64)
    containing = _presence(offsets, ids, np.arange(data.samples), vocab)
    per_sample = np.bincount(lengths, minlength=1)
    distinct_per_sample = np.bincount(
        _distinct_pairs(offsets, ids, np.arange(data.samples))[:, 0], minlength=data.samples
    )

    # The same superbatches through every policy; N_c are the counts of the samples read.
    if balanced_threshold is None:
        balanced_threshold = default_balanced_threshold(containing)
    facts = DatasetFacts(
        concept_samples=containing, names=tuple(vocabulary.names), source=dataset
    )
    policies = build_policies(cap, mixed_lambda, balanced_threshold, dm_alpha, facts)
    drawn = draw_superbatches(data.samples, superbatch, batches, seed)
    results: dict[str, dict[str, Any]] = {
        name: {"distinct": [], "filled": [], "ms": [], "empty": [], "instances": 0,
               "kept": np.zeros(vocab, dtype=np.int64)}
        for name in policies
    }
    superbatch_distinct: list[int] = []
    drawn_presence = np.zeros(vocab, dtype=np.int64)
    for step, rows in enumerate(tqdm(drawn, desc="select", disable=not progress)):
        sub_offsets, sub_ids = _subset(offsets, ids, rows)
        drawn_presence += _presence(sub_offsets, sub_ids, np.arange(rows.shape[0]), vocab)
        for name, policy in policies.items():
            result = select(policy, sub_offsets, sub_ids, world=1, k=batch_size, seed=seed,
                            step=step, num_concepts=vocab)
            kept_rows = result.kept[0]
            stats = result.stats
            entry = results[name]
            entry["distinct"].append(stats.kept_distinct)
            entry["filled"].append(stats.filled)
            entry["ms"].append(stats.wall_ms)
            entry["empty"].append(stats.kept_empty_share)
            entry["instances"] += int((sub_offsets[kept_rows + 1] - sub_offsets[kept_rows]).sum())
            entry["kept"] += _presence(sub_offsets, sub_ids, kept_rows, vocab)
        superbatch_distinct.append(result.stats.superbatch_distinct)

    seen = int(np.count_nonzero(instances))
    by_frequency = np.argsort(-containing, kind="stable")
    seen_order = [int(i) for i in by_frequency if containing[i] > 0]
    head = seen_order[:_NAMED]
    tail = seen_order[-_NAMED:][::-1] if len(seen_order) > _NAMED else []
    kept_total = batches * batch_size
    summary: dict[str, Any] = {
        "dataset": dataset,
        "split": split,
        "dataset_samples": data.dataset_samples,
        "samples": data.samples,
        "vocabulary_size": vocab,
        "concepts_seen": seen,
        "concepts_never_seen": vocab - seen,
        "instances": int(instances.sum()),
        "samples_without_concepts": int(per_sample[0]) if per_sample.size else 0,
        "empty_share": float(per_sample[0] / data.samples) if data.samples else 0.0,
        "instances_per_sample": {
            "mean": float(lengths.mean()) if data.samples else 0.0,
            "median": float(np.median(lengths)) if data.samples else 0.0,
            "max": int(lengths.max()) if data.samples else 0,
            "histogram": {str(k): int(c) for k, c in enumerate(per_sample)},
        },
        "distinct_per_sample_mean": float(distinct_per_sample.mean()) if data.samples else 0.0,
        "concept_frequency": {
            "unit": "samples containing the concept",
            "head": {vocabulary.names[i]: int(containing[i]) for i in head},
            "tail": {vocabulary.names[i]: int(containing[i]) for i in tail},
            "samples_containing": _named(vocabulary, containing),
            "instances": _named(vocabulary, instances),
        },
        "selection": {
            "filter_ratio": filter_ratio,
            "batch_size": batch_size,
            "superbatch_size": superbatch,
            "batches": batches,
            "seed": seed,
            "world": 1,
            "concept_cap": cap,
            "mixed_lambda": float(mixed_lambda),
            "balanced_threshold": float(balanced_threshold),
            "dm_alpha": float(dm_alpha),
            "dataset_counts": "samples containing each concept among the samples read",
            "superbatch_distinct": {
                "mean": float(np.mean(superbatch_distinct)),
                "per_batch": superbatch_distinct,
            },
            "drawn_presence": _named(vocabulary, drawn_presence),
            "policies": {
                name: {
                    "label": POLICY_LABELS[name],
                    "config": policies[name].config(),
                    "distinct_per_batch": entry["distinct"],
                    "distinct_mean": float(np.mean(entry["distinct"])),
                    "distinct_min": int(np.min(entry["distinct"])),
                    "distinct_max": int(np.max(entry["distinct"])),
                    "kept_samples": kept_total,
                    "kept_instances": entry["instances"],
                    "kept_empty_share": float(np.mean(entry["empty"])),
                    "filled_share": float(np.sum(entry["filled"]) / kept_total),
                    "kept_presence_total": int(entry["kept"].sum()),
                    "kept_concepts": _named(vocabulary, entry["kept"]),
                    "median_ms": float(np.median(entry["ms"])),
                }
                for name, entry in results.items()
            },
        },
        "figures": list(FIGURES),
    }
    _plot_frequency(os.path.join(out, FIGURES[0]), summary, vocabulary, containing, instances,
                    head, tail)
    _plot_per_sample(os.path.join(out, FIGURES[1]), summary, per_sample, distinct_per_sample)
    _plot_distinct(os.path.join(out, FIGURES[2]), summary, results, superbatch_distinct)
    _plot_kept(os.path.join(out, FIGURES[3]), summary, vocabulary, results, drawn_presence,
               by_frequency)
    with open(os.path.join(out, SUMMARY), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    return summary


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib's object API: no global pyplot state, no display needed)
# ---------------------------------------------------------------------------------------------


def _figure(width: float = 10.0, height: float = 5.5) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _dataset_title(summary: dict[str, Any]) -> str:
    name = summary["dataset"].rstrip("/")
    if summary["split"]:
        name = f"{name}/{summary['split']}"
    read = summary["samples"]
    total = summary["dataset_samples"]
    samples = f"{read:,} samples" if read == total else f"first {read:,} of {total:,} samples"
    return f"{name} ({samples})"


def _plot_frequency(
    path: str,
    summary: dict[str, Any],
    vocabulary: Vocabulary,
    containing: np.ndarray,
    instances: np.ndarray,
    head: Sequence[int],
    tail: Sequence[int],
) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    order = np.argsort(-containing, kind="stable")
    order = order[containing[order] > 0]
    ranks = np.arange(1, order.shape[0] + 1)
    ax.loglog(ranks, containing[order], marker="o" if ranks.shape[0] <= 200 else None,
              markersize=3, linewidth=1.5,
              label="samples containing the concept")
    ax.loglog(ranks, instances[order], linestyle="--", linewidth=1, color="#999999",
              label="instances (detections / mentions)")
    position = {int(c): r for r, c in zip(ranks, order, strict=True)}
    for group, color, label in ((head, "#2ca02c", "head"), (tail, "#d62728", "tail")):
        if group:
            ax.scatter([position[c] for c in group], [containing[c] for c in group], s=40,
                       color=color, zorder=3, label=f"{label} ({len(group)} named)")
    lines = ["Head: " + ", ".join(f"{_short(vocabulary.names[c])} ({containing[c]:,})"
                                  for c in head)]
    if tail:
        lines.append("Tail: " + ", ".join(f"{_short(vocabulary.names[c])} ({containing[c]:,})"
                                          for c in tail))
    ax.text(0.01, 0.01, "\n".join(lines), transform=ax.transAxes, fontsize=8, va="bottom",
            ha="left", wrap=True, bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})
    never = summary["concepts_never_seen"]
    ax.set_title(
        f"Concept frequency long tail: {_dataset_title(summary)}\n"
        f"{summary['concepts_seen']:,} of {summary['vocabulary_size']:,} concepts seen"
        + (f" ({never:,} never, not plotted)" if never else "")
    )
    ax.set_xlabel("concept rank (most frequent = 1, log scale)")
    ax.set_ylabel("count (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    fig.savefig(path)


def _plot_per_sample(
    path: str, summary: dict[str, Any], per_sample: np.ndarray, distinct: np.ndarray
) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    distinct_hist = np.bincount(distinct, minlength=per_sample.shape[0])
    width = max(per_sample.shape[0], distinct_hist.shape[0])
    x = np.arange(width)
    counts = np.zeros(width, dtype=np.int64)
    counts[: per_sample.shape[0]] = per_sample
    unique = np.zeros(width, dtype=np.int64)
    unique[: distinct_hist.shape[0]] = distinct_hist
    ax.bar(x[1:] - 0.2, counts[1:], width=0.4, color="#1f77b4", label="instances per sample")
    ax.bar(x[1:] + 0.2, unique[1:], width=0.4, color="#aec7e8",
           label="distinct concepts per sample")
    ax.bar([0], counts[:1], width=0.8, color="#d62728", label="samples without concepts")
    share = summary["empty_share"]
    ax.annotate(f"{counts[0]:,} samples ({share:.1%})\nwithout concepts", (0, counts[0]),
                xytext=(0, 6), textcoords="offset points", fontsize=9, color="#d62728",
                ha="center", va="bottom")
    mean = summary["instances_per_sample"]["mean"]
    ax.set_title(
        f"Concepts per sample: {_dataset_title(summary)}\n"
        f"mean {mean:.2f} instances, {summary['distinct_per_sample_mean']:.2f} distinct concepts;"
        f" {share:.1%} of samples have none"
    )
    ax.set_xlabel("concepts in the sample")
    ax.set_ylabel("samples")
    if width <= 30:
        ax.set_xticks(x)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    fig.savefig(path)


def _selection_caption(summary: dict[str, Any]) -> str:
    sel = summary["selection"]
    return (
        f"{sel['batches']} superbatches of {sel['superbatch_size']:,} drawn, "
        f"{sel['batch_size']:,} kept each (filter ratio {sel['filter_ratio']:g}); "
        f"CABS-DM concept cap {sel['concept_cap']}\nmixed λ = {sel['mixed_lambda']:g}, "
        f"balanced t = {sel['balanced_threshold']:g}, CABS-DM α = {sel['dm_alpha']:g}"
    )


def _plot_distinct(
    path: str,
    summary: dict[str, Any],
    results: dict[str, dict[str, Any]],
    superbatch_distinct: list[int],
) -> None:
    fig = _figure(12.0, 5.5)
    ax = fig.add_subplot()
    policies = summary["selection"]["policies"]
    series = [results[name]["distinct"] for name in POLICY_LABELS] + [superbatch_distinct]
    labels = [
        f"{POLICY_LABELS[name]}\n(fill chose {policies[name]['filled_share']:.0%})"
        if name not in _NO_FILL else POLICY_LABELS[name]
        for name in POLICY_LABELS
    ] + ["whole superbatch\n(upper bound)"]
    colors = [_COLORS[name] for name in POLICY_LABELS] + ["#bcbd22"]
    boxes = ax.boxplot(series, patch_artist=True, widths=0.5, showfliers=False,
                       medianprops={"color": "black", "linewidth": 1.5})
    ax.set_xticks(range(1, len(labels) + 1), labels)
    for patch, color in zip(boxes["boxes"], colors, strict=True):
        patch.set_facecolor(color)
        patch.set_alpha(0.35)
    rng = np.random.default_rng(0)  # jitter only, for readability
    for i, (values, color) in enumerate(zip(series, colors, strict=True), start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=12, color=color,
                   alpha=0.8, zorder=3)
    means = [float(np.mean(v)) for v in series]
    ax.scatter(range(1, len(series) + 1), means, marker="D", s=50, color="black", zorder=4,
               label="mean")
    for i, m in enumerate(means, start=1):
        ax.annotate(f"mean {m:.1f}", (i, m), xytext=(10, 4), textcoords="offset points",
                    fontsize=9, bbox={"boxstyle": "round,pad=0.2", "facecolor": "white",
                                      "edgecolor": "none", "alpha": 0.8})
    ax.set_title(
        f"Distinct concepts per kept batch, same superbatches: {_dataset_title(summary)}\n"
        f"{_selection_caption(summary)}",
        fontsize=10,
    )
    ax.set_xlabel("selection policy (box: quartiles and median over batches; dot: one batch)")
    ax.set_ylabel("distinct concepts in the batch")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.savefig(path)


def _plot_kept(
    path: str,
    summary: dict[str, Any],
    vocabulary: Vocabulary,
    results: dict[str, dict[str, Any]],
    drawn_presence: np.ndarray,
    by_frequency: np.ndarray,
) -> None:
    sel = summary["selection"]
    expected = drawn_presence * (1.0 - sel["filter_ratio"])
    vocab = len(vocabulary)
    per_bar = 0.12 * len(POLICY_LABELS)
    fig = _figure(max(10.0, per_bar * vocab + 3) if vocab <= _BARS_UP_TO else 10.0, 5.5)
    ax = fig.add_subplot()
    if vocab <= _BARS_UP_TO:
        x = np.arange(vocab)
        width = 0.8 / len(POLICY_LABELS)
        centre = (len(POLICY_LABELS) - 1) / 2
        for j, name in enumerate(POLICY_LABELS):
            ax.bar(x + (j - centre) * width, results[name]["kept"][by_frequency], width=width,
                   color=_COLORS[name], label=POLICY_LABELS[name])
        ax.step(np.append(x, vocab) - 0.5, np.append(expected[by_frequency],
                expected[by_frequency][-1]), where="post", color="black", linewidth=1,
                label=f"drawn × (1 − f): keeping {1 - sel['filter_ratio']:.0%} uniformly")
        ax.set_xticks(x, [_short(vocabulary.names[i]) for i in by_frequency], rotation=60,
                      ha="right", fontsize=8)
        ax.set_xlabel("concept (most frequent in the dataset first)")
    else:
        # Thousands of concepts: average over log-spaced bins of dataset frequency rank, or the
        # tail is a band of 0s, 1s and 2s. Only concepts seen in the data are ranked.
        seen = by_frequency[: summary["concepts_seen"]]
        edges = np.unique(np.geomspace(1, seen.shape[0] + 1, num=32).astype(np.int64))
        centres = np.sqrt(edges[:-1] * (edges[1:] - 1).clip(min=edges[:-1]))
        bins = [seen[a - 1 : b - 1] for a, b in zip(edges[:-1], edges[1:], strict=True)]
        for name in POLICY_LABELS:
            counts = results[name]["kept"]
            ax.loglog(centres, [counts[b].mean() for b in bins], color=_COLORS[name],
                      marker="o", markersize=3, linewidth=1.2, label=POLICY_LABELS[name])
        ax.loglog(centres, [expected[b].mean() for b in bins], color="black", linewidth=1,
                  linestyle="--", label="drawn × (1 − f): keeping uniformly")
        ax.set_xlabel(
            f"concept rank in the dataset (most frequent = 1, log scale; {len(bins)} log bins)"
        )
    per = "" if vocab <= _BARS_UP_TO else ", mean per concept in the bin"
    ax.set_ylabel(f"kept samples containing the concept\n(sum over {sel['batches']} batches{per})")
    ax.set_title(
        f"Kept concept histogram by policy: {_dataset_title(summary)}\n"
        f"{_selection_caption(summary)}",
        fontsize=10,
    )
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    fig.savefig(path)
