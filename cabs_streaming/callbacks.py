"""Concept-diversity monitoring: what CABS does to the batches, logged every step.

``ConceptDiversityMonitor`` reads the selection that ``ConceptAwareBatchSampling`` just made
(the global superbatch's concept ids and the kept indices of every rank, identical on all ranks)
and logs, per step:

- ``concepts/kept_distinct`` and ``concepts/superbatch_distinct``: distinct concepts in the kept
  global batch and in the superbatch it was drawn from;
- ``concepts/kept_coverage``: share of the concepts seen in any superbatch so far that have been
  in at least one kept batch (cumulative coverage; 1.0 = nothing seen was ever left out);
- ``concepts/rare_half_share``: share of kept samples holding at least one concept from the
  rarest half of the concepts seen so far, rarity being the cumulative number of superbatch
  samples that contained the concept. IID keeps about the superbatch's own share; CABS-DM more.

Its running counts are saved in checkpoints so a resumed run continues the same curves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from composer.core import Callback, State
from composer.loggers import Logger

from cabs_streaming.algorithm import ConceptAwareBatchSampling, SelectionRecord

__all__ = ["ConceptDiversityMonitor", "diversity_metrics"]


def _sample_concepts(offsets: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (sample, concept) pairs of a CSR batch: (sample index, concept id) arrays."""
    lengths = np.diff(offsets)
    samples = np.repeat(np.arange(lengths.shape[0], dtype=np.int64), lengths)
    pairs = np.unique(np.stack([samples, ids.astype(np.int64)]), axis=1)
    return pairs[0], pairs[1]


def diversity_metrics(
    record: SelectionRecord, doc_freq: np.ndarray, ever_kept: np.ndarray
) -> dict[str, float]:
    """Update the running counts in place with one selection and return the step's metrics.

    ``doc_freq[c]``: superbatch samples so far that contained ``c``; ``ever_kept[c]``: whether
    ``c`` was ever in a kept batch. Both must be long enough for every id in ``record``.
    """
    samples, concepts = _sample_concepts(record.offsets, record.ids)
    np.add.at(doc_freq, concepts, 1)
    kept_mask = np.zeros(record.offsets.shape[0] - 1, dtype=bool)
    kept_mask[record.kept_global] = True
    kept_pairs = kept_mask[samples]
    ever_kept[concepts[kept_pairs]] = True

    seen = np.flatnonzero(doc_freq)
    coverage = float(ever_kept[seen].mean()) if seen.size else 0.0
    rare = np.zeros(doc_freq.shape[0], dtype=bool)
    if seen.size:
        # The rarest half: the first ceil(K / 2) seen concepts by cumulative frequency, ties
        # broken by id so the split is deterministic.
        order = seen[np.lexsort((seen, doc_freq[seen]))]
        rare[order[: (seen.size + 1) // 2]] = True
    with_rare = np.zeros(kept_mask.shape[0], dtype=bool)
    with_rare[samples[kept_pairs & rare[concepts]]] = True
    kept_total = int(kept_mask.sum())
    stats = record.result.stats
    return {
        "concepts/kept_distinct": float(stats.kept_distinct),
        "concepts/superbatch_distinct": float(stats.superbatch_distinct),
        "concepts/kept_coverage": coverage,
        "concepts/rare_half_share": float(with_rare.sum()) / kept_total if kept_total else 0.0,
    }


class ConceptDiversityMonitor(Callback):
    """Log concept diversity of every kept batch (see the module docstring for the metrics).

    Needs ``ConceptAwareBatchSampling`` among the trainer's algorithms; does nothing otherwise.
    """

    def __init__(self) -> None:
        self.doc_freq = np.zeros(0, dtype=np.int64)
        self.ever_kept = np.zeros(0, dtype=bool)

    def _grow(self, size: int) -> None:
        if size > self.doc_freq.shape[0]:
            self.doc_freq = np.concatenate(
                [self.doc_freq, np.zeros(size - self.doc_freq.shape[0], dtype=np.int64)]
            )
            self.ever_kept = np.concatenate(
                [self.ever_kept, np.zeros(size - self.ever_kept.shape[0], dtype=bool)]
            )

    def after_dataloader(self, state: State, logger: Logger) -> None:
        """Runs after the algorithm (Composer runs algorithms before callbacks on an event)."""
        record = next(
            (
                a.last
                for a in state.algorithms
                if isinstance(a, ConceptAwareBatchSampling) and a.last is not None
            ),
            None,
        )
        if record is None or record.step != int(state.timestamp.batch):
            return
        self._grow(int(record.ids.max()) + 1 if record.ids.size else 0)
        logger.log_metrics(diversity_metrics(record, self.doc_freq, self.ever_kept))

    def state_dict(self) -> dict[str, Any]:
        """The running counts, as plain lists (Composer saves rank 0's; all ranks agree)."""
        return {"doc_freq": self.doc_freq.tolist(), "ever_kept": self.ever_kept.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the running counts of a checkpoint."""
        self.doc_freq = np.asarray(state.get("doc_freq", []), dtype=np.int64)
        self.ever_kept = np.asarray(state.get("ever_kept", []), dtype=bool)
