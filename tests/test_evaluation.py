"""Zero-shot classification and retrieval: metrics, classifier caching, loaders and evaluators.

The evaluator tests read the embedded sample (``data/sample/eval_classification`` and
``eval_retrieval``); the two-rank tests also use odd-sized copies of their first samples.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from composer import DataSpec, Trainer
from composer.loggers import InMemoryLogger
from composer.utils.reproducibility import seed_all
from helpers import free_port, write_mds
from paths import ROOT, SAMPLE
from streaming import StreamingDataset

from cabs_streaming.concepts import MDS_COLUMNS, Vocabulary
from cabs_streaming.dataset import num_samples_in_batch
from cabs_streaming.evaluation import (
    ZeroShotCollator,
    build_evaluators,
    build_retrieval_evaluator,
    build_zeroshot_evaluator,
)
from cabs_streaming.metrics import (
    RETRIEVAL_METRICS,
    ZEROSHOT_METRICS,
    ImageTextRetrieval,
    ImageTextRetrievalScore,
    ZeroShotAccuracy,
    ZeroShotTask,
    key_ids,
    retrieval_recalls,
)
from cabs_streaming.model import ComposerCLIP

# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_sets() -> dict[str, str]:
    """``classification`` and ``retrieval`` MDS dirs: the embedded sample's evaluation splits."""
    return {
        "classification": str(SAMPLE / "eval_classification"),
        "retrieval": str(SAMPLE / "eval_retrieval"),
    }


@pytest.fixture(scope="module")
def odd_eval_sets(tmp_path_factory: pytest.TempPathFactory, eval_sets) -> dict[str, str]:
    """Odd-sized copies of the first samples of ``eval_sets``, so two ranks need padding."""
    root = tmp_path_factory.mktemp("odd")
    out = {}
    for kind, n in (("classification", 45), ("retrieval", 33)):  # odd
        source = StreamingDataset(local=eval_sets[kind], batch_size=1, shuffle=False)
        assert source.num_samples > n, (kind, source.num_samples)
        rows = [source.get_item(i) for i in range(n)]
        rows = [{column: row[column] for column in MDS_COLUMNS} for row in rows]
        names = Vocabulary.load(eval_sets[kind]).names
        out[kind] = str(write_mds(root / kind, rows, names, size_limit=1 << 16))
        del source
    gc.collect()
    return out


# ------------------------------------------------------------------------------------------------
# Retrieval metric
# ------------------------------------------------------------------------------------------------

#: scores[text i, image j]; the positive of text i is image i.
HAND_SCORES = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.2], [0.3, 0.6, 0.4]])


def _hand_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """Unit images e1..e3 and unit texts whose dot products with them are ``HAND_SCORES``."""
    images = torch.eye(3, 4)
    slack = (1 - HAND_SCORES.pow(2).sum(dim=1)).sqrt()[:, None]
    texts = torch.cat([HAND_SCORES, slack], dim=1)
    torch.testing.assert_close(texts @ images.T, HAND_SCORES)
    return images, texts


def test_retrieval_recalls_match_a_hand_computed_similarity_matrix():
    # text->image, best image per text: 0 (hit), 0 (miss: wants 1), 1 (miss: wants 2)
    # image->text, best text per image: 0 (hit), 2 (miss: wants 1), 2 (hit)
    # k = 5 is clamped to the 3 candidates, so every query hits.
    images, texts = _hand_embeddings()
    expected = {
        "image_to_text_recall_at_1": 2 / 3,
        "image_to_text_recall_at_5": 1.0,
        "text_to_image_recall_at_1": 1 / 3,
        "text_to_image_recall_at_5": 1.0,
        "mean_recall": 0.75,
    }
    got = retrieval_recalls(images, texts)
    assert set(got) == set(RETRIEVAL_METRICS)
    assert {k: float(v) for k, v in got.items()} == pytest.approx(expected)
    metric = ImageTextRetrieval()
    metric.update(images[:2], texts[:2], key_ids(["a", "b"]))  # two batches, one result
    metric.update(images[2:], texts[2:], key_ids(["c"]))
    assert {k: float(v) for k, v in metric.compute().items()} == pytest.approx(expected)
    for name, value in expected.items():
        score = ImageTextRetrievalScore(score=name)
        score.update(images, texts)
        assert float(score.compute()) == pytest.approx(value)


