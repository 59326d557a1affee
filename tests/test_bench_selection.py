"""cabs-bench-selection --sweep (tools/bench_selection.py): one JSON line per (superbatch, world)
point with every policy's time and the all-gather bytes, and the figure.

Timings are noise at this size; what is asserted is the grid, the kept counts, the byte counts
(recomputed here from the generated superbatch and the exchange ``gather_concepts`` makes) and
that the PNG is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cabs_streaming.bench.selection import (
    QUICK_SIZES,
    QUICK_WORLDS,
    all_gather_bytes,
    make_superbatch,
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
        for label in ("iid", "fm", "dm", "dm_compat"):
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
