"""Zero-shot classification and image-text retrieval metrics, and the zero-shot task definition.

These are the leaves of evaluation: ``cabs_streaming.model`` needs them to compute and update
its metrics, and ``cabs_streaming.evaluation`` builds the loaders and evaluators around the
model. Nothing here knows the model, the dataset or Composer.

**Metrics** (what ``ComposerCLIP.get_metrics(False)`` returns, logged by Composer as
``metrics/<evaluator label>/<name>``):

- ``top1_accuracy``, ``top5_accuracy`` (``ZeroShotAccuracy``): the share of images whose label is
  among the ``k`` classes the zero-shot classifier scores highest (``k`` clamped to the number of
  classes), as open_clip_train's ``zero_shot.py`` counts it. The classifier comes from
  ``open_clip.build_zero_shot_classifier`` (see ``ComposerCLIP.zeroshot_classifier``).
- ``image_to_text_recall_at_1``, ``image_to_text_recall_at_5``, ``text_to_image_recall_at_1``,
  ``text_to_image_recall_at_5``, ``mean_recall`` (``ImageTextRetrievalScore``): as
  clip_benchmark's ``zeroshot_retrieval`` computes them. Scores are the cosine similarities of
  L2-normalised embeddings; a query counts as a hit at ``k`` if a positive (the caption of the
  image, the image of the caption) is among its ``k`` best-scored candidates; recall@k is the
  share of hits over all queries. clip_benchmark's ``text_retrieval_recall@k`` is our
  ``image_to_text`` (image queries), its ``image_retrieval_recall@k`` our ``text_to_image``.
  ``mean_recall`` is the mean of the four. Names avoid ``@``, which MLflow rejects.

Both metrics are exact when the eval set is sharded over ranks: they keep per-sample values
(``dist_reduce_fx="cat"``) and compute after gathering, and they drop the samples Streaming
repeats so that every rank draws the same number (``ids``: hashes of the sample keys, first
occurrence kept). A retrieval recall needs every embedding anyway; the five retrieval numbers are
five ``Metric`` objects, each holding the embeddings, because Composer logs one scalar per
metric: ``5 x 2 x N x embed_dim`` float32 on the eval device, about 100 MB for 5,000 pairs at
512 dims. They stay float32 on purpose: rounding to 16 bits reorders near-ties and so changes
recalls.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

__all__ = [
    "DEFAULT_TEMPLATES",
    "RETRIEVAL_KS",
    "RETRIEVAL_METRICS",
    "TEMPLATE_SETS",
    "ZEROSHOT_METRICS",
    "ImageTextRetrieval",
    "ImageTextRetrievalScore",
    "ZeroShotAccuracy",
    "ZeroShotTask",
    "key_ids",
    "retrieval_recalls",
]

#: Zero-shot metric names (as logged) and their ``k``.
ZEROSHOT_METRICS: dict[str, int] = {"top1_accuracy": 1, "top5_accuracy": 5}
#: Retrieval recall ``k`` values; the metric names follow from them.
RETRIEVAL_KS: tuple[int, ...] = (1, 5)
#: Retrieval metric names, as logged.
RETRIEVAL_METRICS: tuple[str, ...] = (
    *(f"image_to_text_recall_at_{k}" for k in RETRIEVAL_KS),
    *(f"text_to_image_recall_at_{k}" for k in RETRIEVAL_KS),
    "mean_recall",
)

#: open_clip's prompt template sets by name.
TEMPLATE_SETS: dict[str, Sequence[Any]] = {
    "simple": open_clip.SIMPLE_IMAGENET_TEMPLATES,
    "openai": open_clip.OPENAI_IMAGENET_TEMPLATES,
}
#: Templates used when none are given: open_clip's 7 ``SIMPLE_IMAGENET_TEMPLATES``.
DEFAULT_TEMPLATES = "simple"

#: Sentinel id of a sample without a key (never deduplicated).
NO_ID = -1
_ID_MASK = (1 << 63) - 1


def key_ids(keys: Sequence[str]) -> torch.Tensor:
    """Stable non-negative int64 ids of sample keys (64-bit BLAKE2b, sign bit cleared).

    Keys are strings, which ``torch.distributed`` cannot gather; their hashes can. Two different
    keys collide with probability about ``N**2 / 2**64``: never, for any eval set.
    """
    return torch.tensor(
        [
            int.from_bytes(hashlib.blake2b(k.encode("utf-8"), digest_size=8).digest(), "little")
            & _ID_MASK
            for k in keys
        ],
        dtype=torch.int64,
    )


def _first_occurrences(ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the first row of each id (rows with ``NO_ID`` are all kept)."""
    n = ids.numel()
    keep = ids == NO_ID
    if n == 0 or bool(keep.all()):
        return torch.ones(n, dtype=torch.bool, device=ids.device)
    unique, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(n, device=ids.device)
    first = torch.full((unique.numel(),), n, dtype=torch.int64, device=ids.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    keep[first] = True
    return keep


def _as_ids(ids: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if ids is None:
        return torch.full((n,), NO_ID, dtype=torch.int64, device=device)
    ids = torch.as_tensor(ids, dtype=torch.int64).to(device)
    if ids.shape != (n,):
        raise ValueError(f"ids must have shape ({n},), got {tuple(ids.shape)}")
    return ids


# --------------------------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------------------------


def _template_string(template: str | Callable[[str], str]) -> str:
    """A template as a ``str.format`` string (open_clip's templates are f-string lambdas).

    Strings keep tasks hashable, comparable, picklable and readable in logs. A callable is
    converted by calling it on ``"{}"`` and accepted only if the result reproduces it.
    """
    if isinstance(template, str):
        if "{}" not in template:
            raise ValueError(
                f"template {template!r} has no '{{}}' where the class name goes "
                "(e.g. 'a photo of a {}.')"
            )
        return template
    if callable(template):
        text = template("{}")
        probe = "probe class"
        if "{}" in text and text.format(probe) == template(probe):
            return text
        raise ValueError(
            f"template {template!r} is a callable that is not a simple f-string; pass its "
            "prompts as 'a photo of a {}.'-style strings"
        )
    raise TypeError(f"a template is a str or a callable, got {type(template).__name__}")


@dataclass(frozen=True)
class ZeroShotTask:
    """The class names and prompt templates one zero-shot classifier is built from."""

    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    @classmethod
    def create(
        cls, classnames: Sequence[str], templates: str | Sequence[Any] | None = None
    ) -> ZeroShotTask:
        """Validate and normalise the class names and templates.

        ``templates`` is a set name (``TEMPLATE_SETS``: ``"simple"``, the default, or
        ``"openai"``), a list of ``"...{}..."`` strings or f-string callables, or the path of a
        local JSON file with a ``"templates"`` list (such as ``data/sample/classnames.json``).
        """
        if templates is None:
            templates = DEFAULT_TEMPLATES
        if isinstance(templates, str) and templates.endswith(".json"):
            with open(templates, encoding="utf-8") as f:
                loaded = json.load(f)
            if not isinstance(loaded, dict) or not isinstance(loaded.get("templates"), list):
                raise ValueError(
                    f'{templates}: expected {{"templates": ["a photo of a {{}}.", ...]}}'
                )
            templates = loaded["templates"]
        elif isinstance(templates, str):
            if templates not in TEMPLATE_SETS:
                raise ValueError(
                    f"templates={templates!r}: name one of {sorted(TEMPLATE_SETS)}, give a list "
                    "of 'a photo of a {}.'-style strings or the path of a JSON file with one"
                )
            templates = TEMPLATE_SETS[templates]
        if not classnames:
            raise ValueError("a zero-shot task needs at least one class name")
        if not templates:
            raise ValueError("a zero-shot task needs at least one template")
        return cls(tuple(str(c) for c in classnames), tuple(_template_string(t) for t in templates))


class ZeroShotAccuracy(Metric):
    """Top-k accuracy of zero-shot logits, exact over ranks and free of Streaming's repeats.

    ``update(logits [n, C], labels [n], ids [n] | None)``; ``compute()`` is the share of unique
    samples whose label is among the ``min(top_k, C)`` highest logits (``nan`` before any
    update). Samples with equal ``ids`` (see ``key_ids``) count once.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, top_k: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = int(top_k)
        self.add_state("hits", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")

    def update(
        self, logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None
    ) -> None:
        """Record which of ``labels`` are within the top ``k`` of ``logits``."""
        if logits.ndim != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"expected logits [n, C] and labels [n], got {tuple(logits.shape)} and "
                f"{tuple(labels.shape)}"
            )
        num_classes = logits.shape[1]
        labels = labels.to(logits.device).long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}) (the classifier's classes), got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        k = min(self.top_k, num_classes)
        top = logits.detach().topk(k, dim=1).indices
        self.hits.append((top == labels[:, None]).any(dim=1))
        self.ids.append(_as_ids(ids, labels.numel(), logits.device))

    def compute(self) -> torch.Tensor:
        """Top-k accuracy over the unique samples seen by all ranks."""
        if isinstance(self.hits, list) and not self.hits:
            return torch.tensor(float("nan"), device=self.device)
        hits = dim_zero_cat(self.hits)
        keep = _first_occurrences(dim_zero_cat(self.ids))
        return hits[keep].float().mean()


# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------


def _hits_at(
    queries: torch.Tensor, candidates: torch.Tensor, ks: Sequence[int], chunk_size: int
) -> dict[int, torch.Tensor]:
    """Per query ``i``: is candidate ``i`` (its positive) among its ``k`` best? For each ``k``."""
    n = candidates.shape[0]
    k_max = min(max(ks), n)
    hits: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, queries.shape[0], chunk_size):
        scores = queries[start : start + chunk_size] @ candidates.T
        top = scores.topk(k_max, dim=1).indices
        target = torch.arange(start, start + scores.shape[0], device=scores.device)[:, None]
        for k in ks:
            hits[k].append((top[:, : min(k, n)] == target).any(dim=1))
    return {k: torch.cat(v) for k, v in hits.items()}


def retrieval_recalls(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ids: torch.Tensor | None = None,
    ks: Sequence[int] = RETRIEVAL_KS,
    chunk_size: int = 1024,
) -> dict[str, torch.Tensor]:
    """Image-to-text and text-to-image recall@k of paired embeddings (clip_benchmark's way).

    Row ``i`` of ``image_features`` and of ``text_features`` are one sample (an image and its
    caption); the embeddings are L2-normalised here. Rows with a repeated id are dropped (first
    kept). Returns ``image_to_text_recall_at_{k}``, ``text_to_image_recall_at_{k}`` for each
    ``k`` (clamped to the number of candidates) and their mean, ``mean_recall``, as 0-d float
    tensors. Memory stays at ``chunk_size x N`` scores.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            f"expected paired features [n, d], got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}"
        )
    n = image_features.shape[0]
    if n == 0:
        raise ValueError("retrieval needs at least one image-text pair")
    keep = _first_occurrences(_as_ids(ids, n, image_features.device))
    images = F.normalize(image_features[keep].float(), dim=-1)
    texts = F.normalize(text_features[keep].float(), dim=-1)
    out: dict[str, torch.Tensor] = {}
    for k, hits in _hits_at(images, texts, ks, chunk_size).items():
        out[f"image_to_text_recall_at_{k}"] = hits.float().mean()
    for k, hits in _hits_at(texts, images, ks, chunk_size).items():
        out[f"text_to_image_recall_at_{k}"] = hits.float().mean()
    out["mean_recall"] = torch.stack(list(out.values())).mean()
    return out


class ImageTextRetrieval(Metric):
    """Accumulates paired image and text embeddings; ``compute()`` gives all recall numbers.

    ``update(image_features [n, d], text_features [n, d], ids [n] | None)``: row ``i`` of both is
    one sample (image and caption). ``compute()`` gathers every rank's rows (``"cat"``), drops
    repeated ids and returns ``retrieval_recalls(...)``: a dict of ``image_to_text_recall_at_k``,
    ``text_to_image_recall_at_k`` and ``mean_recall`` (``nan`` before any update). Use it
    directly outside Composer; Composer logs one scalar per metric, so ``ComposerCLIP`` uses
    ``ImageTextRetrievalScore``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = RETRIEVAL_KS, chunk_size: int = 1024, **kwargs: Any):
        super().__init__(**kwargs)
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive integers, got {ks}")
        self.ks = tuple(int(k) for k in ks)
        self.chunk_size = int(chunk_size)
        self.add_state("image_features", default=[], dist_reduce_fx="cat")
        self.add_state("text_features", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")

    @property
    def score_names(self) -> tuple[str, ...]:
        """Keys of ``compute()``."""
        return (
            *(f"image_to_text_recall_at_{k}" for k in self.ks),
            *(f"text_to_image_recall_at_{k}" for k in self.ks),
            "mean_recall",
        )

    def update(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        ids: torch.Tensor | None = None,
    ) -> None:
        """Store one batch of pairs (normalised, float32)."""
        if image_features.shape != text_features.shape or image_features.ndim != 2:
            raise ValueError(
                f"expected paired features [n, d], got {tuple(image_features.shape)} and "
                f"{tuple(text_features.shape)}: one caption per image"
            )
        self.image_features.append(F.normalize(image_features.detach().float(), dim=-1))
        self.text_features.append(F.normalize(text_features.detach().float(), dim=-1))
        self.ids.append(_as_ids(ids, image_features.shape[0], image_features.device))

    def compute(self) -> dict[str, torch.Tensor]:
        """All recalls over the unique pairs seen by all ranks."""
        if isinstance(self.image_features, list) and not self.image_features:
            nan = torch.tensor(float("nan"), device=self.device)
            return dict.fromkeys(self.score_names, nan)
        return retrieval_recalls(
            dim_zero_cat(self.image_features),
            dim_zero_cat(self.text_features),
            dim_zero_cat(self.ids),
            ks=self.ks,
            chunk_size=self.chunk_size,
        )


class ImageTextRetrievalScore(ImageTextRetrieval):
    """One number of ``ImageTextRetrieval`` (``score``, e.g. ``"mean_recall"``) as a scalar."""

    def __init__(self, score: str = "mean_recall", **kwargs: Any) -> None:
        match = re.fullmatch(r"(?:image_to_text|text_to_image)_recall_at_(\d+)", score)
        if "ks" not in kwargs and match:
            kwargs["ks"] = tuple(sorted({*RETRIEVAL_KS, int(match.group(1))}))
        super().__init__(**kwargs)
        if score not in self.score_names:
            raise ValueError(f"score={score!r} is not one of {self.score_names}")
        self.score = score

    def compute(self) -> torch.Tensor:  # type: ignore[override]
        """The chosen recall over the unique pairs seen by all ranks."""
        return super().compute()[self.score]