def _clip_benchmark_recall(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """clip_benchmark's ``recall_at_k`` (true positives in the top k / positives) > 0, averaged."""
    top = scores.topk(k, dim=1).indices
    onehot = F.one_hot(top, num_classes=scores.shape[1])
    true_positive = (onehot * positives[:, None, :]).sum(dim=(1, 2))
    return float((true_positive / positives.sum(dim=1) > 0).float().mean())


def test_retrieval_recalls_agree_with_clip_benchmark_on_random_embeddings():
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(60, 16, generator=gen), dim=-1)
    texts = F.normalize(images + 0.9 * torch.randn(60, 16, generator=gen), dim=-1)
    scores = texts @ images.T
    positives = torch.eye(60, dtype=torch.bool)
    got = retrieval_recalls(images, texts, ks=(1, 5, 10), chunk_size=7)
    for k in (1, 5, 10):
        t2i = _clip_benchmark_recall(scores, positives, k)  # its image_retrieval_recall@k
        i2t = _clip_benchmark_recall(scores.T, positives.T, k)  # its text_retrieval_recall@k
        assert float(got[f"text_to_image_recall_at_{k}"]) == pytest.approx(t2i)
        assert float(got[f"image_to_text_recall_at_{k}"]) == pytest.approx(i2t)
        assert 0 < t2i < 1 and 0 < i2t < 1  # a case that tells the directions apart


def test_retrieval_metric_counts_a_sample_repeated_for_padding_once():
    images, texts = _hand_embeddings()
    metric = ImageTextRetrieval()
    metric.update(images, texts, key_ids(["a", "b", "c"]))
    metric.update(images[1:2], texts[1:2], key_ids(["b"]))  # Streaming's padding repeat
    assert float(metric.compute()["mean_recall"]) == pytest.approx(0.75)


def test_retrieval_metric_is_nan_before_any_update_and_checks_pairs():
    assert torch.isnan(ImageTextRetrievalScore(score="mean_recall").compute())
    with pytest.raises(ValueError, match="one caption per image"):
        ImageTextRetrieval().update(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="score="):
        ImageTextRetrievalScore(score="recall")


# ------------------------------------------------------------------------------------------------
# Classification metric
# ------------------------------------------------------------------------------------------------

LOGITS = torch.tensor(
    [
        [9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 0 ranks 1st
        [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0],  # label 4 ranks 5th
        [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0],  # label 6 ranks 7th
        [1.0, 2.0, 9.0, 0.0, 0.0, 0.0, 0.0],  # label 1 ranks 2nd
    ]
)
LABELS = torch.tensor([0, 4, 6, 1])


def test_zeroshot_accuracy_top1_and_top5_on_a_known_case():
    top1, top5 = ZeroShotAccuracy(top_k=1), ZeroShotAccuracy(top_k=5)
    for metric in (top1, top5):
        metric.update(LOGITS[:2], LABELS[:2])
        metric.update(LOGITS[2:], LABELS[2:])
    assert float(top1.compute()) == pytest.approx(1 / 4)
    assert float(top5.compute()) == pytest.approx(3 / 4)


def test_zeroshot_top_k_is_clamped_to_the_number_of_classes():
    metric = ZeroShotAccuracy(top_k=5)
    metric.update(LOGITS[:, :3], torch.tensor([2, 1, 0, 0]))  # 3 classes: top-5 = top-3
    assert float(metric.compute()) == 1.0


def test_zeroshot_accuracy_counts_repeated_keys_once_and_rejects_foreign_labels():
    metric = ZeroShotAccuracy(top_k=1)
    metric.update(LOGITS, LABELS, key_ids(["a", "b", "c", "d"]))
    metric.update(LOGITS[:1], LABELS[:1], key_ids(["a"]))  # a repeat would raise it to 2/5
    assert float(metric.compute()) == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\)"):
        metric.update(LOGITS, torch.tensor([0, 1, 2, 7]))
    assert torch.isnan(ZeroShotAccuracy().compute())


