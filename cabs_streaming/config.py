"""The run configuration: YAML plus dotted CLI overrides, validated into dataclasses.

``load_config(path, overrides)`` reads a recipe with omegaconf (so ``${variables.x}``
interpolation works), merges ``key=value`` overrides (``optimizer.lr=1e-4``), resolves it and
builds the dataclasses below. Every section rejects unknown keys with an error that suggests the
closest valid key, so a misspelt key never silently falls back to a default.

Everything a recipe can get wrong is checked here, before the heavy stack (torch, Composer,
open_clip) is imported: ``composer -n 2 train.py`` then fails in about a second with one
``config error`` instead of a traceback after the model is built. This module imports only
omegaconf, the selection policies' registry and batch arithmetic (numpy and numba) and the
shared ``choices``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cabs_streaming.choices import DECODE_ERROR_MODES, LOSSES, check_caption
from cabs_streaming.selection.sizes import check_filter_ratio

__all__ = [
    "ConfigError",
    "RunConfig",
    "format_run_path",
    "load_config",
    "parse_config",
    "build_policy",
    "policy_options",
]

#: Composer's precisions (``composer.core.Precision``) and devices (``composer.devices``).
PRECISIONS = ("fp32", "amp_fp16", "amp_bf16", "amp_fp8")
DEVICES = ("cpu", "gpu", "mps", "tpu", "neuron")
#: Composer's loggers this recipe schema can build, by name (``loggers.<name>: {kwargs}``).
LOGGER_NAMES = ("file", "tensorboard", "wandb", "mlflow")
#: Composer time units (``composer.core.TimeUnit``); ``dur`` is a fraction of the run.
TIME_UNITS = ("ep", "ba", "sp", "tok", "dur", "iter", "sec")
_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)\s*$", re.IGNORECASE)
#: The keys that hold Composer time strings, and the units each accepts.
TIME_KEYS: dict[str, tuple[str, ...]] = {
    "max_duration": ("ep", "ba", "sp", "tok"),
    "save_interval": ("ep", "ba", "sp", "tok", "dur"),
    "eval_data.interval": ("ep", "ba", "sp", "tok", "dur"),
    "scheduler.t_warmup": ("ep", "ba", "sp", "tok", "dur"),
    "console_log_interval": ("ep", "ba", "sp", "tok"),
    "status_interval": ("ba",),
}
#: The placeholders a run's own paths may hold (``./runs/{run_name}/selection.jsonl``).
PATH_PLACEHOLDERS = ("{run_name}", "{run_folder}")


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
    """A registered policy: ``iid``, ``frequency`` (CABS-FM) or ``diversity`` (CABS-DM)."""
    options: dict[str, Any] | None = None
    """Policy options (``concept_cap``, ``official_compat``). Each option goes to the policies
    that have it and is ignored, with a warning, by the others, so ``selection.policy=iid`` works
    on a recipe written for ``diversity``; an option no policy has is an error."""
    schedule: list[dict[str, Any]] | None = None
    """Policies by training time instead of ``policy``: a list of phases ``{until, policy,
    options, ramp}`` (docs/selection.md#schedules). Each phase's options start from
    ``selection.options`` (those its policy declares) and add its own."""
    filters: list[dict[str, Any]] | None = None
    """Tests on numeric per-sample columns, ``{column, min, max, top}`` each, applied to the
    superbatch before the policy (docs/selection.md#filters)."""
    verify_consensus: bool = True
    world_invariant: bool = False
    """Select each global batch from the global superbatch in sample-index order with one quota
    (``world * k``), then give each rank ``k`` of it, moving the fewest samples: the same kept
    batches on any number of ranks, so a run can resume on another world size (README: resume
    on another number of GPUs). Off by default: it moves encoded bytes between ranks."""
    selection_log: str | None = None
    """Rank 0 appends one JSON line per step with every rank's kept keys (``{run_name}`` and
    ``{run_folder}`` are replaced)."""


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
    """The run's name (Composer's): what autoresume finds a run by, and ``{run_name}`` in paths.
    Without one, every run gets a new ``<time>-<adjective>-<noun>`` name."""
    run_folder: str | None = None
    """The folder of this run's own files (``{run_name}`` is replaced): ``run.json`` (whose run
    it is), ``history.jsonl`` (every logged metric, one line per step), ``curves.png`` and
    ``summary.json`` at the end. ``null`` writes none of them."""
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
    """Where checkpoints go, local or ``s3://`` (``{run_name}`` and ``{run_folder}`` are
    replaced). With ``autoresume`` the newest complete checkpoint found here is loaded."""
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
    """Continue the run named ``run_name`` from the newest complete checkpoint in
    ``save_folder`` (a new run when there is none); a finished run says so and exits 0."""
    load_path: str | None = None
    """A checkpoint to start from (weights, optimizer and time), local or ``s3://``."""
    trust_checkpoints: bool = False
    """Checkpoints are pickles, and Composer loads them with ``torch.load(weights_only=False)``,
    which runs any code a crafted file holds. So every checkpoint is first read with torch's
    weights-only unpickler (allowing the few plain types a Composer state holds) and refused if
    it holds anything else; ``true`` skips that check, for files you or someone you trust
    wrote that hold other objects."""
    progress_bar: bool = True
    """Composer's progress bar (rank 0)."""
    log_to_console: bool = False
    """Composer's console logger: every metric of every ``console_log_interval`` (about 20
    lines a step); the default is the progress bar plus a status line every ``status_interval``."""
    console_log_interval: str = "1ba"
    status_interval: str | None = "10ba"
    """How often rank 0 prints one compact status line (step, loss, learning rate, samples/s,
    kept distinct concepts); ``null`` for none."""
    loggers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Composer loggers by name: ``file``, ``tensorboard``, ``wandb``, ``mlflow``."""
    metrics_file: str | None = None
    """Where to write the final evaluation metrics as JSON (rank 0; ``{run_name}`` and
    ``{run_folder}`` are replaced)."""


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
        if not isinstance(value, str) and where in TIME_KEYS:
            raise ConfigError(
                f"{where}={value!r} is not a time: write a number and a unit, e.g. {value}ba "
                f"(steps) or {value}ep (epochs)"
            )
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _suggest(key: str, valid: Sequence[str], prefix: str = "") -> str:
    """``; did you mean 'max_duration'?`` when a valid key is close to a misspelt one."""
    close = difflib.get_close_matches(key, valid, n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""


def _build(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    hints = _field_types(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [str(key) for key in data if key not in hints]
    if unknown:
        prefix = f"{where}." if where else ""
        hints_ = [_suggest(key, valid, prefix) for key in unknown]
        wrong = "; ".join(f"{prefix}{key}{hint}" for key, hint in zip(unknown, hints_, strict=True))
        listing = (
            ""
            if all(hints_)
            else f" (valid keys{' of ' + where if where else ''}: {', '.join(valid)})"
        )
        raise ConfigError(f"unknown config key(s) {wrong}{listing}")
    kwargs = {
        key: _coerce(value, hints[key], f"{where}.{key}" if where else key)
        for key, value in data.items()
    }
    return cls(**kwargs)


def check_time(value: str | None, where: str, units: Sequence[str] = TIME_UNITS) -> None:
    """Raise unless ``value`` is a Composer time string (``8ep``, ``144ba``, ``0.05dur``).

    The rule is ``composer.core.Time.from_timestring``'s: a number and a unit, whole for every
    unit but ``dur``; checked here so that a typo fails before Composer is imported.
    """
    if value is None:
        return
    match = _TIME.match(value)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in units:
        raise ConfigError(
            f"{where}={value!r} is not a time: write a number and one of the units "
            f"{', '.join(units)} (e.g. 144ba for 144 steps, 8ep for 8 epochs)"
        )
    number = float(match.group(1))
    if unit != "dur" and number != int(number):
        raise ConfigError(f"{where}={value!r}: {unit} counts must be whole numbers")


def policy_options(selection: SelectionConfig) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The chosen policy's options, and the options left to other policies (name -> policies).

    The rule that makes ``selection.policy=frequency`` work on a recipe with CABS-DM's
    ``concept_cap``: every option goes to the policies that declare it, the chosen one takes
    its own and ignores the rest. An option no registered policy declares is a misspelling and
    raises ``ConfigError``, as does a value the chosen policy refuses.
    """
    from cabs_streaming.selection import POLICIES

    if selection.policy not in POLICIES:
        raise ConfigError(
            f"selection.policy={selection.policy!r} is not a policy"
            f"{_suggest(selection.policy, list(POLICIES))} (policies: {', '.join(POLICIES)})"
        )
    declared = {name: cls.option_names() for name, cls in POLICIES.items()}
    every_option = sorted({option for names in declared.values() for option in names})
    mine: dict[str, Any] = {}
    others: dict[str, list[str]] = {}
    for key, value in (selection.options or {}).items():
        if key in declared[selection.policy]:
            mine[key] = value
            continue
        owners = [name for name, names in declared.items() if key in names]
        if not owners:
            raise ConfigError(
                f"unknown option selection.options.{key}{_suggest(key, every_option)} (options: "
                + "; ".join(f"{n}: {', '.join(o) or 'none'}" for n, o in declared.items())
                + ")"
            )
        others[key] = owners
    try:
        POLICIES[selection.policy].from_options(mine)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"selection.options for policy {selection.policy!r}: {err}") from None
    return mine, others


def build_policy(selection: SelectionConfig) -> Any:
    """The run's ``SelectionPolicy``: the policy, or the schedule, wrapped in the filters.

    Not yet bound to the dataset's facts (``policy.bind``) nor resolved to the run's length
    (``policy.resolve``); errors are ``ConfigError`` naming the key.
    """
    from cabs_streaming.selection import POLICIES, Filter, Filtered, Schedule, get_policy

    mine, _ = policy_options(selection)
    shared = dict(selection.options or {})
    try:
        if selection.schedule:

            def build(name: str, options: Mapping[str, Any]) -> Any:
                if name not in POLICIES:
                    raise ValueError(
                        f"policy {name!r} is not a policy{_suggest(name, list(POLICIES))} "
                        f"(policies: {', '.join(POLICIES)})"
                    )
                declared = POLICIES[name].option_names()
                inherited = {key: value for key, value in shared.items() if key in declared}
                return get_policy(name, {**inherited, **dict(options)})

            policy = Schedule.from_config(selection.schedule, build)
        else:
            policy = get_policy(selection.policy, mine)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"selection.schedule: {err}") from None
    if selection.filters:
        try:
            filters = tuple(Filter.from_config(entry) for entry in selection.filters)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"selection.filters: {err}") from None
        policy = Filtered(policy, filters)
    return policy


