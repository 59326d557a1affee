"""cabs-bench-pipeline (tools/bench_pipeline.py) runs end to end in its smoke mode and reports
what it promises.

Throughput numbers are noise at this size; what is deterministic, and asserted, is the shape of
the JSON line, positive rates, and the work each configuration did per trained sample: ``iid``
and ``deferred`` decode and tokenize exactly the trained samples, ``eager`` the whole superbatch
(5x at f = 0.8), ``lookahead`` the trained ones plus at most the step after the window.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a benchmark process with DataLoader worker processes

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench_pipeline.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    data = tmp_path_factory.mktemp("bench_pipeline") / "mds"
    result = subprocess.run(
        [
            sys.executable, str(BENCH), "--smoke", "--data", str(data),
            "--configs", "iid,deferred,eager,lookahead,invariant", "--model-step-ms", "5",
        ],
        capture_output=True, text=True, timeout=180, cwd=ROOT, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout  # ONE JSON line on stdout, progress on stderr
    return json.loads(lines[0])


def test_promised_keys_are_positive(smoke: dict) -> None:
    for key in (
        "iid_samples_per_s", "deferred_samples_per_s", "eager_samples_per_s",
        "deferred_ratio", "eager_ratio", "peak_rss_mb", "lookahead_samples_per_s",
        "lookahead_ratio",
    ):
        assert isinstance(smoke[key], float) and smoke[key] > 0, (key, smoke[key])
    assert smoke["deferred_ratio"] == pytest.approx(
        smoke["deferred_samples_per_s"] / smoke["iid_samples_per_s"], rel=1e-2
    )
    for config in ("iid", "deferred", "eager", "lookahead"):
        spread = smoke["configs"][config]["samples_per_s"]
        assert 0 < spread["min"] <= spread["median"] <= spread["max"]


def test_decode_and_tokenize_counts(smoke: dict) -> None:
    configs = smoke["configs"]
    assert configs["iid"]["decoded_per_trained"] == 1.0
    assert configs["deferred"]["decoded_per_trained"] == 1.0
    assert configs["eager"]["decoded_per_trained"] == 5.0
    assert configs["iid"]["tokenized_per_trained"] == 1.0
    assert configs["deferred"]["tokenized_per_trained"] == 1.0
    assert configs["eager"]["tokenized_per_trained"] == 5.0
    # The background decoding of the step after the timed window may land in the counts.
    assert 1.0 <= configs["lookahead"]["decoded_per_trained"] <= 1.5
    assert 1.0 <= configs["lookahead"]["tokenized_per_trained"] <= 1.5
    # World-invariant selection on one process: the same work, nothing to move.
    assert configs["invariant"]["decoded_per_trained"] == 1.0
    assert configs["invariant"]["tokenized_per_trained"] == 1.0
    assert configs["invariant"]["moved_per_step"] == {"samples": 0.0, "bytes": 0.0}
    assert smoke["invariant_vs_deferred"] > 0 and smoke["settings"]["world"] == 1


def test_cpu_per_trained_image_is_the_tree_cpu_over_trained_images(smoke: dict) -> None:
    for config in ("iid", "deferred", "eager", "lookahead"):
        entry = smoke["configs"][config]
        cpu = entry["cpu_ms_per_step"]
        # One round: the median is that round's value, kept_batch trained images per step.
        expected = (cpu["main"] + cpu["workers"]) / smoke["settings"]["kept_batch"]
        assert entry["cpu_ms_per_trained"] == pytest.approx(expected, abs=0.01)  # both rounded
        assert entry["cpu_ms_per_trained"] > 0
    assert smoke["settings"]["resampler"] == "torch"


def test_settings_describe_the_run(smoke: dict) -> None:
    settings = smoke["settings"]
    assert settings["kept_batch"] == 8 and settings["superbatch"] == 40
    assert settings["filter_ratio"] == 0.8 and settings["image_size"] == [224, 224]
    assert settings["workers"] == 2 and settings["rounds"] == 1
    assert settings["model_step_ms"] == 5.0
    data = settings["data"]
    assert data["samples"] == 240 and data["distinct_images"] == 240
    assert 30 <= data["image_kb"]["mean"] <= 60
    assert 256 <= data["long_side_px"]["min"] <= data["long_side_px"]["max"] <= 512
