"""Build and run a Composer Trainer from a validated recipe: ``composer train.py RECIPE [k=v ...]``.

Start-up runs in the order in which mistakes are cheapest to report:

1. ``main`` reads and validates the recipe (``cabs_streaming.config``) before torch, Composer or
   open_clip are imported, so a misspelt key or a bad value fails in about a second, printed
   once (by local rank 0), with exit status 2.
2. ``build_run`` sets up distributed training (every rank builds its dataset with identical
   arguments and needs its world size for the superbatch), checks the S3 locations, settles the
   run's name and files (``cabs_streaming.runs``: which checkpoint to resume, whether the files
   belong to another run) and checks the checkpoint it will load. Errors here are also exit 2.
3. Then the model (the decoder and the tokenizer come from it), data, the CABS algorithm,
   evaluators, optimiser and the Trainer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from cabs_streaming.config import (
    ConfigError,
    RunConfig,
    build_policy,
    load_config,
    policy_options,
)
from cabs_streaming.runs import Checkpoint, RunPaths
from cabs_streaming.selection import DatasetFacts
from cabs_streaming.selection.sizes import superbatch_per_rank

if TYPE_CHECKING:
    import torch
    from composer import Trainer
    from composer.core import Evaluator
    from composer.optim import CosineAnnealingWithWarmupScheduler

    from cabs_streaming.dataset import ConceptStreamingDataset

__all__ = [
    "Run",
    "build_optimizer",
    "build_run",
    "build_scheduler",
    "build_trainer",
    "main",
    "s3_locations",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


def _loggers() -> dict[str, type]:
    from composer.loggers import FileLogger, MLFlowLogger, TensorboardLogger, WandBLogger

    return {
        "file": FileLogger,
        "tensorboard": TensorboardLogger,
        "wandb": WandBLogger,
        "mlflow": MLFlowLogger,
    }


def _dataset_kwargs(cfg: RunConfig, batch_size: int) -> dict[str, Any]:
    data = cfg.train_data
    kwargs: dict[str, Any] = {
        "batch_size": batch_size,
        "shuffle": data.shuffle,
        "shuffle_seed": cfg.seed,
        "predownload": data.predownload,
        "cache_limit": data.cache_limit,
        "validate_hash": data.validate_hash,
        "download_retry": data.download_retry,
        "download_timeout": data.download_timeout,
        "caption": data.caption,
    }
    if data.streams:
        from streaming import Stream

        kwargs["streams"] = [Stream(**stream) for stream in data.streams.values()]
    else:
        kwargs["local"] = data.local
        kwargs["remote"] = data.remote
    return kwargs


def s3_locations(
    cfg: RunConfig, paths: RunPaths | None = None
) -> list[tuple[str, str | None, str | None]]:
    """Every remote location of a run as ``(config key, url, object that must exist)``.

    Datasets must hold ``index.json``; for ``save_folder`` and ``load_path`` the folder (up to
    the first ``{placeholder}``) must be listable. ``paths`` gives the run's own paths with
    ``{run_name}`` replaced.
    """
    data = cfg.train_data
    found: list[tuple[str, str | None, str | None]] = [
        ("train_data.remote", data.remote, "index.json")
    ]
    for name, stream in (data.streams or {}).items():
        found.append((f"train_data.streams.{name}.remote", stream.get("remote"), "index.json"))
    for name in ("zeroshot", "retrieval"):
        options = getattr(cfg.eval_data, name) or {}
        found.append((f"eval_data.{name}.remote", options.get("remote"), "index.json"))
    save_folder = paths.save_folder if paths else cfg.save_folder
    if save_folder:
        found.append(("save_folder", save_folder.split("{")[0], None))
    if cfg.load_path:
        found.append(("load_path", cfg.load_path.rsplit("/", 1)[0], None))
    return found


def build_optimizer(cfg: RunConfig, model: Any) -> torch.optim.Optimizer:
    """AdamW over the model's parameter groups (no decay on gains, biases, temperature)."""
    import torch

    return torch.optim.AdamW(
        model.param_groups(cfg.optimizer.weight_decay),
        lr=cfg.optimizer.lr,
        betas=tuple(cfg.optimizer.betas),
        eps=cfg.optimizer.eps,
    )


def build_scheduler(cfg: RunConfig) -> CosineAnnealingWithWarmupScheduler:
    """Cosine decay with linear warmup, in the recipe's time units."""
    from composer.optim import CosineAnnealingWithWarmupScheduler

    return CosineAnnealingWithWarmupScheduler(
        t_warmup=cfg.scheduler.t_warmup, alpha_f=cfg.scheduler.alpha_f
    )


