"""The run configuration: YAML plus dotted CLI overrides, validated into dataclasses.

``load_config(path, overrides)`` reads a recipe with omegaconf (so ``${variables.x}``
interpolation works), merges ``key=value`` overrides (``optimizer.lr=1e-4``), resolves it and
builds the dataclasses below. Every section rejects unknown keys with an error that lists the
valid ones, so a misspelt key never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

__all__ = ["ConfigError", "RunConfig", "load_config", "parse_config"]


#: What ``decode.on_error`` accepts.
DECODE_ERROR_MODES = ("raise", "replace")


class ConfigError(ValueError):
    """A configuration problem, naming the key at fault and what is valid."""


@dataclass
class ModelConfig:
    """The open_clip architecture and its loss."""

    name: str = "cabs-tiny-clip"
    """An open_clip model name (``ViT-B-32``, ``ViT-B-16-SigLIP-256``) or a registered config."""
    loss: str = "clip"
    """``clip`` (contrastive, open_clip ``ClipLoss``) or ``siglip`` (``SigLipLoss``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the model wrapper (e.g. ``local_loss``)."""


@dataclass
class TrainDataConfig:
    """Where the training MDS data lives and how it is read."""

    local: str | None = None
    """Local directory (the data itself, or the cache of ``remote``)."""
    remote: str | None = None
    """``s3://bucket/prefix`` (endpoint from ``S3_ENDPOINT_URL``) or another Streaming remote."""
    caption: str | float = "caption"
    """``caption``, ``recaption`` or the probability of using the recaption."""
    shuffle: bool = True
    num_workers: int = 2
    """DataLoader workers reading bytes and concept ids (decoding happens after selection)."""
    predownload: int | None = None
    cache_limit: str | int | None = None
    validate_hash: str | None = None
    """``sha1``/``xxh64``... : check every shard against index.json (catches corrupt shards)."""
    download_retry: int = 6
    """Attempts per shard download, with back-off 1, 2, 4... s: 6 ride out ~30 s of outage."""
    download_timeout: float = 60.0
    streams: dict[str, dict[str, Any]] | None = None
    """Streaming ``Stream`` kwargs by name, for mixtures (replaces ``local``/``remote``)."""


@dataclass
class EvalDataConfig:
    """The evaluation sets; leave one out by setting it to ``null``."""

    zeroshot: dict[str, Any] | None = None
    """``{local, remote, templates, batch_size}`` for zero-shot classification."""
    retrieval: dict[str, Any] | None = None
    """``{local, remote, batch_size}`` for image-text retrieval."""
    num_workers: int = 0
    interval: str = "1ep"
    """How often to evaluate (Composer time string); also at the end of training."""


@dataclass
class SelectionConfig:
    """The CABS policy (see the README's policy table)."""

    policy: str = "diversity"
    options: dict[str, Any] | None = None
    """Options of the policy (``concept_cap``, ``official_compat``); ``null`` for none (YAML
    merging cannot empty a mapping, so switch policies with ``selection.options=null``)."""
    verify_consensus: bool = True
    selection_log: str | None = None
    """Rank 0 appends one JSON line per step with every rank's kept keys."""


@dataclass
class DecodeConfig:
    """Deferred decoding of the kept images."""

    threads: int | None = None
    draft: bool = True
    draft_margin: float = 1.5
    on_error: str = "raise"
    """A kept image that cannot be decoded: ``raise`` (stop, naming the sample) or ``replace``
    (train on the rank's next unkept sample in the policy's order instead, counted in the logs)."""
    lookahead: bool = True
    """Select step ``t + 1`` and decode its kept images in the background while the model trains
    on step ``t`` (the batches are the same either way); false decodes each step when it is due."""


@dataclass
class OptimizerConfig:
    """AdamW, as open_clip trains CLIP (no weight decay on gains, biases and the logit scale)."""

    lr: float = 5.0e-4
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1.0e-6


@dataclass
class SchedulerConfig:
    """Cosine decay with linear warmup (Composer's ``CosineAnnealingWithWarmupScheduler``)."""

    t_warmup: str = "0.05dur"
    alpha_f: float = 0.0


@dataclass
class RunConfig:
    """Everything a run needs; the YAML recipes mirror this layout."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train_data: TrainDataConfig = field(default_factory=TrainDataConfig)
    eval_data: EvalDataConfig = field(default_factory=EvalDataConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    variables: dict[str, Any] = field(default_factory=dict)
    """Free-form values for ``${variables.x}`` interpolation; not read by the trainer."""
    run_name: str | None = None
    seed: int = 17
    global_train_batch_size: int = 64
    """Kept (trained) samples per step over all ranks."""
    filter_ratio: float = 0.8
    """Share of each superbatch thrown away; superbatch per rank = batch / (world * (1 - f))."""
    device_train_microbatch_size: int | str | None = None
    max_duration: str = "1ep"
    """Composer time string. Samples (``sp``) count DRAWN superbatch samples: prefer ``ba``."""
    precision: str | None = None
    device: str | None = None
    save_folder: str | None = None
    save_interval: str = "1ep"
    save_latest_filename: str | None = "latest-rank{rank}.pt"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    save_upload_attempts: int = 10
    """Attempts per checkpoint upload to a remote save_folder (S3: boto3's exponential back-off
    with jitter, at most 20 s apart; 10 ride out about a minute of outage on average)."""
    save_latest_poll_s: float = 5.0
    """How often to look for a finished remote checkpoint before moving the "latest" pointer
    that autoresume reads (Composer's default is 30 s)."""
    autoresume: bool = False
    load_path: str | None = None
    progress_bar: bool = True
    log_to_console: bool = True
    console_log_interval: str = "1ba"
    loggers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Composer loggers by name: ``file``, ``tensorboard``, ``wandb``, ``mlflow``..."""
    metrics_file: str | None = None
    """Where to write the final evaluation metrics as JSON (rank 0)."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses."""
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{where} may not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}={value!r} has the wrong type ({'; '.join(errors)})")
    if tp is Any:
        return value
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (list, Sequence):
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    hints = _field_types(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in hints]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + str(k) for k in unknown)}; valid keys"
            f"{' of ' + where if where else ''}: {', '.join(valid)}"
        )
    kwargs = {
        key: _coerce(value, hints[key], f"{where}.{key}" if where else key)
        for key, value in data.items()
    }
    return cls(**kwargs)