def format_run_path(path: str | None, run_name: str, run_folder: str | None) -> str | None:
    """``path`` with ``{run_name}`` and ``{run_folder}`` replaced; other ``{...}`` stay.

    Composer fills its own placeholders (``{rank}``, ``{epoch}``) in checkpoint names later, so
    only ours are replaced, literally, rather than with ``str.format``.
    """
    if path is None:
        return None
    path = path.replace("{run_name}", run_name)
    if "{run_folder}" in path:
        if run_folder is None:
            raise ConfigError(f"{path!r} uses {{run_folder}}, but run_folder is not set")
        path = path.replace("{run_folder}", format_run_path(run_folder, run_name, None) or "")
    return path


def _check_numbers(config: RunConfig) -> None:
    try:
        check_filter_ratio(config.filter_ratio)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if config.global_train_batch_size < 1:
        raise ConfigError("global_train_batch_size must be positive")
    opt = config.optimizer
    if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
        raise ConfigError(
            f"optimizer.betas must be two numbers in [0, 1) (AdamW's beta1, beta2), got "
            f"{opt.betas}; e.g. optimizer.betas=[0.9,0.98]"
        )
    if opt.lr <= 0 or opt.eps <= 0 or opt.weight_decay < 0:
        raise ConfigError(
            f"optimizer.lr and optimizer.eps must be > 0 and optimizer.weight_decay >= 0, got "
            f"lr={opt.lr}, eps={opt.eps}, weight_decay={opt.weight_decay}"
        )
    if not 0.0 <= config.scheduler.alpha_f <= 1.0:
        raise ConfigError(f"scheduler.alpha_f must lie in [0, 1], got {config.scheduler.alpha_f}")
    data = config.train_data
    if data.num_workers < 0 or config.eval_data.num_workers < 0:
        raise ConfigError("train_data.num_workers and eval_data.num_workers must be >= 0")
    if config.decode.threads is not None and config.decode.threads < 1:
        raise ConfigError(f"decode.threads must be >= 1 or null, got {config.decode.threads}")
    if config.save_upload_attempts < 1 or config.save_latest_poll_s <= 0:
        raise ConfigError("save_upload_attempts must be >= 1 and save_latest_poll_s > 0")