# ------------------------------------------------------------------------------ rank 0 decides


def _decide_on_rank_zero(decide: Callable[[], T]) -> T:
    """Run ``decide`` on global rank 0 and give every rank its result, or its error.

    Start-up decisions (the run's name, which checkpoint to resume, whether the files are free)
    read shared storage; one rank reads and all act alike, so no rank waits in a collective for
    a rank that has already failed.
    """
    from composer.utils import dist

    outcome: list[Any] = [None]
    if dist.get_global_rank() == 0:
        try:
            outcome = [("ok", decide())]
        except Exception as err:  # re-raised below, on every rank
            outcome = [("error", err)]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def _run_name(cfg: RunConfig) -> str:
    """The recipe's ``run_name`` (or Composer's environment variables), or a new one."""
    name = cfg.run_name or os.environ.get("COMPOSER_RUN_NAME") or os.environ.get("RUN_NAME")
    if name:
        return name
    return _decide_on_rank_zero(lambda: time.strftime("run-%Y%m%d-%H%M%S"))


def _prepare(cfg: RunConfig, paths: RunPaths, command: list[str] | None) -> Checkpoint | None:
    """Rank 0: the checkpoint to resume (if any); refuse to write into another run's files."""
    from cabs_streaming.runs import claim_run, list_checkpoints, resolvable

    checkpoints = list_checkpoints(paths.save_folder) if resolvable(paths.save_folder) else []
    resume = checkpoints[-1] if cfg.autoresume and checkpoints else None
    claim_run(
        paths,
        autoresume=cfg.autoresume,
        resume_from=resume,
        checkpoints=checkpoints,
        command=command,
    )
    return resume


def _fetch_checkpoint(path: str, paths: RunPaths, trusted: bool) -> tuple[str, str | None]:
    """Rank 0: a local copy of the checkpoint to load, checked to be safe to unpickle.

    Returns ``(path to load, folder to delete after loading)``. A remote checkpoint is
    downloaded once (into the run folder), checked and loaded from there, so what is checked is
    what Composer loads. See ``runs.check_checkpoint``.
    """
    from cabs_streaming.runs import UnsafeCheckpoint, check_checkpoint
    from cabs_streaming.storage import download_object

    folder = None
    local = path
    if path.startswith("s3://"):
        base = paths.run_folder or tempfile.gettempdir()
        folder = tempfile.mkdtemp(prefix=".resume-", dir=base if os.path.isdir(base) else None)
        local = os.path.join(folder, os.path.basename(path))
        download_object(path, local, purpose="the checkpoint to load")
    elif "://" in path:
        if not trusted:
            raise UnsafeCheckpoint(
                f"cannot check {path} before it is unpickled (only local files and s3:// are "
                "checked); set trust_checkpoints=true if you or someone you trust wrote it"
            )
        return path, None  # Composer downloads it
    if not trusted:
        check_checkpoint(local)
    return local, folder


@dataclass(frozen=True)
class _Start:
    """Where a run starts: the checkpoint it resumes (if any) and what Composer is told."""

    resume: Checkpoint | None
    load_path: str | None
    composer_autoresume: bool
    download: str | None
    """A folder holding a downloaded checkpoint, to delete once every rank has loaded it."""


def dataset_facts(dataset: Any) -> DatasetFacts:
    """What policies may need to know of the whole training set: counts and names."""
    counts = dataset.concept_counts
    return DatasetFacts(
        concept_samples=None if counts is None else counts.samples,
        names=tuple(dataset.vocabulary.names),
        source="the training data (train_data)",
    )


def _start_point(cfg: RunConfig, paths: RunPaths, command: list[str] | None) -> _Start:
    """Settle the checkpoint to load (on rank 0, for all ranks) and check it before unpickling."""
    from composer.utils import dist

    from cabs_streaming.runs import resolvable

    ours = resolvable(paths.save_folder)
    if cfg.autoresume and not ours and not cfg.trust_checkpoints:
        raise ConfigError(
            f"autoresume from {paths.save_folder}: only local folders and s3:// are listed here "
            "and their checkpoints checked before they are unpickled; set trust_checkpoints=true "
            "to let Composer's own autoresume load from it unchecked"
        )
    resume = _decide_on_rank_zero(lambda: _prepare(cfg, paths, command))
    load_path = resume.path if resume else cfg.load_path
    if not load_path:
        return _Start(resume, None, cfg.autoresume and not ours, None)
    trusted = cfg.trust_checkpoints
    local, download = _decide_on_rank_zero(lambda: _fetch_checkpoint(load_path, paths, trusted))
    single_node = dist.get_local_world_size() == dist.get_world_size()
    return _Start(
        resume,
        local if single_node else load_path,
        cfg.autoresume and not ours,
        download,
    )