def test_key_ids_are_stable_non_negative_and_distinct():
    ids = key_ids(["uid0", "uid1", "uid0"])
    assert ids.dtype == torch.int64 and bool((ids >= 0).all())
    assert ids[0] == ids[2] != ids[1]
    assert torch.equal(ids, key_ids(["uid0", "uid1", "uid0"]))


# ------------------------------------------------------------------------------------------------
# Zero-shot task and classifier
# ------------------------------------------------------------------------------------------------


def test_templates_default_to_open_clips_simple_set_as_format_strings(tmp_path: Path):
    task = ZeroShotTask.create(["cat", "dog"])
    assert [t.format("cat") for t in task.templates] == [
        t("cat") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES
    ]
    assert len(ZeroShotTask.create(["cat"], "openai").templates) == 80
    path = tmp_path / "classnames.json"
    path.write_text(json.dumps({"classnames": ["cat"], "templates": ["a {}.", "art of a {}."]}))
    assert ZeroShotTask.create(["cat"], str(path)).templates == ("a {}.", "art of a {}.")
    with pytest.raises(ValueError, match="no '{}'"):
        ZeroShotTask.create(["cat"], ["a photo"])
    with pytest.raises(ValueError, match="templates='imagenet'"):
        ZeroShotTask.create(["cat"], "imagenet")


def test_zeroshot_classifier_is_open_clips_cached_in_eval_and_rebuilt_after_train(monkeypatch):
    seed_all(0)
    model = ComposerCLIP("cabs-tiny-clip")
    model.add_zeroshot_task("zeroshot", ["sandal", "digit nine", "coat"], ["a photo of a {}."])
    builds = []
    build = open_clip.build_zero_shot_classifier

    def counting(*args, **kwargs):
        builds.append(1)
        return build(*args, **kwargs)

    monkeypatch.setattr(open_clip, "build_zero_shot_classifier", counting)
    model.eval()
    first = model.zeroshot_classifier("zeroshot")
    assert model.zeroshot_classifier("zeroshot") is first and len(builds) == 1
    direct = build(
        model.clip,
        open_clip.get_tokenizer("cabs-tiny-clip"),
        ["sandal", "digit nine", "coat"],
        ["a photo of a {}."],
    )
    torch.testing.assert_close(first, direct)
    assert first.shape == (64, 3) and first.dtype == torch.float32

    model.train()  # the weights may change from here on
    with torch.no_grad():
        model.clip.token_embedding.weight.mul_(1.5)
        model.clip.text_projection.add_(0.1)
    model.eval()
    second = model.zeroshot_classifier("zeroshot")
    assert len(builds) == 2 and second is not first
    assert not torch.allclose(first, second)
    model.train()
    model.zeroshot_classifier("zeroshot")
    model.zeroshot_classifier("zeroshot")
    assert len(builds) == 4  # in train mode nothing is cached


def test_update_metric_explains_a_metric_given_the_wrong_kind_of_batch():
    model = ComposerCLIP("cabs-tiny-clip")
    outputs = {"image_features": torch.randn(2, 64), "text_features": torch.randn(2, 64)}
    with pytest.raises(ValueError, match="metric_names"):
        model.update_metric({"keys": ["a", "b"]}, outputs, ZeroShotAccuracy())


# ------------------------------------------------------------------------------------------------
# Loaders and evaluators
# ------------------------------------------------------------------------------------------------


def test_zeroshot_batches_follow_the_contract_with_the_first_concept_as_label(eval_sets):
    seed_all(0)
    model = ComposerCLIP("cabs-tiny-clip")
    evaluator = build_zeroshot_evaluator(
        model, local=eval_sets["classification"], label="zs", batch_size=6
    )
    names = Vocabulary.load(eval_sets["classification"]).names
    assert model.zeroshot_tasks["zs"].classnames == tuple(names)
    dataset = evaluator.dataloader.dataloader.dataset
    batch = next(iter(evaluator.dataloader.dataloader))
    assert set(batch) == {"images", "labels", "keys", "task"} and batch["task"] == "zs"
    assert batch["images"].shape == (6, 3, 64, 64) and batch["images"].dtype == torch.float32
    assert batch["labels"].dtype == torch.int64
    expected = {dataset[i]["key"]: int(dataset[i]["concepts"][0]) for i in range(6)}
    assert dict(zip(batch["keys"], batch["labels"].tolist(), strict=True)) == expected
    # single-item images whose caption is the class name
    assert all(dataset[i]["caption"] == names[expected[dataset[i]["key"]]] for i in range(6))