def _check_choices(config: RunConfig) -> None:
    choices: list[tuple[str, Any, Sequence[Any]]] = [
        ("model.loss", config.model.loss, LOSSES),
        ("decode.on_error", config.decode.on_error, DECODE_ERROR_MODES),
        ("precision", config.precision, (None, *PRECISIONS)),
        ("device", config.device, (None, *DEVICES)),
    ]
    for where, value, valid in choices:
        if value not in valid:
            names = [v for v in valid if v is not None]
            raise ConfigError(
                f"{where}={value!r} is not valid{_suggest(str(value), names)} (valid: "
                f"{', '.join(names)})"
            )
    for name in config.loggers:
        if name not in LOGGER_NAMES:
            raise ConfigError(
                f"unknown logger loggers.{name}{_suggest(name, LOGGER_NAMES)} (loggers: "
                f"{', '.join(LOGGER_NAMES)})"
            )
    try:
        check_caption(config.train_data.caption)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"train_data.{err}") from None


def _time_values(config: RunConfig) -> dict[str, str | None]:
    return {
        "max_duration": config.max_duration,
        "save_interval": config.save_interval,
        "eval_data.interval": config.eval_data.interval,
        "scheduler.t_warmup": config.scheduler.t_warmup,
        "console_log_interval": config.console_log_interval,
        "status_interval": config.status_interval,
    }