# ------------------------------------------------------------------------------ the run


@dataclass
class Run:
    """A built trainer and what ``main`` needs to report on it."""

    trainer: Trainer
    paths: RunPaths
    resumed_from: Checkpoint | None
    """The checkpoint of this run that was loaded, or None for a fresh run."""


def _eval_datasets(evaluators: Sequence[Evaluator]) -> dict[str, ConceptStreamingDataset]:
    return {e.label: e.dataloader.dataloader.dataset for e in evaluators}


def _warn_about_eval_vocabularies(
    cfg: RunConfig, train: ConceptStreamingDataset, evals: dict[str, ConceptStreamingDataset]
) -> None:
    """Say when an eval set names concepts the training data does not (not the same data)."""
    known = set(train.vocabulary.names)
    for label, dataset in evals.items():
        names = dataset.vocabulary.names
        missing = [n for n in names if n not in known]
        if not missing:
            continue
        where = next(
            (
                f"eval_data.{key}"
                for key in ("zeroshot", "retrieval")
                if (getattr(cfg.eval_data, key) or {}).get("label", key) == label
            ),
            label,
        )
        log.warning(
            "%s evaluates on a set whose vocabulary differs from the training data's: %d of its "
            "%d concepts (e.g. %s) are not among the %d training concepts, so it is probably "
            "another dataset's eval set. Point %s.local/remote at a held-out part of your own "
            "data, or set %s=null to train without it.",
            where,
            len(missing),
            len(names),
            ", ".join(repr(n) for n in missing[:3]),
            len(known),
            where,
            where,
        )


def _chance(cfg: RunConfig, evals: dict[str, ConceptStreamingDataset]) -> dict[str, float]:
    from cabs_streaming.runlog import chance_levels

    zeroshot_label = (cfg.eval_data.zeroshot or {}).get("label", "zeroshot")
    zeroshot = {label: len(ds.vocabulary) for label, ds in evals.items() if label == zeroshot_label}
    retrieval = {
        label: int(ds.num_samples) for label, ds in evals.items() if label != zeroshot_label
    }
    return chance_levels(zeroshot, retrieval)


def _composer_loggers(cfg: RunConfig) -> list[Any]:
    loggers = []
    available = _loggers()
    for name, options in cfg.loggers.items():
        try:
            loggers.append(available[name](**options))
        except TypeError as err:
            raise ConfigError(f"loggers.{name}: {err}") from err
    return loggers


