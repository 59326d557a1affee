"""Build and run a Composer Trainer from a validated recipe: ``composer train.py RECIPE [k=v ...]``.

The order matters: distributed setup first (every rank builds its dataset with identical
arguments and needs its world size for the superbatch), then the model (the decoder and the
tokenizer come from it), then data, the CABS algorithm, evaluators, optimiser and the Trainer.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from composer import DataSpec, Trainer
from composer.loggers import FileLogger, TensorboardLogger, WandBLogger
from composer.optim import CosineAnnealingWithWarmupScheduler
from composer.utils import dist, reproducibility

from cabs_streaming.algorithm import ConceptAwareBatchSampling, keep_per_rank
from cabs_streaming.callbacks import ConceptDiversityMonitor
from cabs_streaming.config import ConfigError, RunConfig, load_config
from cabs_streaming.dataset import (
    ConceptCollator,
    ConceptStreamingDataset,
    LookaheadDataLoader,
    num_samples_in_batch,
)
from cabs_streaming.storage import StorageError, check_s3_locations, tune_checkpoint_uploads

__all__ = [
    "build_optimizer",
    "build_scheduler",
    "build_trainer",
    "main",
    "s3_locations",
    "superbatch_per_rank",
]

log = logging.getLogger(__name__)

LOGGERS = {"file": FileLogger, "tensorboard": TensorboardLogger, "wandb": WandBLogger}


def superbatch_per_rank(global_batch: int, world: int, filter_ratio: float) -> int:
    """Per-rank superbatch ``n = global_batch / (world * (1 - f))``; must be a whole number.

    The kept per-rank batch ``global_batch / world`` must be whole too. Errors name working
    alternatives, because a silently rounded superbatch would change the filter ratio.
    """
    if global_batch % world:
        raise ConfigError(
            f"global_train_batch_size={global_batch} does not divide over {world} ranks"
        )
    kept = global_batch // world
    exact = kept / (1.0 - filter_ratio)
    n = round(exact)
    if abs(exact - n) > 1e-6:
        raise ConfigError(
            f"global_train_batch_size={global_batch} on {world} rank(s) with filter_ratio="
            f"{filter_ratio} needs a superbatch of {exact:g} samples per rank, not a whole "
            f"number; choose a batch size whose per-rank share {kept} divided by "
            f"(1 - filter_ratio) = {1 - filter_ratio:g} is an integer"
        )
    keep_per_rank(n, filter_ratio)  # the algorithm's own check, for the same numbers
    return n


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


def s3_locations(cfg: RunConfig) -> list[tuple[str, str | None, str | None]]:
    """Every remote location of a run as ``(config key, url, object that must exist)``.

    Datasets must hold ``index.json``; for ``save_folder`` and ``load_path`` the folder (up to
    the first ``{placeholder}``) must be listable.
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
    if cfg.save_folder:
        found.append(("save_folder", cfg.save_folder.split("{")[0], None))
    if cfg.load_path:
        found.append(("load_path", cfg.load_path.rsplit("/", 1)[0], None))
    return found


def build_optimizer(cfg: RunConfig, model: Any) -> torch.optim.Optimizer:
    """AdamW over the model's parameter groups (no decay on gains, biases, temperature)."""
    return torch.optim.AdamW(
        model.param_groups(cfg.optimizer.weight_decay),
        lr=cfg.optimizer.lr,
        betas=tuple(cfg.optimizer.betas),
        eps=cfg.optimizer.eps,
    )


def build_scheduler(cfg: RunConfig) -> CosineAnnealingWithWarmupScheduler:
    """Cosine decay with linear warmup, in the recipe's time units."""
    return CosineAnnealingWithWarmupScheduler(
        t_warmup=cfg.scheduler.t_warmup, alpha_f=cfg.scheduler.alpha_f
    )


