"""tools/concept_report.py (cabs_streaming.report) on the embedded sample.

Every promised file is written and non-empty, and the summary's numbers agree with each other and
with a direct count of the dataset. Only what holds by construction is asserted (which policy
keeps more concepts on 3,000 samples over 20 concepts is not): the newer policies' settings and
defaults, ``balanced`` drawing only samples with concepts, and ``mixed`` at ``lambda = 0`` and
CABS-DM at ``alpha = 0`` being CABS-DM.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from paths import SAMPLE
from streaming import StreamingDataset

from cabs_streaming.concepts import Vocabulary, decode_concepts
from cabs_streaming.report import (
    FIGURES,
    POLICY_LABELS,
    SUMMARY,
    concept_report,
    default_balanced_threshold,
    read_concepts,
)

TRAIN = SAMPLE / "train"
SETTINGS = {"filter_ratio": 0.75, "batch_size": 48, "batches": 6, "seed": 3, "concept_cap": 6}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("report")
    summary = concept_report(str(TRAIN), str(out), progress=False, **SETTINGS)
    return out, summary


@pytest.fixture(scope="module")
def direct_counts(tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    dataset = StreamingDataset(local=str(TRAIN), batch_size=1, shuffle=False)
    lists = [decode_concepts(dataset[i]["concepts"]).tolist() for i in range(dataset.num_samples)]
    del dataset
    return lists


def test_every_promised_file_is_written_and_not_empty(report: tuple[Path, dict]) -> None:
    out, summary = report
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, name
    assert json.loads((out / SUMMARY).read_text()) == summary
    assert summary["figures"] == list(FIGURES)


def test_dataset_numbers_add_up_and_match_a_direct_count(
    report: tuple[Path, dict], direct_counts: list[list[int]]
) -> None:
    _, summary = report
    vocabulary = Vocabulary.load(str(TRAIN))
    assert summary["samples"] == summary["dataset_samples"] == len(direct_counts) == 3000
    hist = {int(k): v for k, v in summary["instances_per_sample"]["histogram"].items()}
    assert sum(hist.values()) == summary["samples"]
    assert sum(k * v for k, v in hist.items()) == summary["instances"]
    assert hist[0] == summary["samples_without_concepts"] == sum(not c for c in direct_counts)
    assert summary["empty_share"] == pytest.approx(hist[0] / summary["samples"])

    containing = Counter(vocabulary.names[c] for ids in direct_counts for c in set(ids))
    instances = Counter(vocabulary.names[c] for ids in direct_counts for c in ids)
    frequency = summary["concept_frequency"]
    assert frequency["samples_containing"] == dict(containing)
    assert frequency["instances"] == dict(instances)
    assert sum(frequency["instances"].values()) == summary["instances"]
    assert list(frequency["samples_containing"].values()) == sorted(containing.values(),
                                                                     reverse=True)
    assert list(frequency["head"]) == list(frequency["samples_containing"])[:5]
    assert list(frequency["tail"]) == list(frequency["samples_containing"])[::-1][:5]
    assert summary["concepts_seen"] + summary["concepts_never_seen"] == len(vocabulary)


def test_selection_numbers_hold_by_construction(report: tuple[Path, dict]) -> None:
    _, summary = report
    sel = summary["selection"]
    assert sel["superbatch_size"] == round(SETTINGS["batch_size"] / (1 - SETTINGS["filter_ratio"]))
    assert sel["concept_cap"] == SETTINGS["concept_cap"]
    bound = sel["superbatch_distinct"]["per_batch"]
    assert len(bound) == SETTINGS["batches"]
    drawn = sel["drawn_presence"]
    assert set(sel["policies"]) == set(POLICY_LABELS)
    for name, policy in sel["policies"].items():
        assert policy["label"] == POLICY_LABELS[name]
        distinct = policy["distinct_per_batch"]
        assert len(distinct) == SETTINGS["batches"]
        assert all(0 < d <= b for d, b in zip(distinct, bound, strict=True))
        assert policy["distinct_mean"] == pytest.approx(np.mean(distinct))
        assert policy["kept_samples"] == SETTINGS["batches"] * SETTINGS["batch_size"]
        kept = policy["kept_concepts"]
        assert sum(kept.values()) == policy["kept_presence_total"]
        # A concept cannot be kept in more samples than were drawn with it.
        assert all(count <= drawn[concept] for concept, count in kept.items())
        assert policy["kept_presence_total"] <= policy["kept_instances"]
        assert 0.0 <= policy["kept_empty_share"] <= 1.0
    assert sel["policies"]["iid"]["filled_share"] == 0.0
    assert set(POLICY_LABELS) >= {"iid", "diversity", "frequency", "mixed", "balanced",
                                  "diversity_alpha"}


def test_the_new_policies_settings_and_defaults_are_recorded(
    report: tuple[Path, dict], direct_counts: list[list[int]]
) -> None:
    _, summary = report
    sel = summary["selection"]
    assert sel["mixed_lambda"] == 1.0 and sel["dm_alpha"] == 0.5
    # Default threshold: the median number of samples per concept present (the dataset-wide
    # counts are those of the samples read, here the whole sample).
    containing = Counter(c for ids in direct_counts for c in set(ids))
    assert sel["balanced_threshold"] == float(np.median(list(containing.values())))
    assert default_balanced_threshold(np.zeros(3, dtype=np.int64)) == 1.0
    configs = {name: policy["config"] for name, policy in sel["policies"].items()}
    assert configs["mixed"] == {"name": "mixed", "concept_cap": SETTINGS["concept_cap"],
                                "official_compat": False, "lambda": 1.0}
    assert configs["balanced"] == {"name": "balanced", "threshold": sel["balanced_threshold"]}
    assert configs["diversity_alpha"] == {"name": "diversity",
                                          "concept_cap": SETTINGS["concept_cap"],
                                          "official_compat": False, "alpha": 0.5}


def test_balanced_draws_only_samples_with_concepts(report: tuple[Path, dict]) -> None:
    _, summary = report
    balanced = summary["selection"]["policies"]["balanced"]
    # 3% of samples are empty: every superbatch of 192 has far more than 48 with concepts, and
    # a sample without concepts has keep probability 0, so the draw decides the whole batch.
    assert balanced["kept_empty_share"] == 0.0
    assert balanced["filled_share"] == 0.0


def test_mixed_at_lambda_0_and_dm_at_alpha_0_are_cabs_dm(report: tuple[Path, dict],
                                                         tmp_path: Path) -> None:
    _, summary = report
    data = read_concepts(str(TRAIN), progress=False)
    again = concept_report(str(TRAIN), str(tmp_path), progress=False, data=data,
                           mixed_lambda=0.0, dm_alpha=0.0, **SETTINGS)
    policies = again["selection"]["policies"]
    assert again["selection"]["mixed_lambda"] == 0.0 and again["selection"]["dm_alpha"] == 0.0
    for name in ("mixed", "diversity_alpha"):
        for key in ("distinct_per_batch", "kept_instances", "kept_concepts", "filled_share"):
            assert policies[name][key] == policies["diversity"][key], (name, key)
    # The default run's DM is the same too (only the new policies' settings changed).
    assert policies["diversity"]["kept_concepts"] == (
        summary["selection"]["policies"]["diversity"]["kept_concepts"]
    )


def test_the_report_is_deterministic(report: tuple[Path, dict], tmp_path: Path) -> None:
    _, summary = report
    data = read_concepts(str(TRAIN), progress=False)
    again = concept_report(str(TRAIN), str(tmp_path), progress=False, data=data, **SETTINGS)
    for policy in [*summary["selection"]["policies"].values(),
                   *again["selection"]["policies"].values()]:
        policy.pop("median_ms")
    assert again == summary


def test_a_batch_size_no_superbatch_keeps_exactly_is_refused_not_rounded(tmp_path: Path) -> None:
    # 10 / (1 - 0.7) = 33.3: a superbatch of 33 would keep 9.9, i.e. another filter ratio.
    with pytest.raises(ValueError, match="33.3333 samples, not a whole number"):
        concept_report(str(TRAIN), str(tmp_path), filter_ratio=0.7, batch_size=10, batches=1,
                       progress=False)


def test_cli_writes_the_folder_and_reports_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cabs_streaming.cli.report import main

    status = main([str(TRAIN), "--out", str(tmp_path / "r"), "--batch-size", "16", "--batches",
                   "2", "--max-samples", "400", "--no-progress"])
    printed = json.loads(capsys.readouterr().out)
    assert status == 0 and printed["samples"] == 400
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted([*FIGURES, SUMMARY])
    summary = json.loads((tmp_path / "r" / SUMMARY).read_text())
    assert summary["dataset_samples"] == 3000 and summary["samples"] == 400

    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "index.json does not exist" in capsys.readouterr().err
    assert main([str(TRAIN), "--out", str(tmp_path / "y"), "--batch-size", "1000",
                 "--max-samples", "100", "--no-progress"]) == 2
    assert "lower --batch-size" in capsys.readouterr().err
    assert main([str(TRAIN), "--out", str(tmp_path / "z"), "--filter-ratio", "1"]) == 2
    assert "filter_ratio must lie in [0, 1)" in capsys.readouterr().err


def test_cli_passes_the_new_policies_options_and_refuses_bad_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cabs_streaming.cli.report import main

    common = [str(TRAIN), "--batch-size", "16", "--batches", "2", "--max-samples", "400",
              "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "r"), "--mixed-lambda", "2.5",
                 "--balanced-threshold", "40", "--dm-alpha", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["distinct_per_kept_batch"]) == set(POLICY_LABELS.values())
    sel = json.loads((tmp_path / "r" / SUMMARY).read_text())["selection"]
    assert (sel["mixed_lambda"], sel["balanced_threshold"], sel["dm_alpha"]) == (2.5, 40.0, 1.0)

    for flag, value, message in (
        ("--mixed-lambda", "-1", "lambda must be a finite number >= 0"),
        ("--balanced-threshold", "0", "threshold must be a positive number"),
        ("--dm-alpha", "2", "alpha must lie in [0, 1]"),
    ):
        assert main([*common, "--out", str(tmp_path / "bad"), flag, value]) == 2, flag
        assert message in capsys.readouterr().err, flag
