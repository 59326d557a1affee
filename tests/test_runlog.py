"""What a run shows and leaves: chance levels, the history a resumed run appends to, the summary,
and no warning about random weights for a model meant to start from scratch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cabs_streaming.runlog import chance_levels, read_history, summarize, summary_lines


def test_chance_levels_are_k_over_classes_and_k_over_pairs() -> None:
    chance = chance_levels({"zeroshot": 20}, {"retrieval": 500})
    assert chance["zeroshot/top1_accuracy"] == pytest.approx(1 / 20)
    assert chance["zeroshot/top5_accuracy"] == pytest.approx(5 / 20)
    assert chance["retrieval/image_to_text_recall_at_1"] == pytest.approx(1 / 500)
    assert chance["retrieval/text_to_image_recall_at_5"] == pytest.approx(5 / 500)
    assert chance["retrieval/mean_recall"] == pytest.approx((1 + 5 + 1 + 5) / 4 / 500)
    assert chance_levels({"tiny": 3}, {})["tiny/top5_accuracy"] == 1.0  # k clamped to classes


def test_a_replayed_step_of_a_resumed_run_counts_once_with_its_last_line(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    lines = [
        {"step": 0, "loss/train/total": 4.0, "cabs/kept_distinct": 10.0},
        {"step": 1, "loss/train/total": 3.0, "cabs/kept_distinct": 12.0},
        {"step": 1, "loss/train/total": 3.0, "cabs/kept_distinct": 12.0},  # after the restart
        {"step": 2, "loss/train/total": 2.0, "cabs/kept_distinct": 14.0},
        {"step": 3, "loss/train/total": 1.0, "metrics/zeroshot/top1_accuracy": 0.25},
    ]
    cut = json.dumps({"step": 2, "loss/train/total": 9.0})[:12]  # killed while writing it
    history.write_text("".join(json.dumps(line) + "\n" for line in lines[:3]) + cut + "\n")
    with history.open("a") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines[3:]))
    records = read_history(str(history))
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    summary = summarize(
        records,
        {"zeroshot/top1_accuracy": 0.05},
        wall_time_s=10.0,
        train_time_s=4.0,
        steps_this_session=2,
        kept_per_step=32,
        drawn_per_step=160,
    )
    assert (summary["steps"], summary["first_loss"], summary["final_loss"]) == (4, 4.0, 1.0)
    assert summary["final_loss_mean_last_10"] == pytest.approx(2.5)
    assert summary["mean_kept_distinct"] == pytest.approx(12.0)
    assert summary["samples_per_s_trained"] == pytest.approx(2 * 32 / 4.0)
    assert summary["samples_per_s_drawn"] == pytest.approx(2 * 160 / 4.0)
    assert summary["eval"] == {
        "zeroshot/top1_accuracy": {"value": 0.25, "chance": 0.05, "after_steps": 4}
    }
    text = "\n".join(summary_lines({**summary, "run_name": "r", "epochs": 0.5, "files": {}}))
    assert "zeroshot/top1_accuracy 0.25 (chance 0.05)" in text


def test_a_model_meant_to_start_from_scratch_does_not_warn_about_random_weights(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from cabs_streaming.model import ComposerCLIP

    with caplog.at_level(logging.INFO):
        ComposerCLIP("cabs-tiny-clip")
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    # open_clip's warning itself still works for everyone else.
    import open_clip

    with caplog.at_level(logging.INFO):
        open_clip.create_model("cabs-tiny-clip", pretrained=None)
    assert [r for r in caplog.records if "No pretrained weights" in r.getMessage()]


def test_a_history_line_cut_by_a_crash_does_not_swallow_the_next_one(tmp_path: Path) -> None:
    from cabs_streaming.runlog import RunLog

    history = tmp_path / "history.jsonl"
    history.write_text(json.dumps({"step": 0, "loss/train/total": 4.0}) + '\n{"step": 1, "lo')
    log = RunLog(run_name="r", history=str(history), progress_bar=False)
    log._step = 1  # what before_dataloader sets in a run; the resumed run replays step 1
    log.log_metrics({"loss/train/total": 3.0})
    log._flush()
    assert [r["loss/train/total"] for r in read_history(str(history))] == [4.0, 3.0]