def parse_config(data: Mapping[str, Any]) -> RunConfig:
    """Validate a plain mapping (already resolved) into a ``RunConfig``."""
    config = _build(RunConfig, data)
    _check_numbers(config)
    _check_choices(config)
    for where, value in _time_values(config).items():
        check_time(value, where, TIME_KEYS[where])
    build_policy(config.selection)
    if config.autoresume and (not config.run_name or not config.save_folder):
        raise ConfigError("autoresume needs run_name and save_folder")
    if config.run_folder is not None and "{run_folder}" in config.run_folder:
        raise ConfigError("run_folder cannot contain {run_folder}")
    data_cfg = config.train_data
    if data_cfg.streams is None and data_cfg.local is None and data_cfg.remote is None:
        raise ConfigError("train_data needs local, remote or streams")
    return config


def _is_yaml_error(err: Exception) -> bool:
    """PyYAML's errors (what omegaconf lets through for YAML syntax) carry ``problem``."""
    return hasattr(err, "problem") and hasattr(err, "problem_mark")


def _yaml_error(path: Path, err: Exception) -> ConfigError:
    """A one-line message naming the file, line and column of a YAML mistake."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    return ConfigError(f"{where}: {problem}{f' ({context})' if context else ''}")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML recipe, apply dotted ``key=value`` overrides, resolve and validate it."""
    path = Path(path)
    if path.is_dir():
        recipes = sorted(str(p) for p in path.glob("*.yaml"))[:6]
        raise ConfigError(
            f"{path} is a folder; name a recipe file"
            + (f" such as {', '.join(recipes)}" if recipes else " (e.g. yamls/quickstart.yaml)")
        )
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        base = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    except Exception as err:  # PyYAML's, for a syntax error or a duplicate key
        if not _is_yaml_error(err):
            raise
        raise _yaml_error(path, err) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optimizer.lr=1e-4)")
    for item in overrides:
        try:
            OmegaConf.from_dotlist([item])
        except Exception as err:  # a YAML value PyYAML cannot parse, or a key omegaconf cannot
            if _is_yaml_error(err):
                raise ConfigError(
                    f"override {item!r}: {getattr(err, 'problem', None) or err} (lists are "
                    "written [0.9,0.98], strings with spaces in quotes)"
                ) from None
            raise ConfigError(f"override {item!r}: {err}") from None
    cli = OmegaConf.from_dotlist(list(overrides))
    try:
        merged = OmegaConf.merge(base, cli)
        data = OmegaConf.to_container(merged, resolve=True)
    except Exception as err:  # omegaconf raises its own types for bad interpolations
        raise ConfigError(f"{path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return parse_config(data)