def cpu_threads_per_rank(cores: int, local_ranks: int, env: dict[str, str]) -> int | None:
    """The torch threads each of ``local_ranks`` CPU processes should use, or None to leave it.

    torch starts one intra-op thread per core in every process, so ``composer -n 2`` on a
    2-core machine ran 4 busy threads on 2 cores and every step several times slower (torchrun
    sets ``OMP_NUM_THREADS=1`` for this reason; Composer's launcher sets nothing). Each rank
    gets its share of the cores instead; an ``OMP_NUM_THREADS`` the user set wins, and a single
    process keeps torch's default.
    """
    if "OMP_NUM_THREADS" in env or local_ranks <= 1:
        return None
    return max(1, cores // local_ranks)


def build_run(cfg: RunConfig, command: list[str] | None = None) -> Run:
    """Everything but ``fit``: the trainer, the run's paths and what it resumes from."""
    import torch
    from composer import DataSpec, Trainer
    from composer.callbacks import LRMonitor, SpeedMonitor
    from composer.utils import dist, reproducibility

    from cabs_streaming.algorithm import ConceptAwareBatchSampling
    from cabs_streaming.callbacks import ConceptDiversityMonitor
    from cabs_streaming.dataset import (
        ConceptCollator,
        ConceptStreamingDataset,
        LookaheadDataLoader,
        num_samples_in_batch,
    )
    from cabs_streaming.evaluation import build_evaluators
    from cabs_streaming.model import ComposerCLIP
    from cabs_streaming.runlog import RunLog
    from cabs_streaming.runs import CURVES, HISTORY, SUMMARY, save_schedule
    from cabs_streaming.storage import check_s3_locations, tune_checkpoint_uploads

    device = cfg.device or ("gpu" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized() and dist.get_world_size() > 1:
        dist.initialize_dist(device)
    if device == "cpu":
        cores = len(os.sched_getaffinity(0))
        threads = cpu_threads_per_rank(cores, dist.get_local_world_size(), dict(os.environ))
        if threads is not None:
            torch.set_num_threads(threads)
    reproducibility.seed_all(cfg.seed)
    paths = RunPaths.of(cfg, _run_name(cfg))
    check_s3_locations(s3_locations(cfg, paths))  # one clear error now, not many late ones
    world = dist.get_world_size()
    try:
        n = superbatch_per_rank(cfg.global_train_batch_size, world, cfg.filter_ratio)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _, ignored = policy_options(cfg.selection)
    policy = build_policy(cfg.selection)

    start = _start_point(cfg, paths, command)

    if dist.get_global_rank() == 0 and not cfg.selection.schedule:
        for option, owners in ignored.items():
            log.warning(
                "selection.options.%s belongs to policy %s and is ignored by %r",
                option,
                " and ".join(owners),
                cfg.selection.policy,
            )
    try:
        model = ComposerCLIP(cfg.model.name, loss=cfg.model.loss, **cfg.model.options)
    except (TypeError, ValueError) as err:  # an unknown architecture or option
        raise ConfigError(f"model: {err}") from err
    try:
        kwargs = _dataset_kwargs(cfg, n)
        if policy.required_columns():
            kwargs["columns"] = list(policy.required_columns())
        dataset = ConceptStreamingDataset(**kwargs)
    except (FileNotFoundError, RuntimeError, TypeError, ValueError) as err:  # no data, bad option
        raise ConfigError(f"train_data: {err}") from err
    try:
        policy = policy.bind(dataset_facts(dataset))
    except ValueError as err:  # e.g. balanced on data converted without concept counts
        if dataset.concept_counts is None:  # say which stream lacks them and how to add them
            try:
                dataset.require_concept_counts(f"selection: {err}")
            except ValueError as missing:
                raise ConfigError(str(missing)) from err
        raise ConfigError(f"selection: {err}") from err
    loader = LookaheadDataLoader(
        dataset,
        batch_size=n,
        collate_fn=ConceptCollator(),
        num_workers=cfg.train_data.num_workers,
        drop_last=True,
        persistent_workers=cfg.train_data.num_workers > 0,
    )
    train_spec = DataSpec(loader, get_num_samples_in_batch=num_samples_in_batch)

    decoder = model.image_decoder(
        is_train=True,
        seed=cfg.seed,
        num_threads=cfg.decode.threads,
        draft=cfg.decode.draft,
        draft_margin=cfg.decode.draft_margin,
    )
    cabs = ConceptAwareBatchSampling(
        decoder=decoder,
        filter_ratio=cfg.filter_ratio,
        policy=policy,
        seed=cfg.seed,
        tokenizer=model.tokenizer,
        verify_consensus=cfg.selection.verify_consensus,
        selection_log=paths.selection_log,
        num_concepts=len(dataset.vocabulary),
        on_decode_error=cfg.decode.on_error,
        lookahead=cfg.decode.lookahead,
        world_invariant=cfg.selection.world_invariant,
    )

    try:
        evaluators = build_evaluators(model, cfg.eval_data)
    except (TypeError, ValueError, FileNotFoundError) as err:
        raise ConfigError(f"eval_data: {err}") from err
    evals = _eval_datasets(evaluators)
    loggers = _composer_loggers(cfg)
    if dist.get_global_rank() == 0:
        _warn_about_eval_vocabularies(cfg, dataset, evals)
        loggers.append(
            RunLog(
                run_name=paths.run_name,
                history=paths.in_run_folder(HISTORY),
                summary=paths.in_run_folder(SUMMARY),
                curves=paths.in_run_folder(CURVES),
                status_interval=int(cfg.status_interval[:-2]) if cfg.status_interval else None,
                progress_bar=cfg.progress_bar,
                kept_per_step=cfg.global_train_batch_size,
                drawn_per_step=n * world,
                chance=_chance(cfg, evals),
            )
        )

    trainer = Trainer(
        model=model,
        train_dataloader=train_spec,
        eval_dataloader=evaluators or None,
        eval_interval=cfg.eval_data.interval if evaluators else 1,  # Composer warns otherwise
        max_duration=cfg.max_duration,
        optimizers=build_optimizer(cfg, model),
        schedulers=build_scheduler(cfg),
        algorithms=[cabs],
        callbacks=[ConceptDiversityMonitor(), LRMonitor(), SpeedMonitor(window_size=10)],
        loggers=loggers,
        run_name=paths.run_name,
        seed=cfg.seed,
        precision=cfg.precision,
        device=cfg.device,
        # Composer would default the microbatch to the loader's batch, the superbatch; the model
        # only ever sees the kept share.
        device_train_microbatch_size=cfg.device_train_microbatch_size
        or cfg.global_train_batch_size // world,
        save_folder=paths.save_folder,
        save_interval=save_schedule(cfg.save_interval),
        save_latest_filename=cfg.save_latest_filename,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite,
        # Ours (runs.py) finds the newest complete checkpoint by listing the folder; Composer's
        # follows a pointer that lags behind it, so it is used only for stores we cannot list.
        autoresume=start.composer_autoresume,
        load_path=start.load_path,
        progress_bar=False,  # RunLog shows one bar for the whole run
        log_to_console=cfg.log_to_console,
        console_log_interval=cfg.console_log_interval,
    )
    if start.download:
        dist.barrier()  # every rank has loaded the downloaded copy
        if dist.get_global_rank() == 0:
            shutil.rmtree(start.download, ignore_errors=True)
    tune_checkpoint_uploads(
        trainer,
        cfg.save_upload_attempts,
        cfg.save_latest_poll_s,
        local_folder=paths.in_run_folder(".checkpoints"),
        keep_local=cfg.save_num_checkpoints_to_keep,
    )
    return Run(trainer=trainer, paths=paths, resumed_from=start.resume)


def build_trainer(cfg: RunConfig) -> Trainer:
    """``build_run(cfg).trainer``: everything but ``fit``, for tests and notebooks."""
    return build_run(cfg).trainer


def final_metrics(trainer: Trainer) -> dict[str, float]:
    """The last computed evaluation metrics as ``{"<label>/<metric>": value}``."""
    out: dict[str, float] = {}
    for label, metrics in trainer.state.eval_metrics.items():
        for name, metric in metrics.items():
            value = metric.compute()
            if isinstance(value, dict):
                for key, v in value.items():
                    out[f"{label}/{key}"] = float(v)
            else:
                out[f"{label}/{name}"] = float(value)
    return out


# ------------------------------------------------------------------------------ entry point

#: How long a local rank other than 0 waits, after a start-up error, for local rank 0 to exit.
STARTUP_FAILURE_GRACE_S = 60.0


def _is_local_leader() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _startup_failure(kind: str, err: BaseException, status: int = 2) -> int:
    """Print the error once (local rank 0) and exit 2, reported as 2 by ``composer`` too.

    Config and storage checks fail the same way on every rank. The launcher, on the first
    rank that exits non-zero, SIGTERMs the others and then returns the first non-zero exit
    code in rank order; when rank 1 happened to exit first, that was rank 0's SIGTERM
    (status 241) instead of our 2. So local rank 0 prints and exits at once and the other
    local ranks stay silent and give it a grace period (the launcher ends them sooner).
    """
    if _is_local_leader():
        print(f"{kind}: {err}", file=sys.stderr, flush=True)
    else:
        time.sleep(STARTUP_FAILURE_GRACE_S)
    return status


def _is_complete(trainer: Trainer) -> bool:
    state = trainer.state
    duration = state.max_duration
    return duration is not None and state.timestamp.get(duration.unit) >= duration


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``train.py RECIPE.yaml [key=value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0])
        print("usage: composer train.py yamls/<recipe>.yaml [key=value ...]")
        return 0 if argv else 2
    logging.basicConfig(level=os.environ.get("CABS_LOG_LEVEL", "WARNING"))
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as err:
        return _startup_failure("config error", err)

    from cabs_streaming.storage import StorageError  # the heavy stack from here on

    try:
        run = build_run(cfg, command=argv)
    except ConfigError as err:
        return _startup_failure("config error", err)
    except StorageError as err:
        return _startup_failure("storage error", err)
    trainer = run.trainer
    if run.resumed_from is not None and _is_complete(trainer):
        if _is_local_leader():
            print(
                f"run {run.paths.run_name!r} is complete: its checkpoint "
                f"{run.resumed_from.path} is at max_duration={cfg.max_duration}; nothing to "
                "train (raise max_duration to train further, or choose another run_name for a "
                "new run)"
            )
        trainer.close()
        return 0
    try:
        trainer.fit()
    except StorageError as err:
        print(f"storage error: {err}", file=sys.stderr, flush=True)
        return 1
    metrics = final_metrics(trainer)
    trainer.close()  # prints the run's summary and writes its files
    from composer.utils import dist

    if dist.get_global_rank() == 0:
        print(json.dumps({"final_eval": metrics}, indent=2))
        if run.paths.metrics_file:
            folder = os.path.dirname(run.paths.metrics_file)
            if folder:
                os.makedirs(folder, exist_ok=True)
            with open(run.paths.metrics_file, "w", encoding="utf-8") as f:
                json.dump(metrics, f, indent=2)
    return 0
