"""cabs-bench-selection (tools/bench_selection.py): the default run's one JSON line, and
``--sweep``: one JSON line per (superbatch, world) point with every policy's time and the
all-gather bytes, and the figure.

Timings are noise here; what is asserted is the structure of the output, the kept counts, what
holds by construction (a schedule's phase keeps what its policy keeps alone), the byte counts
(recomputed here from the generated superbatch and the exchange ``gather_concepts`` makes), the
dataset-wide counts the newer policies bind to, and that the PNG is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cabs_streaming.bench.selection import (
    BUDGET_MS,
    NEW_POLICIES,
    NOMINAL_DATASET,
    QUICK_SIZES,
    QUICK_WORLDS,
    SWEEP_NEW_POLICIES,
    VOCABULARY,
    all_gather_bytes,
    balanced_threshold,
    expected_counts,
    make_superbatch,
    quality_column,
)

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench_selection.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    png = tmp_path_factory.mktemp("sweep") / "sweep.png"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--sweep", "--quick", "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return [json.loads(line) for line in lines], png


def test_one_line_per_point_of_the_grid(quick: tuple[list[dict], Path]) -> None:
    points, _ = quick
    grid = [(p["superbatch"], p["world"]) for p in points]
    assert grid == [(s, w) for s in QUICK_SIZES for w in QUICK_WORLDS]
    for p in points:
        assert p["per_rank"] * p["world"] == p["superbatch"]
        assert p["keep_per_rank"] == round(p["per_rank"] * 0.2)  # f = 0.8
        assert p["kept"] == p["keep_per_rank"] * p["world"]
        for label in ("iid", "fm", "dm", "dm_compat", *SWEEP_NEW_POLICIES):
            assert p[f"{label}_ms"] > 0 and p[f"{label}_cpu_ms"] > 0, (label, p)


def test_all_gather_bytes_are_what_gather_concepts_exchanges(
    quick: tuple[list[dict], Path],
) -> None:
    points, _ = quick
    for p in points:
        offsets, _ = make_superbatch(0, world=1, per_rank=p["superbatch"])
        world, n = p["world"], p["per_rank"]
        if world == 1:
            assert p["all_gather_bytes_per_rank"] == {"sent": 0, "received": 0}
            continue
        longest = max(int(offsets[(r + 1) * n] - offsets[r * n]) for r in range(world))
        sent = 2 * 8 + 4 * n + 4 * longest + 8  # sizes, lengths, padded ids, digest
        assert p["all_gather_bytes_per_rank"] == {"sent": sent, "received": sent * world}


def test_bytes_grow_with_the_ids_of_the_busiest_rank() -> None:
    offsets = np.array([0, 3, 3, 10, 11], dtype=np.int64)  # ranks of 2: 3 and 8 instances
    assert all_gather_bytes(offsets, 2) == {"sent": 16 + 8 + 32 + 8, "received": 128}


def test_the_figure_is_written(quick: tuple[list[dict], Path]) -> None:
    _, png = quick
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_quick_and_plot_need_sweep(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2 and "--quick and --plot go with --sweep" in result.stderr


@pytest.fixture(scope="module")
def default_line() -> dict:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--repeats", "20", "--warmup", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
        env={**os.environ, "NUMBA_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return json.loads(lines[0])


OLD_KEYS = (
    "dm_ms", "dm_compat_ms", "fm_ms", "iid_ms", "kept", "dm_distinct", "dm_compat_distinct",
    "fm_distinct", "iid_distinct", "fm_mean_instances", "iid_mean_instances",
)


def test_default_line_keeps_the_old_keys_and_adds_every_new_policy(default_line: dict) -> None:
    assert list(default_line)[: len(OLD_KEYS)] == list(OLD_KEYS)
    assert set(default_line["kept"]) == {"iid", "fm", "dm", "dm_compat", *NEW_POLICIES}
    assert all(kept == 4 * 1_024 for kept in default_line["kept"].values())
    for label in NEW_POLICIES:
        assert default_line[f"{label}_ms"] > 0, label
        assert 0 < default_line[f"{label}_distinct"] <= default_line["settings"][
            "superbatch_distinct"
        ], label
        assert default_line[f"{label}_mean_instances"] > 0, label
        assert 0 <= default_line[f"{label}_filled"] <= 4 * 1_024, label


def test_default_line_states_the_budget_and_each_verdict(default_line: dict) -> None:
    assert default_line["budget_ms"] == BUDGET_MS == 5.0
    verdicts = default_line["within_budget"]
    assert list(verdicts) == list(NEW_POLICIES)
    for label, verdict in verdicts.items():
        assert verdict is (default_line[f"{label}_ms"] <= BUDGET_MS), label


def test_schedule_phases_keep_what_their_policies_keep_alone(default_line: dict) -> None:
    # schedule_dm is timed at the same steps as dm; FM has no randomness without filters.
    assert default_line["schedule_dm_distinct"] == default_line["dm_distinct"]
    assert default_line["schedule_dm_filled"] > 0  # DM's default cap leaves quotas open
    assert default_line["schedule_fm_distinct"] == default_line["fm_distinct"]
    assert default_line["schedule_fm_mean_instances"] == default_line["fm_mean_instances"]


def test_new_policies_do_what_they_are_for(default_line: dict) -> None:
    settings = default_line["settings"]
    assert settings["balanced_threshold"] == balanced_threshold(expected_counts(0))
    # Every rank has far more samples with concepts than its quota: the draw decides alone,
    # and thinning the head keeps more distinct concepts than a uniform draw.
    assert default_line["balanced_filled"] == 0
    assert default_line["balanced_distinct"] > default_line["iid_distinct"]
    # Half of 20,480 samples pass the filter: no rank falls short of its 1,024.
    assert default_line["dm_filtered_filter_shortfall"] == 0
    # Mixed adds FM's count to DM's gain: more instances per kept sample than DM.
    assert default_line["mixed_mean_instances"] > default_line["schedule_dm_mean_instances"]


def test_expected_counts_follow_the_generator() -> None:
    counts = expected_counts(0)
    assert counts.shape == (VOCABULARY,) and np.all(counts > 0)
    assert counts.max() < NOMINAL_DATASET
    offsets, ids = make_superbatch(0)
    owner = np.repeat(np.arange(offsets.shape[0] - 1), np.diff(offsets))
    doc_freq = np.bincount(np.unique(owner * VOCABULARY + ids) % VOCABULARY,
                           minlength=VOCABULARY)
    # The same permutation: the superbatch's most frequent concepts are the expected head, at
    # about the expected rate.
    head = np.argsort(-doc_freq, kind="stable")[:5]
    assert set(head) == set(np.argsort(-counts, kind="stable")[:5])
    share = counts[head] / NOMINAL_DATASET
    assert np.allclose(doc_freq[head] / (offsets.shape[0] - 1), share, rtol=0.15)
    assert np.array_equal(expected_counts(0), counts)
    assert not np.array_equal(expected_counts(1), counts)


def test_quality_column_is_seeded() -> None:
    first = quality_column(0, 20_480)
    assert first.shape == (20_480,) and first.dtype == np.float64
    assert np.array_equal(first, quality_column(0, 20_480))
    assert not np.array_equal(first, quality_column(1, 20_480))
    assert 0.0 <= first.min() and first.max() < 1.0