def build_trainer(cfg: RunConfig) -> Trainer:
    """Everything but ``fit``: useful for tests and notebooks."""
    from cabs_streaming.evaluation import build_evaluators
    from cabs_streaming.model import ComposerCLIP

    if not dist.is_initialized() and dist.get_world_size() > 1:
        dist.initialize_dist(cfg.device or ("gpu" if torch.cuda.is_available() else "cpu"))
    reproducibility.seed_all(cfg.seed)
    check_s3_locations(s3_locations(cfg))  # one clear error now, not many late ones
    world = dist.get_world_size()
    n = superbatch_per_rank(cfg.global_train_batch_size, world, cfg.filter_ratio)

    model = ComposerCLIP(cfg.model.name, loss=cfg.model.loss, **cfg.model.options)

    dataset = ConceptStreamingDataset(**_dataset_kwargs(cfg, n))
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
        policy=cfg.selection.policy,
        policy_options=cfg.selection.options or {},
        seed=cfg.seed,
        tokenizer=model.tokenizer,
        verify_consensus=cfg.selection.verify_consensus,
        selection_log=cfg.selection.selection_log,
        num_concepts=len(dataset.vocabulary),
        on_decode_error=cfg.decode.on_error,
        lookahead=cfg.decode.lookahead,
    )

    evaluators = build_evaluators(model, cfg.eval_data)
    loggers = []
    for name, options in cfg.loggers.items():
        if name not in LOGGERS:
            raise ConfigError(f"unknown logger {name!r}; valid: {sorted(LOGGERS)}")
        try:
            loggers.append(LOGGERS[name](**options))
        except TypeError as err:
            raise ConfigError(f"loggers.{name}: {err}") from err

    trainer = Trainer(
        model=model,
        train_dataloader=train_spec,
        eval_dataloader=evaluators or None,
        eval_interval=cfg.eval_data.interval,
        max_duration=cfg.max_duration,
        optimizers=build_optimizer(cfg, model),
        schedulers=build_scheduler(cfg),
        algorithms=[cabs],
        callbacks=[ConceptDiversityMonitor()],
        loggers=loggers,
        run_name=cfg.run_name,
        seed=cfg.seed,
        precision=cfg.precision,
        device=cfg.device,
        # Composer would default the microbatch to the loader's batch, the superbatch; the model
        # only ever sees the kept share.
        device_train_microbatch_size=cfg.device_train_microbatch_size
        or cfg.global_train_batch_size // world,
        save_folder=cfg.save_folder,
        save_interval=cfg.save_interval,
        save_latest_filename=cfg.save_latest_filename,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite,
        autoresume=cfg.autoresume,
        load_path=cfg.load_path,
        progress_bar=cfg.progress_bar,
        log_to_console=cfg.log_to_console,
        console_log_interval=cfg.console_log_interval,
    )
    tune_checkpoint_uploads(trainer, cfg.save_upload_attempts, cfg.save_latest_poll_s)
    return trainer


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


#: How long a local rank other than 0 waits, after a start-up error, for local rank 0 to exit.
STARTUP_FAILURE_GRACE_S = 60.0


def _startup_failure(status: int = 2) -> int:
    """Exit status 2 for a start-up error, reported as 2 by the ``composer`` launcher too.

    Config and storage checks fail the same way on every rank. The launcher, on the first
    rank that exits non-zero, SIGTERMs the others and then returns the first non-zero exit
    code in rank order; when rank 1 happened to exit first, that was rank 0's SIGTERM
    (status 241) instead of our 2. So local rank 0 exits at once and the other
    local ranks give it a grace period first (the launcher ends them sooner).
    """
    if os.environ.get("LOCAL_RANK", "0") != "0":
        time.sleep(STARTUP_FAILURE_GRACE_S)
    return status


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
        trainer = build_trainer(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return _startup_failure()
    except StorageError as err:
        print(f"storage error: {err}", file=sys.stderr)
        return _startup_failure()
    trainer.fit()
    metrics = final_metrics(trainer)
    if dist.get_global_rank() == 0:
        print(json.dumps({"final_eval": metrics}, indent=2))
        if cfg.metrics_file:
            folder = os.path.dirname(cfg.metrics_file)
            if folder:
                os.makedirs(folder, exist_ok=True)
            with open(cfg.metrics_file, "w", encoding="utf-8") as f:
                json.dump(metrics, f, indent=2)
    trainer.close()
    return 0
