"""``ComposerCLIP``: any open_clip architecture as a Composer model, with CLIP or SigLIP loss.

This is the model stage of docs/design.md#the-data-flow. It takes the batches the CABS algorithm
leaves in ``state.batch`` and the evaluation batches built by ``cabs_streaming.evaluation``:

- training: ``{"images": float32 [k, 3, H, W], "text": int64 [k, context_length],
  "keys": list[str]}`` (images already normalised by ``ImageDecoder``);
- zero-shot classification: ``{"images", "labels": int64 [n], "keys", "task": str}``;
- retrieval: ``{"images", "text": int64 [n, context_length], "keys"}``, one caption per image.

Everything model-specific comes from open_clip: the architecture (``open_clip.create_model``),
the tokenizer (``open_clip.get_tokenizer``), the preprocessing (``get_model_preprocess_cfg``),
the losses (``ClipLoss`` / ``SigLipLoss``) and the zero-shot classifier
(``build_zero_shot_classifier``). Nothing is ever downloaded: architectures are built with random
weights unless ``pretrained`` names a local checkpoint file.

Two small architectures ship in ``cabs_streaming/model_configs`` and are registered with
``open_clip.add_model_config`` when this module is imported: ``cabs-tiny-clip`` and
``cabs-tiny-sigmoid`` (64 px ViT, 2 layers, 49408-token BPE text tower, context 32). The second
initialises ``logit_scale = log 10`` and ``logit_bias = -10`` as open_clip's SigLIP recipe does.
It is not called ``...-siglip`` on purpose: ``open_clip.get_tokenizer`` gives any registered
name containing "siglip" that has no ``hf_tokenizer_name`` the SentencePiece ``SigLipTokenizer``,
which must be downloaded; our tiny towers use the offline BPE ``SimpleTokenizer``.

**SigLIP across ranks.** ``SigLipLoss`` has four ways to meet the other ranks' text features:
``bidir`` and ``shift`` (point-to-point ``batch_isend_irecv``), ``reduce`` (``all_reduce``) and
``gather`` (``all_gather``). With torch 2.7.0 all four run on gloo on CPU and give the same loss
and gradients (checked with 2, 3 and 4 processes). We default to ``gather``: it is one
``torch.distributed.nn.all_gather`` (the same autograd-aware collective ``ClipLoss`` uses with
``gather_with_grad=True``), so it needs nothing beyond what CLIP training already needs on any
backend, whereas NCCL point-to-point wants a current CUDA device set before the first exchange
and serialises the ring into ``world - 1`` rounds. The features gathered are ``[k, embed_dim]``
per rank, small next to the gradient all-reduce, so the memory of holding all of them is no
concern. Pass ``siglip_dist_impl="bidir"`` for open_clip's own default.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

import open_clip
import torch
from composer.models import ComposerModel
from composer.utils import dist
from open_clip.loss import ClipLoss, SigLipLoss
from torchmetrics import Metric

from cabs_streaming.choices import LOSSES
from cabs_streaming.dataset import CaptionTokenizer
from cabs_streaming.decode import ImageDecoder
from cabs_streaming.metrics import (
    RETRIEVAL_METRICS,
    ZEROSHOT_METRICS,
    ImageTextRetrievalScore,
    ZeroShotAccuracy,
    ZeroShotTask,
    key_ids,
)

__all__ = [
    "LOSSES",
    "MODEL_CONFIG_DIR",
    "SIGLIP_DIST_IMPLS",
    "ComposerCLIP",
    "register_model_configs",
]

log = logging.getLogger(__name__)

#: ``SigLipLoss`` distributed implementations (see the module docs for the default).
SIGLIP_DIST_IMPLS = ("gather", "bidir", "shift", "reduce")
#: Folder of the architectures shipped with the package (package data).
MODEL_CONFIG_DIR = resources.files("cabs_streaming") / "model_configs"

#: open_clip_train's SigLIP initialisation (``main.py``, ``--siglip``), used when a SigLIP loss
#: is asked of an architecture whose config has no ``init_logit_bias``.
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0


def register_model_configs() -> None:
    """Register the shipped architectures with open_clip (idempotent; done on import).

    open_clip rescans every registered path on each call, so registering twice would only cost
    time; we skip it when our names are already known.
    """
    if "cabs-tiny-clip" in open_clip.list_models():
        return
    open_clip.add_model_config(str(MODEL_CONFIG_DIR))


register_model_configs()


class _DropRandomInitWarning(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded" record (logged on the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _quiet_random_init(expected: bool) -> Iterator[None]:
    """Silence open_clip's warning that a model starts from random weights when that is the plan.

    ``pretrained=None`` asks for random weights (every recipe here trains from scratch), so the
    warning would only alarm; with ``pretrained`` set, a failure to load stays loud.
    """
    if not expected:
        yield
        return
    dropper = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(dropper)
    try:
        yield
    finally:
        root.removeFilter(dropper)


def _check_offline(model_name: str, pretrained: str | None) -> None:
    """Refuse anything that would make open_clip download weights; say what to do instead."""
    if model_name.startswith("hf-hub:"):
        raise ValueError(
            f"model {model_name!r} would be downloaded from the Hugging Face Hub, and this "
            "package never downloads weights: download the repository yourself and pass "
            "'local-dir:/path/to/it' (a folder with open_clip_config.json and the weights)"
        )
    if pretrained and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        hint = (
            f" ({pretrained!r} is an open_clip tag for {model_name}; fetch it on a machine with "
            "internet access, e.g. open_clip.download_pretrained, and pass the file)"
            if pretrained in tags
            else ""
        )
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is not a local checkpoint file{hint}; this package never "
            "downloads weights: pass the path of a .pt/.bin/.safetensors file, or "
            "pretrained=None to start from random weights"
        )


class ComposerCLIP(ComposerModel):
    """An open_clip CLIP/SigLIP model trained and evaluated through Composer.

    Args:
        model_name: an open_clip architecture (``"ViT-B-32"``, ``"cabs-tiny-clip"``, any name
            ``open_clip.list_models()`` shows, or ``"local-dir:/path"``).
        loss: ``"clip"`` (softmax contrastive, ``ClipLoss``) or ``"siglip"`` (pairwise sigmoid,
            ``SigLipLoss``). For ``"siglip"`` on an architecture without ``init_logit_bias`` the
            model is initialised with open_clip_train's ``logit_scale = log 10``,
            ``logit_bias = -10``.
        pretrained: a LOCAL checkpoint file to start from, or ``None`` (random weights). Tags
            that open_clip would download are refused with an explanation.
        local_loss: ``ClipLoss(local_loss=...)``: each rank computes the loss of its own images
            and texts against all gathered ones (``k x world*k`` logits instead of
            ``world*k x world*k``); with ``gather_with_grad=True`` the gradients equal the full
            loss's, so this only saves memory and time. The logged loss then differs per rank.
        siglip_dist_impl: how ``SigLipLoss`` exchanges text features across ranks; ``"gather"``
            by default (see the module docs).
        max_logit_scale: the learnt temperature is clamped to ``[0, max_logit_scale]`` at the
            start of every training forward, as open_clip_train clamps it after every step
            (``log 100``); ``None`` disables the clamp.
        grad_checkpointing: activation checkpointing in both towers (memory for compute).
        context_length: override the text context length (``force_context_length``).
        **create_kwargs: passed to ``open_clip.create_model`` (``force_image_size``,
            ``force_patch_dropout``, ``force_quick_gelu``, ...).

    Attributes callers rely on: ``clip`` (the open_clip model), ``tokenizer`` (a picklable,
    lazily built ``CaptionTokenizer`` for this architecture, ``list[str] -> LongTensor``),
    ``context_length``, ``preprocess_cfg`` and ``image_decoder(is_train=...)``.

    Example::

        model = ComposerCLIP("cabs-tiny-clip", loss="clip")
        trainer = Trainer(model=model, train_dataloader=..., max_duration="1ep",
                          algorithms=[ConceptAwareBatchSampling(...)],
                          eval_dataloader=build_evaluators(model, {...}), eval_interval="500ba")
    """

    def __init__(
        self,
        model_name: str,
        *,
        loss: str = "clip",
        pretrained: str | None = None,
        local_loss: bool = True,
        siglip_dist_impl: str = "gather",
        max_logit_scale: float | None = math.log(100.0),
        grad_checkpointing: bool = False,
        context_length: int | None = None,
        **create_kwargs: Any,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is not one of {LOSSES}")
        if siglip_dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(
                f"siglip_dist_impl={siglip_dist_impl!r} is not one of {SIGLIP_DIST_IMPLS}"
            )
        _check_offline(model_name, pretrained)
        config = open_clip.get_model_config(model_name) if ":" not in model_name else {}
        if config is None:
            raise ValueError(
                f"unknown open_clip model {model_name!r}: choose one of open_clip.list_models() "
                "(this package adds cabs-tiny-clip and cabs-tiny-sigmoid) or register a config "
                "with open_clip.add_model_config"
            )
        if loss == "siglip" and "init_logit_bias" not in config:
            create_kwargs.setdefault("init_logit_scale", SIGLIP_INIT_LOGIT_SCALE)
            create_kwargs.setdefault("init_logit_bias", SIGLIP_INIT_LOGIT_BIAS)

        self.model_name = model_name
        self.loss_name = loss
        self.local_loss = local_loss
        self.siglip_dist_impl = siglip_dist_impl
        self.max_logit_scale = max_logit_scale
        with _quiet_random_init(expected=pretrained is None):
            self.clip: torch.nn.Module = open_clip.create_model(
                model_name,
                pretrained=pretrained,
                pretrained_image=False,  # timm / HF tower weights would be downloaded
                pretrained_text=False,
                force_context_length=context_length,
                output_dict=True,
                **create_kwargs,
            )
        if loss == "siglip" and getattr(self.clip, "logit_bias", None) is None:
            raise ValueError(
                f"{model_name} has no logit_bias, which SigLipLoss needs; pass "
                "init_logit_bias=-10 or use an architecture configured for SigLIP"
            )
        if grad_checkpointing:
            self.clip.set_grad_checkpointing(True)
        self.context_length = int(
            getattr(self.clip, "context_length", None)
            or open_clip.get_model_tokenize_cfg(self.clip).get("context_length")
        )
        self.tokenizer = CaptionTokenizer(model_name, context_length=self.context_length)
        # Plain dicts, not modules or buffers: nothing here belongs in a checkpoint.
        self._loss_fns: dict[tuple[int, int], torch.nn.Module] = {}
        self.zeroshot_tasks: dict[str, ZeroShotTask] = {}
        self._classifiers: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------
    # What the data side needs from the model
    # ----------------------------------------------------------------------------------------

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip's preprocessing of this model (size, mean, std, interpolation, ...)."""
        return dict(open_clip.get_model_preprocess_cfg(self.clip))

    def image_decoder(self, *, is_train: bool, **kwargs: Any) -> ImageDecoder:
        """An ``ImageDecoder`` with this model's preprocessing (``ImageDecoder.from_model``)."""
        return ImageDecoder.from_model(self.clip, is_train=is_train, **kwargs)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups as open_clip_train makes them: no decay on gains, biases, temperature.

        Norm gains, biases, ``logit_scale`` and ``logit_bias`` (every parameter with fewer than
        2 dimensions, or named like a norm or bias) get ``weight_decay=0``; decaying them pulls
        the temperature and normalisation towards zero for no benefit.
        """

        def exclude(name: str, p: torch.nn.Parameter) -> bool:
            return (
                p.ndim < 2
                or "bn" in name
                or "ln" in name
                or "bias" in name
                or "logit_scale" in name
            )

        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
        ]

    # ----------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Encode ``batch["images"]`` and ``batch["text"]``.

        Returns open_clip's output dict: ``image_features`` and ``text_features`` (L2
        normalised, ``[k, embed_dim]``), ``logit_scale`` (already exponentiated) and, for
        SigLIP-style models, ``logit_bias``.
        """
        if self.training and self.max_logit_scale is not None:
            with torch.no_grad():
                self.clip.logit_scale.clamp_(0, self.max_logit_scale)
        return self.clip(image=batch.get("images"), text=batch.get("text"))

    def _loss_fn(self) -> torch.nn.Module:
        """The open_clip loss for the current rank and world size.

        Built on first use rather than in ``__init__``: the model is usually constructed before
        Composer's ``Trainer`` initialises ``torch.distributed``.
        """
        key = (dist.get_global_rank(), dist.get_world_size())
        fn = self._loss_fns.get(key)
        if fn is None:
            rank, world = key
            if self.loss_name == "clip":
                fn = ClipLoss(
                    local_loss=self.local_loss,
                    gather_with_grad=True,
                    cache_labels=True,
                    rank=rank,
                    world_size=world,
                )
            else:
                fn = SigLipLoss(rank=rank, world_size=world, dist_impl=self.siglip_dist_impl)
            self._loss_fns[key] = fn
        return fn

    def loss(self, outputs: dict[str, torch.Tensor], batch: Any, *args: Any, **kwargs: Any):
        """Contrastive (CLIP) or sigmoid (SigLIP) loss over the features of all ranks."""
        fn = self._loss_fn()
        if self.loss_name == "siglip":
            return fn(
                outputs["image_features"],
                outputs["text_features"],
                outputs["logit_scale"],
                outputs["logit_bias"],
            )
        return fn(
            outputs["image_features"],
            outputs["text_features"],
            outputs["logit_scale"],
            outputs.get("logit_bias"),
        )

    def train(self, mode: bool = True) -> ComposerCLIP:
        """Switch mode; going back to training drops the zero-shot classifiers.

        A classifier is the text tower's embedding of the class prompts, so it is only valid for
        the weights it was built with. Composer puts the model in eval mode for every evaluation
        pass and back in train mode afterwards, so each pass builds each classifier once.
        """
        if mode:
            self._classifiers.clear()
        return super().train(mode)

    # ----------------------------------------------------------------------------------------
    # Evaluation
    # ----------------------------------------------------------------------------------------

    def add_zeroshot_task(
        self,
        name: str,
        classnames: Sequence[str],
        templates: str | Sequence[Any] | None = None,
    ) -> ZeroShotTask:
        """Register the class names and prompt templates of a zero-shot classification set.

        ``name`` is the value of the ``"task"`` key of that set's batches (the evaluator label,
        when built by ``cabs_streaming.evaluation``). ``templates`` is ``"simple"`` (open_clip's
        7 ``SIMPLE_IMAGENET_TEMPLATES``, the default), ``"openai"`` (the 80
        ``OPENAI_IMAGENET_TEMPLATES``), a list of ``"...{}..."`` strings or callables, or the
        path of a JSON file with a ``"templates"`` list (``data/sample/classnames.json``).
        """
        task = ZeroShotTask.create(classnames, templates)
        if name in self.zeroshot_tasks and self.zeroshot_tasks[name] != task:
            warnings.warn(
                f"zero-shot task {name!r} is registered again with other classes or templates; "
                "the new definition replaces the old one",
                stacklevel=2,
            )
        self.zeroshot_tasks[name] = task
        self._classifiers.pop(name, None)
        return task

    def _task_name(self, batch: dict[str, Any]) -> str:
        name = batch.get("task")
        if name is None:
            if len(self.zeroshot_tasks) == 1:
                return next(iter(self.zeroshot_tasks))
            raise ValueError(
                "a classification batch has no 'task' key and "
                f"{len(self.zeroshot_tasks)} zero-shot tasks are registered "
                f"({sorted(self.zeroshot_tasks)}); build its loader with "
                "cabs_streaming.evaluation.build_zeroshot_evaluator, or add the key"
            )
        if name not in self.zeroshot_tasks:
            raise KeyError(
                f"zero-shot task {name!r} is not registered (known: {sorted(self.zeroshot_tasks)});"
                " call model.add_zeroshot_task(name, classnames) or build the evaluator with "
                "cabs_streaming.evaluation.build_zeroshot_evaluator(model, ...)"
            )
        return name

    def zeroshot_classifier(self, name: str) -> torch.Tensor:
        """The ``float32 [embed_dim, num_classes]`` classifier of task ``name``.

        Built with ``open_clip.build_zero_shot_classifier`` (mean of the normalised prompt
        embeddings per class, renormalised). In eval mode it is cached until the model goes
        back to ``train()``; in train mode it is built afresh on every call, because the
        weights may change between calls.
        """
        cached = self._classifiers.get(name)
        if cached is not None:
            return cached
        task = self.zeroshot_tasks[name]
        device = next(self.clip.parameters()).device
        classifier = open_clip.build_zero_shot_classifier(
            self.clip,
            tokenizer=self.tokenizer,
            classnames=list(task.classnames),
            templates=list(task.templates),
            num_classes_per_batch=10,
            device=device,
        ).float()
        if not self.training:
            self._classifiers[name] = classifier
        return classifier

    def eval_forward(self, batch: dict[str, Any], outputs: Any | None = None) -> dict[str, Any]:
        """Features for the evaluation metrics.

        Classification batches (with ``labels``) give ``image_features`` and ``logits``
        (``100 * image_features @ classifier``, float32, as open_clip_train computes them);
        retrieval batches (with ``text``) give normalised ``image_features`` and
        ``text_features``.
        """
        if outputs is not None:
            return outputs
        if "labels" in batch:
            name = self._task_name(batch)
            classifier = self.zeroshot_classifier(name)
            image_features = self.clip.encode_image(batch["images"], normalize=True)
            device_type = image_features.device.type
            with torch.autocast(device_type=device_type, enabled=False):
                logits = 100.0 * image_features.float() @ classifier
            return {"image_features": image_features, "logits": logits}
        if "text" in batch:
            return {
                "image_features": self.clip.encode_image(batch["images"], normalize=True),
                "text_features": self.clip.encode_text(batch["text"], normalize=True),
            }
        raise ValueError(
            f"cannot evaluate a batch with keys {sorted(batch)}: classification batches carry "
            "'images' and 'labels', retrieval batches 'images' and 'text'"
        )

    def update_metric(self, batch: dict[str, Any], outputs: dict[str, Any], metric: Metric) -> None:
        """Feed ``metric`` the outputs it measures; samples are identified by their keys.

        The keys let the metrics drop the samples Streaming repeats to give every rank the same
        number (see ``cabs_streaming.metrics``).
        """
        ids = key_ids(batch["keys"]) if "keys" in batch else None
        if isinstance(metric, ZeroShotAccuracy):
            _require(metric, outputs, "logits", "classification")
            metric.update(outputs["logits"], batch["labels"], ids)
        elif isinstance(metric, ImageTextRetrievalScore):
            _require(metric, outputs, "text_features", "retrieval")
            metric.update(outputs["image_features"], outputs["text_features"], ids)
        else:
            raise TypeError(f"ComposerCLIP does not know how to update {type(metric).__name__}")

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        """Evaluation metrics by the name they are logged under (``metrics/<label>/<name>``).

        Training has none: Composer already logs the loss (``loss/train/total``), and nothing
        else about a contrastive batch is worth the extra forward. For evaluation:
        ``top1_accuracy``, ``top5_accuracy`` (zero-shot classification) and
        ``image_to_text_recall_at_1``, ``image_to_text_recall_at_5``,
        ``text_to_image_recall_at_1``, ``text_to_image_recall_at_5``, ``mean_recall``
        (retrieval); each evaluator selects its own with ``metric_names``.
        """
        if is_train:
            return {}
        metrics: dict[str, Metric] = {
            name: ZeroShotAccuracy(top_k=k) for name, k in ZEROSHOT_METRICS.items()
        }
        metrics.update({name: ImageTextRetrievalScore(score=name) for name in RETRIEVAL_METRICS})
        return metrics


def _require(metric: Any, outputs: dict[str, Any], key: str, kind: str) -> None:
    """A metric given the other kind of eval batch: say which metric names go with which."""
    if key not in outputs:
        raise ValueError(
            f"{type(metric).__name__} needs a {kind} batch; give the evaluator metric_names for "
            f"its kind (zero-shot: {list(ZEROSHOT_METRICS)}, retrieval: {list(RETRIEVAL_METRICS)})"
        )
