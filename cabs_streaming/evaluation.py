"""Zero-shot classification and image-text retrieval evaluators: the loaders and the model.

Evaluation has no selection step, so unlike training the eval loaders decode images in their
DataLoader workers (``ImageDecoder`` with the model's eval transform) and hand the model finished
batches:

- zero-shot classification: ``{"images": float32 [n, 3, H, W], "labels": int64 [n],
  "keys": list[str], "task": str}``; a sample's label is its first concept id and the class
  names are the dataset's vocabulary (``ConceptStreamingDataset.vocabulary.names``);
- retrieval: ``{"images": float32 [n, 3, H, W], "text": int64 [n, context_length],
  "keys": list[str]}``, one caption per image.

The evaluators log the metrics of :mod:`cabs_streaming.metrics` (``ComposerCLIP.get_metrics``).

**When evaluation runs** is Trainer configuration: ``Trainer(eval_dataloader=evaluators,
eval_interval="1000ba")`` (or ``"1ep"``, or a per-``Evaluator`` ``eval_interval``) evaluates at
that interval and also at the end of training when the interval does not divide the duration
(Composer adds ``Event.FIT_END``); ``trainer.eval()`` evaluates on demand.
``eval_subset_num_batches`` caps the batches per pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from composer.core import DataSpec, Evaluator
from torch.utils.data import DataLoader

from cabs_streaming.dataset import CaptionTokenizer, ConceptStreamingDataset, num_samples_in_batch
from cabs_streaming.decode import ImageDecoder, default_num_threads
from cabs_streaming.metrics import RETRIEVAL_METRICS, ZEROSHOT_METRICS
from cabs_streaming.model import ComposerCLIP

__all__ = [
    "RetrievalCollator",
    "ZeroShotCollator",
    "build_evaluators",
    "build_retrieval_evaluator",
    "build_zeroshot_evaluator",
    "split_eval_batch",
]

# --------------------------------------------------------------------------------------------
# Loaders and evaluators
# --------------------------------------------------------------------------------------------


class ZeroShotCollator:
    """Decode and label classification samples in the loader's workers (picklable)."""

    def __init__(self, decoder: ImageDecoder, task: str, num_classes: int) -> None:
        self.decoder = decoder
        self.task = task
        self.num_classes = num_classes

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """``{"images", "labels", "keys", "task"}``; the label is the first concept id."""
        keys = [s["key"] for s in samples]
        labels = []
        for s in samples:
            concepts = s["concepts"]
            if len(concepts) == 0:
                raise ValueError(
                    f"classification sample {s['key']!r} has no concept id; its label is its "
                    "first concept, so every sample of a zero-shot set needs one"
                )
            label = int(concepts[0])
            if not 0 <= label < self.num_classes:
                raise ValueError(
                    f"classification sample {s['key']!r} has label {label}, outside the "
                    f"{self.num_classes} classes of the vocabulary"
                )
            labels.append(label)
        return {
            "images": self.decoder([s["image"] for s in samples], keys),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "keys": keys,
            "task": self.task,
        }


class RetrievalCollator:
    """Decode retrieval samples in the loader's workers; captions come tokenized (picklable)."""

    def __init__(self, decoder: ImageDecoder, tokenizer: CaptionTokenizer | None = None) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """``{"images", "text", "keys"}``, one caption per image."""
        keys = [s["key"] for s in samples]
        if samples and "text" in samples[0]:
            text = torch.stack([s["text"] for s in samples])
        elif self.tokenizer is not None:
            text = self.tokenizer([s["caption"] for s in samples])
        else:
            raise ValueError("retrieval samples carry no tokens and the collator no tokenizer")
        return {
            "images": self.decoder([s["image"] for s in samples], keys),
            "text": text,
            "keys": keys,
        }


def _decode_threads(num_workers: int, decode_threads: int | None) -> int:
    """Threads per loader process, so that workers x threads stays near the core count."""
    if decode_threads is not None:
        return decode_threads
    return max(1, default_num_threads() // max(1, num_workers))


def _eval_decoder(
    model: ComposerCLIP, num_workers: int, decode_threads: int | None
) -> ImageDecoder:
    """The model's eval transform, with threads shared out over the loader's processes."""
    return model.image_decoder(
        is_train=False, num_threads=_decode_threads(num_workers, decode_threads)
    )


def split_eval_batch(batch: dict[str, Any], microbatch_size: int) -> list[dict[str, Any]]:
    """Split an eval batch into microbatches (``DataSpec.split_batch``).

    Like Composer's default for dicts (tensors and lists sliced, strings repeated), except that
    a batch no larger than ``microbatch_size`` is returned whole without a warning: the last
    batch of every pass is short, and Composer's default warns about it on every evaluation.
    """
    n = num_samples_in_batch(batch)
    if n <= microbatch_size:
        return [batch]
    starts = range(0, n, microbatch_size)
    return [
        {
            k: v[i : i + microbatch_size] if isinstance(v, torch.Tensor | list | tuple) else v
            for k, v in batch.items()
        }
        for i in starts
    ]


def _loader(
    dataset: ConceptStreamingDataset,
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, Any]],
    batch_size: int,
    num_workers: int,
) -> DataSpec:
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=num_workers,
        drop_last=False,
    )
    return DataSpec(
        loader, get_num_samples_in_batch=num_samples_in_batch, split_batch=split_eval_batch
    )


def _exact(names: Sequence[str]) -> list[str]:
    """Composer matches ``metric_names`` as regexes anywhere in a name: anchor them."""
    return [f"^{re.escape(n)}$" for n in names]