def test_retrieval_batches_follow_the_contract_with_tokenized_captions(eval_sets):
    model = ComposerCLIP("cabs-tiny-clip")
    evaluator = build_retrieval_evaluator(model, local=eval_sets["retrieval"], batch_size=5)
    batch = next(iter(evaluator.dataloader.dataloader))
    assert set(batch) == {"images", "text", "keys"}
    assert batch["images"].shape == (5, 3, 64, 64)
    dataset = evaluator.dataloader.dataloader.dataset
    captions = [dataset[i]["caption"] for i in range(5)]
    assert torch.equal(batch["text"], model.tokenizer(captions))
    assert batch["text"].shape == (5, model.context_length)


def test_a_classification_sample_without_concepts_is_named():
    collate = ZeroShotCollator(decoder=None, task="zs", num_classes=3)  # fails before decoding
    with pytest.raises(ValueError, match="'uid7' has no concept id"):
        collate([{"key": "uid7", "image": b"", "concepts": np.zeros(0, np.int32)}])
    with pytest.raises(ValueError, match="'uid8' has label 5"):
        collate([{"key": "uid8", "image": b"", "concepts": np.array([5], np.int32)}])


def _config(eval_sets: dict[str, str], **extra) -> dict:
    return {
        "zeroshot": {"local": eval_sets["classification"], "batch_size": 50, **extra},
        "retrieval": {"local": eval_sets["retrieval"], "batch_size": 50},
        "num_workers": 1,
    }


def test_evaluators_on_the_sample_log_every_metric_in_the_unit_interval(eval_sets):
    seed_all(0)
    model = ComposerCLIP("cabs-tiny-clip")
    evaluators = build_evaluators(model, _config(eval_sets))
    assert [e.label for e in evaluators] == ["zeroshot", "retrieval"]
    logger = InMemoryLogger()
    trainer = Trainer(model=model, loggers=[logger], device="cpu", progress_bar=False)
    trainer.eval(eval_dataloader=evaluators)
    logged = {k: float(v) for k, v in logger.most_recent_values.items() if k.startswith("metrics/")}
    expected = [f"metrics/zeroshot/{n}" for n in ZEROSHOT_METRICS]
    expected += [f"metrics/retrieval/{n}" for n in RETRIEVAL_METRICS]
    assert sorted(logged) == sorted(expected)
    assert all(0.0 <= v <= 1.0 for v in logged.values()), logged
    assert logged["metrics/zeroshot/top1_accuracy"] <= logged["metrics/zeroshot/top5_accuracy"]


def test_fit_evaluates_at_the_interval_and_at_the_end_with_one_classifier_per_pass(
    eval_sets, monkeypatch
):
    seed_all(0)
    model = ComposerCLIP("cabs-tiny-clip")
    evaluators = build_evaluators(model, _config(eval_sets, subset_num_batches=1))
    builds = []
    build = open_clip.build_zero_shot_classifier
    monkeypatch.setattr(
        open_clip, "build_zero_shot_classifier", lambda *a, **k: builds.append(1) or build(*a, **k)
    )
    train = next(iter(evaluators[1].dataloader.dataloader))  # the sample's first 50 pairs
    assert len(train["keys"]) == 50
    batches = [{k: v[i : i + 6] for k, v in train.items()} for i in range(0, 18, 6)]
    logger = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=DataSpec(batches, get_num_samples_in_batch=num_samples_in_batch),
        eval_dataloader=evaluators,
        eval_interval="2ba",
        eval_subset_num_batches=1,
        max_duration="3ba",
        optimizers=torch.optim.AdamW(model.param_groups(0.1), lr=1e-3),
        device_train_microbatch_size=6,
        loggers=[logger],
        device="cpu",
        progress_bar=False,
    )
    trainer.fit()
    steps = [int(t.batch) for t, _ in logger.data["metrics/zeroshot/top1_accuracy"]]
    assert steps == [2, 3]  # at the interval, then at the end (3 is not a multiple of 2)
    assert len(logger.data["metrics/retrieval/mean_recall"]) == 2
    assert len(builds) == 2  # once per evaluation pass, never per batch
    assert model.training and not model._classifiers  # dropped on the way back to training


