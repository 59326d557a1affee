"""Target distributions for CABS-DM: per-concept weights from the dataset or from a file.

The greedy's targets ``t_c`` share the kept batch among the superbatch's concepts
(docs/selection.md#target-distributions). Uniform sharing is the published method; ``alpha``
aims at a power of the dataset-wide frequency, ``N_c ** alpha`` (0: uniform, 1: the data's own
distribution; in between the head shrinks while the order of concepts stays), and a weights file
at any distribution a practitioner defines. Both become one float64 weight per concept id here,
once per run; the kernels turn weights into integer targets every step.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cabs_streaming.selection.base import DatasetFacts

#: The key of a weights file that gives every concept not listed by name.
EVERY_OTHER = "*"


def check_alpha(alpha: Any) -> None:
    """``alpha`` is None or a number in ``[0, 1]``; anything else is a ValueError."""
    if alpha is None:
        return
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.floating):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (0 = uniform, 1 = natural), got {alpha}")


def frequency_weights(concept_samples: np.ndarray, alpha: float) -> np.ndarray:
    """``N_c ** alpha`` per concept id; a concept the counts never saw weighs 0 (target 1).

    ``alpha = 0`` gives every concept weight 1 (``0 ** 0 = 1`` too): exactly the uniform
    targets.
    """
    counts = np.asarray(concept_samples, dtype=np.float64)
    return np.power(counts, float(alpha))


def read_weights_file(path: str | os.PathLike[str], names: tuple[str, ...]) -> np.ndarray:
    """Per-concept weights from a JSON file ``{"concept name": weight, ..., "*": default}``.

    Every vocabulary concept needs a weight: listed by name, or the ``"*"`` entry for all
    others. Names not in the vocabulary, negative or non-finite weights are errors naming the
    file and the entry.
    """
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"target weights file {where} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"target weights file {where} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"target weights file {where} must hold a JSON object "
            '{"concept name": weight, ..., "*": weight of every other concept}'
        )
    index = {name: i for i, name in enumerate(names)}
    default = data.get(EVERY_OTHER)
    weights = np.full(len(names), np.nan, dtype=np.float64)
    for name, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value >= 0
        ):
            raise ValueError(
                f"target weights file {where}: the weight of {name!r} must be a finite number "
                f">= 0, got {value!r}"
            )
        if name == EVERY_OTHER:
            continue
        if name not in index:
            raise ValueError(
                f"target weights file {where}: {name!r} is not a concept of the vocabulary "
                f"({len(names)} names)"
            )
        weights[index[name]] = float(value)
    missing = np.flatnonzero(np.isnan(weights))
    if missing.size:
        if default is None:
            shown = ", ".join(repr(names[i]) for i in missing[:5])
            raise ValueError(
                f"target weights file {where} gives no weight to {missing.size} concept(s) "
                f"({shown}{', ...' if missing.size > 5 else ''}); list them or add a "
                f'"{EVERY_OTHER}" entry for every concept not listed'
            )
        weights[missing] = float(default)
    return weights


def target_weights(
    facts: DatasetFacts, alpha: float | None, weights: str | None, policy: str
) -> np.ndarray:
    """The float64 per-concept weights of ``alpha`` (needs counts) or a ``weights`` file."""
    if alpha is not None:
        if facts.concept_samples is None:
            raise ValueError(
                f"selection policy {policy!r} with alpha={alpha} needs the dataset-wide concept "
                f"counts, and {facts.source} has none: convert it with this version of "
                "cabs-convert (it writes concept_counts.json beside vocabulary.json)"
            )
        return frequency_weights(facts.concept_samples, alpha)
    if weights is None:
        raise ValueError("target_weights needs alpha or a weights file")
    if facts.names is None:
        raise ValueError(
            f"selection policy {policy!r} with a weights file needs the vocabulary's names"
        )
    return read_weights_file(weights, facts.names)