def parse_config(data: Mapping[str, Any]) -> RunConfig:
    """Validate a plain mapping (already resolved) into a ``RunConfig``."""
    config = _build(RunConfig, data)
    if config.model.loss not in ("clip", "siglip"):
        raise ConfigError(f"model.loss must be 'clip' or 'siglip', got {config.model.loss!r}")
    if not 0.0 <= config.filter_ratio < 1.0:
        raise ConfigError(f"filter_ratio must lie in [0, 1), got {config.filter_ratio}")
    if config.global_train_batch_size < 1:
        raise ConfigError("global_train_batch_size must be positive")
    if config.decode.on_error not in DECODE_ERROR_MODES:
        raise ConfigError(
            f"decode.on_error must be one of {list(DECODE_ERROR_MODES)}, got "
            f"{config.decode.on_error!r}"
        )
    if config.save_upload_attempts < 1 or config.save_latest_poll_s <= 0:
        raise ConfigError("save_upload_attempts must be >= 1 and save_latest_poll_s > 0")
    if config.autoresume and (not config.run_name or not config.save_folder):
        raise ConfigError("autoresume needs run_name and save_folder")
    data_cfg = config.train_data
    if data_cfg.streams is None and data_cfg.local is None and data_cfg.remote is None:
        raise ConfigError("train_data needs local, remote or streams")
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML recipe, apply dotted ``key=value`` overrides, resolve and validate it."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    base = OmegaConf.load(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optimizer.lr=1e-4)")
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
    try:
        data = OmegaConf.to_container(merged, resolve=True)
    except Exception as err:  # omegaconf raises its own types for bad interpolations
        raise ConfigError(f"{path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return parse_config(data)