def test_build_evaluators_takes_objects_skips_none_and_names_bad_options(eval_sets):
    model = ComposerCLIP("cabs-tiny-clip")
    config = SimpleNamespace(
        zeroshot=None, retrieval={"local": eval_sets["retrieval"]}, num_workers=0
    )
    assert [e.label for e in build_evaluators(model, config)] == ["retrieval"]
    with pytest.raises(TypeError, match="eval_data.zeroshot: .*build_zeroshot_evaluator"):
        build_evaluators(model, {"zeroshot": {"local": eval_sets["classification"], "bogus": 1}})
    with pytest.raises(ValueError, match="eval_data.retrieval needs 'local'"):
        build_evaluators(model, {"retrieval": {"batch_size": 4}})


# ------------------------------------------------------------------------------------------------
# Two ranks (real composer launcher, gloo)
# ------------------------------------------------------------------------------------------------

DIST_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from composer.utils import dist, get_device
    from composer.utils.reproducibility import seed_all
    from torchmetrics.utilities.data import dim_zero_cat
    from cabs_streaming.evaluation import build_evaluators
    from cabs_streaming.model import ComposerCLIP

    config, out = json.loads(sys.argv[1]), sys.argv[2]
    dist.initialize_dist(get_device("cpu"))
    seed_all(0)
    model = ComposerCLIP("cabs-tiny-clip")
    evaluators = build_evaluators(model, config)
    logger = InMemoryLogger()
    trainer = Trainer(model=model, loggers=[logger], device="cpu", progress_bar=False)
    trainer.eval(eval_dataloader=evaluators)
    logged = logger.most_recent_values.items()
    metrics = {k: float(v) for k, v in logged if k.startswith("metrics/")}
    seen = {
        label: len(dim_zero_cat(next(iter(trainer.state.eval_metrics[label].values())).ids))
        for label in ("zeroshot", "retrieval")
    }
    every = dist.all_gather_object(seen)
    if dist.get_global_rank() == 0:
        with open(out, "w") as f:
            json.dump({"metrics": metrics, "seen": every}, f)
    """
)


@pytest.mark.slow
def test_two_ranks_evaluate_an_odd_sized_set_exactly_like_one_process(tmp_path, odd_eval_sets):
    config = {
        "zeroshot": {"local": odd_eval_sets["classification"], "batch_size": 8},
        "retrieval": {"local": odd_eval_sets["retrieval"], "batch_size": 8},
    }
    composer = shutil.which("composer", path=str(Path(sys.executable).parent))
    assert composer, "the composer launcher is missing from the environment"
    script = tmp_path / "dist_eval.py"
    script.write_text(DIST_SCRIPT)
    out = tmp_path / "result.json"
    command = [
        composer, "-n", "2", "--master_port", str(free_port()),
        "--stdout", str(tmp_path / "o{rank}"), "--stderr", str(tmp_path / "e{rank}"),
        str(script), json.dumps(config), str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("e*")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-3000:]
    result = json.loads(out.read_text())

    seed_all(0)
    model = ComposerCLIP("cabs-tiny-clip")
    logger = InMemoryLogger()
    trainer = Trainer(model=model, loggers=[logger], device="cpu", progress_bar=False)
    trainer.eval(eval_dataloader=build_evaluators(model, config))
    single = {k: float(v) for k, v in logger.most_recent_values.items() if k.startswith("metrics/")}

    sizes = {
        k: StreamingDataset(local=v, batch_size=1).num_samples for k, v in odd_eval_sets.items()
    }
    # Streaming gave both ranks the same count, repeating a sample: the metrics dropped it.
    for label, kind in (("zeroshot", "classification"), ("retrieval", "retrieval")):
        assert sum(seen[label] for seen in result["seen"]) == sizes[kind] + 1
    assert sorted(result["metrics"]) == sorted(single)
    for name, value in single.items():
        assert result["metrics"][name] == pytest.approx(value, abs=1e-6), name