def build_zeroshot_evaluator(
    model: ComposerCLIP,
    *,
    local: str,
    remote: str | None = None,
    label: str = "zeroshot",
    templates: str | Sequence[Any] | None = None,
    classnames: Sequence[str] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    decode_threads: int | None = None,
    subset_num_batches: int | None = None,
    eval_interval: int | str | None = None,
    **dataset_kwargs: Any,
) -> Evaluator:
    """A zero-shot classification ``Evaluator`` over an MDS set (``local`` or ``remote``).

    The class names are the set's vocabulary (override with ``classnames``, same order) and a
    sample's label is its first concept id. The task is registered on ``model`` under
    ``label`` (``model.add_zeroshot_task``), so build evaluators before the ``Trainer``.
    ``templates``: ``"simple"`` (default), ``"openai"``, a list of ``"...{}..."`` strings or
    the path of a JSON file with a ``"templates"`` list (see ``ZeroShotTask.create``).
    Logs ``metrics/<label>/top1_accuracy`` and ``metrics/<label>/top5_accuracy``.
    ``dataset_kwargs`` go to ``ConceptStreamingDataset`` (``split``, ``predownload``, ...).
    """
    dataset = ConceptStreamingDataset(
        local=local, remote=remote, batch_size=batch_size, shuffle=False, **dataset_kwargs
    )
    names = list(classnames) if classnames is not None else list(dataset.vocabulary.names)
    if classnames is not None and len(names) != len(dataset.vocabulary):
        raise ValueError(
            f"{len(names)} class names were given for a vocabulary of "
            f"{len(dataset.vocabulary)} concepts ({local if remote is None else remote}); "
            "give one name per concept id, in id order"
        )
    model.add_zeroshot_task(label, names, templates)
    decoder = _eval_decoder(model, num_workers, decode_threads)
    return Evaluator(
        label=label,
        dataloader=_loader(
            dataset, ZeroShotCollator(decoder, label, len(names)), batch_size, num_workers
        ),
        metric_names=_exact(list(ZEROSHOT_METRICS)),
        subset_num_batches=subset_num_batches,
        eval_interval=eval_interval,
    )


def build_retrieval_evaluator(
    model: ComposerCLIP,
    *,
    local: str,
    remote: str | None = None,
    label: str = "retrieval",
    caption: str | float = "caption",
    batch_size: int = 64,
    num_workers: int = 0,
    decode_threads: int | None = None,
    subset_num_batches: int | None = None,
    eval_interval: int | str | None = None,
    **dataset_kwargs: Any,
) -> Evaluator:
    """An image-text retrieval ``Evaluator`` over an MDS set (``local`` or ``remote``).

    Each sample is one image and its caption (``caption`` picks alt-text or recaption, see
    ``ConceptStreamingDataset``), tokenized by the model's tokenizer in the loader. Logs
    ``metrics/<label>/{image_to_text,text_to_image}_recall_at_{1,5}`` and
    ``metrics/<label>/mean_recall``.
    """
    dataset = ConceptStreamingDataset(
        local=local,
        remote=remote,
        batch_size=batch_size,
        shuffle=False,
        caption=caption,
        tokenizer=model.tokenizer,
        **dataset_kwargs,
    )
    decoder = _eval_decoder(model, num_workers, decode_threads)
    return Evaluator(
        label=label,
        dataloader=_loader(dataset, RetrievalCollator(decoder), batch_size, num_workers),
        metric_names=_exact(RETRIEVAL_METRICS),
        subset_num_batches=subset_num_batches,
        eval_interval=eval_interval,
    )


def _section(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def build_evaluators(model: ComposerCLIP, eval_data: Any) -> list[Evaluator]:
    """Evaluators from an ``eval_data`` config (a mapping or an object with these attributes).

    ``zeroshot`` and ``retrieval`` are ``None`` (skipped) or the keyword arguments of
    ``build_zeroshot_evaluator`` / ``build_retrieval_evaluator`` (``local``, ``remote``,
    ``batch_size``, ``templates``, ``label``, ...); ``num_workers`` is the default for both.
    ``interval`` is not read here: pass it to the ``Trainer`` as ``eval_interval``.
    """
    builders = {"zeroshot": build_zeroshot_evaluator, "retrieval": build_retrieval_evaluator}
    num_workers = _section(eval_data, "num_workers", 0) or 0
    evaluators = []
    for name, builder in builders.items():
        section = _section(eval_data, name)
        if section is None:
            continue
        if not isinstance(section, Mapping):
            raise TypeError(f"eval_data.{name} must be a mapping of options, got {section!r}")
        options = dict(section)
        options.setdefault("num_workers", num_workers)
        if not options.get("local") and not options.get("remote"):
            raise ValueError(f"eval_data.{name} needs 'local' (and optionally 'remote')")
        if not options.get("local"):
            raise ValueError(
                f"eval_data.{name} has remote={options['remote']!r} but no 'local' cache "
                "directory; give each eval set its own local directory"
            )
        try:
            evaluators.append(builder(model, **options))
        except TypeError as err:
            if "unexpected keyword" not in str(err):
                raise
            raise TypeError(
                f"eval_data.{name}: {err}; valid options are those of {builder.__name__} and "
                "ConceptStreamingDataset"
            ) from err
    labels = [e.label for e in evaluators]
    if len(set(labels)) != len(labels):
        raise ValueError(f"evaluator labels must be unique, got {labels}")
    return evaluators
