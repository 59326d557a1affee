"""The long-tail benchmark: does CABS make better models than IID batches at the same cost.

``tools/run_benchmark.py`` trains the recipes of ``yamls/benchmarks/`` (IID at ``f = 0``,
CABS-DM, CABS-DM in the reference implementation's form, CABS-FM at ``f = 0.8``; one model, one
schedule, the same number of trained samples and steps) with several seeds on the long-tail data
of ``tools/make_sample.py --preset longtail``, and writes what a reader needs to judge the
claims of the method:

- zero-shot top-1 over all classes, and over the *head* and *tail* halves of the concepts by
  training frequency (CABS-DM is meant to help most on the tail);
- image-to-text and text-to-image recall@1 and @5 (CABS-FM is meant to help retrieval);
- the share of kept concept instances that belong to the tail half (the mechanism: what the
  policy fed the model);
- each of these over training, at the same steps for every run.

Every run goes through the library's own training path (``cabs_streaming.train.build_trainer``,
the same ``ConceptAwareBatchSampling`` and decoding as ``composer train.py``), one process per
run, so runs can go side by side on the cores of one machine (``--jobs``) or one after another
on a GPU. Composer's evaluators are switched off for these runs: :class:`BenchmarkProbe`
evaluates instead, on the sets the recipe's ``eval_data`` names, because it needs per-class
results (head and tail) that Composer's metrics do not keep. It decodes the evaluation images
once, with the model's own eval transform, and scores them with the same open_clip zero-shot
classifier (``ComposerCLIP.zeroshot_classifier``) and the same recall function
(``cabs_streaming.metrics.retrieval_recalls``) as the evaluators.

Choose hyper-parameters with ``--split val`` (the ``val_*`` splits) and report the test splits
(``--split test``, the default) only for the settings chosen there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer import Callback, State
from composer.loggers import Logger

from cabs_streaming.algorithm import ConceptAwareBatchSampling
from cabs_streaming.dataset import ConceptStreamingDataset
from cabs_streaming.metrics import retrieval_recalls

__all__ = [
    "METRICS",
    "RECIPES",
    "BenchmarkProbe",
    "RunSpec",
    "aggregate",
    "concept_halves",
    "run_benchmark",
    "run_one",
]

#: Recipe names (``yamls/benchmarks/longtail-<name>.yaml``) in reporting order, with labels.
RECIPES: dict[str, str] = {
    "iid": "IID (f = 0)",
    "cabs-dm": "CABS-DM",
    "cabs-dm-compat": "CABS-DM (reference form)",
    "cabs-fm": "CABS-FM",
    "cabs-mixed-0.5": "mixed, lambda = 0.5",
    "cabs-mixed-2": "mixed, lambda = 2",
    "cabs-dm-then-fm": "schedule: CABS-DM, then CABS-FM from 0.5dur",
}
#: Metrics of a run, in table order, with their column titles.
METRICS: dict[str, str] = {
    "zeroshot_top1": "zero-shot top-1",
    "zeroshot_top1_head": "top-1 head half",
    "zeroshot_top1_tail": "top-1 tail half",
    "image_to_text_recall_at_1": "I→T R@1",
    "image_to_text_recall_at_5": "I→T R@5",
    "text_to_image_recall_at_1": "T→I R@1",
    "text_to_image_recall_at_5": "T→I R@5",
    "mean_recall": "mean recall",
    "kept_tail_share": "kept tail share",
}
#: Evaluation splits by ``--split``: the recipes read ``${variables.eval_split}_*``.
SPLITS = {"test": "eval", "val": "val"}
_COLORS = {
    "iid": "#7f7f7f",
    "cabs-dm": "#1f77b4",
    "cabs-dm-compat": "#17becf",
    "cabs-fm": "#d62728",
    "cabs-mixed-0.5": "#ff7f0e",
    "cabs-mixed-2": "#2ca02c",
    "cabs-dm-then-fm": "#9467bd",
}


def recipe_path(name: str, recipe_dir: str | os.PathLike[str]) -> Path:
    """``<recipe_dir>/longtail-<name>.yaml``, or a clear error listing what exists."""
    path = Path(recipe_dir) / f"longtail-{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("longtail-") for p in Path(recipe_dir).glob("*.yaml"))
        raise FileNotFoundError(f"no benchmark recipe {path}; recipes there: {known}")
    return path


# --------------------------------------------------------------------------------------------
# Head and tail
# --------------------------------------------------------------------------------------------


def concept_halves(train_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(head ids, tail ids, instances per id)`` of a training set, by training frequency.

    Concepts are ranked by their instances in the training split (ties: lower id first); the
    more frequent half is the head, the rest the tail. Unused ids count as tail.
    """
    from cabs_streaming.report import read_concepts

    with _streaming_setup_lock():
        data = read_concepts(train_dir, progress=False)
    counts = np.bincount(data.ids, minlength=len(data.vocabulary)).astype(np.int64)
    order = np.lexsort((np.arange(counts.size), -counts))
    half = counts.size // 2
    return np.sort(order[:half]), np.sort(order[half:]), counts


# --------------------------------------------------------------------------------------------
# The probe: evaluation with per-class results, and what the policy kept
# --------------------------------------------------------------------------------------------


@dataclass
class _EvalData:
    """Decoded evaluation sets on the model's device."""

    zeroshot_images: torch.Tensor  # float [n, 3, H, W]
    labels: torch.Tensor  # int64 [n]
    classnames: list[str]
    retrieval_images: torch.Tensor
    retrieval_text: torch.Tensor  # int64 [m, context]


def _read_split(directory: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Every sample of a local MDS split (images still encoded) and its vocabulary's names."""
    dataset = ConceptStreamingDataset(local=directory, shuffle=False, batch_size=1)
    return [dataset[i] for i in range(dataset.num_samples)], list(dataset.vocabulary.names)


@contextlib.contextmanager
def _streaming_setup_lock() -> Iterator[None]:
    """Hold a machine-wide lock while datasets are built.

    Streaming 0.13 picks a free shared-memory prefix by probing names and then creating them, so
    two processes that build datasets at the same moment can pick the same prefix and one fails
    with ``FileExistsError: '/000263_locals'``. Runs side by side take turns here instead.
    """
    path = os.path.join(tempfile.gettempdir(), "cabs-benchmark-streaming.lock")
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class BenchmarkProbe(Callback):
    """Evaluate every ``interval`` steps and at the end of training; count the kept concepts.

    Each evaluation records zero-shot top-1 over all classes and over the ``head`` and ``tail``
    concept ids, per-class top-1, the four retrieval recalls and their mean, and
    ``kept_tail_share``: the share of the concept instances kept since the previous evaluation
    that belong to the tail (read from the CABS algorithm's selection record after every step).
    Results accumulate in :attr:`history`, one dict per evaluation with its ``step``;
    :attr:`kept_instances` counts kept instances per concept id over the whole run.

    The evaluation sets are read and decoded once, at ``FIT_START``, with the model's eval
    transform; zero-shot uses ``ComposerCLIP.zeroshot_classifier`` (open_clip's classifier from
    the class names and ``templates``) and retrieval ``retrieval_recalls``, as the evaluators do.
    """

    def __init__(
        self,
        *,
        zeroshot_dir: str,
        retrieval_dir: str,
        templates: Any,
        head: Sequence[int],
        tail: Sequence[int],
        interval: int,
        batch_size: int = 500,
    ) -> None:
        self.zeroshot_dir = zeroshot_dir
        self.retrieval_dir = retrieval_dir
        self.templates = templates
        self.head = np.asarray(head, dtype=np.int64)
        self.tail = np.asarray(tail, dtype=np.int64)
        self.interval = max(1, int(interval))
        self.batch_size = batch_size
        self.history: list[dict[str, Any]] = []
        self.kept_instances = np.zeros(0, dtype=np.int64)
        self.eval_seconds = 0.0
        self._since = np.zeros(0, dtype=np.int64)
        self._data: _EvalData | None = None
        started = time.perf_counter()
        self._zeroshot_rows, self._names = _read_split(zeroshot_dir)
        self._retrieval_rows, _ = _read_split(retrieval_dir)
        self.eval_seconds += time.perf_counter() - started

    def fit_start(self, state: State, logger: Logger) -> None:
        """Decode the evaluation sets with the model's eval transform; register the task."""
        started = time.perf_counter()
        model = state.model
        device = next(model.parameters()).device
        zs_rows, rt_rows, names = self._zeroshot_rows, self._retrieval_rows, self._names
        with model.image_decoder(is_train=False, seed=0) as decoder:

            def images(rows: list[dict[str, Any]]) -> torch.Tensor:
                keys = [r["key"] for r in rows]
                return decoder([r["image"] for r in rows], keys).to(device)

            zeroshot_images, retrieval_images = images(zs_rows), images(rt_rows)
        labels = [int(r["concepts"][0]) for r in zs_rows]
        model.add_zeroshot_task("benchmark", names, self.templates)
        self._data = _EvalData(
            zeroshot_images=zeroshot_images,
            labels=torch.tensor(labels, dtype=torch.int64, device=device),
            classnames=names,
            retrieval_images=retrieval_images,
            retrieval_text=model.tokenizer([r["caption"] for r in rt_rows]).to(device),
        )
        self.kept_instances = np.zeros(len(names), dtype=np.int64)
        self._since = np.zeros(len(names), dtype=np.int64)
        self.eval_seconds += time.perf_counter() - started

    def batch_end(self, state: State, logger: Logger) -> None:
        """Count the concepts this step kept; evaluate every ``interval`` steps."""
        record = next(
            (a.last for a in state.algorithms if isinstance(a, ConceptAwareBatchSampling)), None
        )
        if record is not None and self._since.size:
            kept = record.kept_global
            lists = [record.ids[record.offsets[g] : record.offsets[g + 1]] for g in kept]
            ids = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
            counts = np.bincount(ids, minlength=self._since.size)[: self._since.size]
            self._since += counts
            self.kept_instances += counts
        step = int(state.timestamp.batch)
        if step % self.interval == 0:
            self.evaluate(state.model, step)

    def fit_end(self, state: State, logger: Logger) -> None:
        """Evaluate the final model unless the last step already was."""
        step = int(state.timestamp.batch)
        if not self.history or self.history[-1]["step"] != step:
            self.evaluate(state.model, step)

    def _features(self, encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
        chunks = range(0, x.shape[0], self.batch_size)
        return torch.cat([encode(x[i : i + self.batch_size]).float() for i in chunks])

    def evaluate(self, model: Any, step: int) -> dict[str, Any]:
        """One evaluation of ``model`` (a ``ComposerCLIP``), appended to :attr:`history`."""
        started = time.perf_counter()
        data = self._data
        if data is None:
            raise RuntimeError("BenchmarkProbe.evaluate before FIT_START loaded the sets")
        was_training = model.training
        model.eval()
        with torch.no_grad():
            classifier = model.zeroshot_classifier("benchmark")
            encode_image = lambda x: model.clip.encode_image(x, normalize=True)  # noqa: E731
            image = self._features(encode_image, data.zeroshot_images)
            correct = ((image @ classifier).argmax(dim=1) == data.labels).cpu().numpy()
            recalls = retrieval_recalls(
                self._features(encode_image, data.retrieval_images),
                self._features(
                    lambda x: model.clip.encode_text(x, normalize=True), data.retrieval_text
                ),
            )
        model.train(was_training)
        labels = data.labels.cpu().numpy()
        total = int(self._since.sum())
        entry: dict[str, Any] = {
            "step": step,
            "zeroshot_top1": float(correct.mean()),
            "zeroshot_top1_head": float(correct[np.isin(labels, self.head)].mean()),
            "zeroshot_top1_tail": float(correct[np.isin(labels, self.tail)].mean()),
            **{name: float(value) for name, value in recalls.items()},
            "kept_tail_share": float(self._since[self.tail].sum() / total) if total else 0.0,
            "per_class_top1": [
                float(correct[labels == c].mean()) if np.any(labels == c) else None
                for c in range(len(data.classnames))
            ],
        }
        self._since[:] = 0
        self.history.append(entry)
        self.eval_seconds += time.perf_counter() - started
        return entry

    @property
    def retrieval_pairs(self) -> int:
        """Image-caption pairs in the retrieval set (recall@k's chance level is about k / this)."""
        return 0 if self._data is None else int(self._data.retrieval_images.shape[0])


# --------------------------------------------------------------------------------------------
# One run (in its own process)
# --------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """One benchmark run: a recipe, a seed and overrides, with where its evaluation sets are."""

    recipe: str
    recipe_file: str
    seed: int
    data: str
    split: str = "test"
    overrides: list[str] = field(default_factory=list)
    evaluations: int = 6
    threads: int | None = None
    device: str | None = None

    def config_overrides(self) -> list[str]:
        """Everything the runner sets on the recipe: data, seed, quiet output, no files."""
        out = [
            f"variables.data={self.data}",
            f"variables.eval_split={SPLITS[self.split]}",
            f"seed={self.seed}",
            f"run_name=benchmark-{self.recipe}-{self.seed}",
            "save_folder=null",
            "progress_bar=false",
            "log_to_console=false",
            "selection.selection_log=null",
            "metrics_file=null",
        ]
        if self.threads:
            out.append(f"decode.threads={self.threads}")
        if self.device:
            out.append(f"device={self.device}")
        return out + list(self.overrides)


def _steps(max_duration: str) -> int:
    if not max_duration.endswith("ba"):
        raise ValueError(
            f"benchmark recipes give max_duration in batches (e.g. 1200ba) so every policy trains "
            f"the same number of steps; got {max_duration!r}"
        )
    return int(max_duration[:-2])


def run_one(spec: RunSpec, head: Sequence[int], tail: Sequence[int]) -> dict[str, Any]:
    """Train one run and return its evaluation history, final metrics and timings."""
    from cabs_streaming.config import load_config
    from cabs_streaming.train import build_trainer

    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = load_config(spec.recipe_file, spec.config_overrides())
    zeroshot, retrieval = cfg.eval_data.zeroshot, cfg.eval_data.retrieval
    if not zeroshot or not retrieval:
        raise ValueError(f"{spec.recipe_file}: eval_data needs zeroshot and retrieval sets")
    steps = _steps(cfg.max_duration)
    cfg.eval_data.zeroshot = cfg.eval_data.retrieval = None  # the probe evaluates instead
    started = time.perf_counter()
    with _streaming_setup_lock():
        probe = BenchmarkProbe(
            zeroshot_dir=zeroshot["local"],
            retrieval_dir=retrieval["local"],
            templates=zeroshot.get("templates"),
            head=head,
            tail=tail,
            interval=max(1, steps // max(1, spec.evaluations)),
        )
        trainer = build_trainer(cfg)
    trainer.state.callbacks.append(probe)
    trainer.fit()
    wall = time.perf_counter() - started
    trainer.close()
    final = {k: v for k, v in probe.history[-1].items() if k != "per_class_top1"}
    return {
        "recipe": spec.recipe,
        "seed": spec.seed,
        "split": spec.split,
        "overrides": spec.overrides,
        "steps": steps,
        "global_batch": cfg.global_train_batch_size,
        "filter_ratio": cfg.filter_ratio,
        "policy": cfg.selection.policy,
        "policy_options": cfg.selection.options or {},
        "wall_s": round(wall, 1),
        "eval_s": round(probe.eval_seconds, 1),
        "trained_samples_per_s": round(steps * cfg.global_train_batch_size / wall, 1),
        "final": final,
        "per_class_top1": probe.history[-1]["per_class_top1"],
        "history": [{k: v for k, v in h.items() if k != "per_class_top1"} for h in probe.history],
        "kept_instances": probe.kept_instances.tolist(),
        "retrieval_pairs": probe.retrieval_pairs,
    }


def _child_main(argv: Sequence[str]) -> int:
    """``python -m cabs_streaming.benchmark RUN.json``: run one spec, write its result beside."""
    path = Path(argv[0])
    job = json.loads(path.read_text())
    spec = RunSpec(**job["spec"])
    result = run_one(spec, job["head"], job["tail"])
    Path(job["result"]).write_text(json.dumps(result, indent=1))
    return 0


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


def _summary(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": int(arr.size),
    }


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, sample standard deviation, min and max over seeds of every metric, per recipe."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for recipe in dict.fromkeys(r["recipe"] for r in runs):
        mine = [r for r in runs if r["recipe"] == recipe]
        out[recipe] = {m: _summary([r["final"][m] for r in mine]) for m in METRICS}
    return out


def markdown_table(summary: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """The summary as a Markdown table: ``mean ± std`` over seeds, best mean in bold."""
    best = {m: max(s[m]["mean"] for s in summary.values()) for m in METRICS}
    lines = [
        "| recipe | " + " | ".join(METRICS.values()) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for recipe, stats in summary.items():
        cells = []
        for m in METRICS:
            text = f"{stats[m]['mean']:.3f} ± {stats[m]['std']:.3f}"
            cells.append(
                f"**{text}**" if stats[m]["mean"] == best[m] and m != "kept_tail_share" else text
            )
        lines.append(f"| {RECIPES.get(recipe, recipe)} | " + " | ".join(cells) + " |")
    n = {int(s[next(iter(METRICS))]["n"]) for s in summary.values()}
    lines.append("")
    lines.append(
        f"Mean ± sample standard deviation over {'/'.join(map(str, sorted(n)))} seeds; bold: the "
        "best mean of a column."
    )
    return "\n".join(lines) + "\n"


def chance_levels(classes: int, pairs: int) -> dict[str, float]:
    """What a model that has learnt nothing scores: ``1 / classes`` top-1, ``k / pairs`` R@k."""
    out = {m: 1 / classes for m in ("zeroshot_top1", "zeroshot_top1_head", "zeroshot_top1_tail")}
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5):
            out[f"{direction}_recall_at_{k}"] = min(1.0, k / pairs)
    out["mean_recall"] = float(np.mean([v for m, v in out.items() if "recall_at" in m]))
    return out


def plot_results(
    runs: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
    out: Path,
    chance: Mapping[str, float],
) -> list[str]:
    """``benchmark_bars.png`` (final metrics, seed spread) and ``zeroshot_over_training.png``."""
    from matplotlib.figure import Figure

    recipes = list(summary)
    groups = [
        ("zero-shot top-1", ["zeroshot_top1", "zeroshot_top1_head", "zeroshot_top1_tail"]),
        ("retrieval recall", [m for m in METRICS if "recall_at" in m]),
    ]
    fig = Figure(figsize=(13, 5), layout="constrained")
    axes = fig.subplots(1, 2, width_ratios=[3, 4])
    width = 0.8 / len(recipes)
    for ax, (title, metrics) in zip(axes, groups, strict=True):
        x = np.arange(len(metrics))
        for i, recipe in enumerate(recipes):
            stats = summary[recipe]
            means = [stats[m]["mean"] for m in metrics]
            lo = [stats[m]["mean"] - stats[m]["min"] for m in metrics]
            hi = [stats[m]["max"] - stats[m]["mean"] for m in metrics]
            pos = x - 0.4 + width * (i + 0.5)
            ax.bar(
                pos,
                means,
                width,
                yerr=[lo, hi],
                capsize=3,
                label=RECIPES.get(recipe, recipe),
                color=_COLORS.get(recipe),
            )
            for run in (r for r in runs if r["recipe"] == recipe):
                ax.plot(pos, [run["final"][m] for m in metrics], "k.", markersize=3)
        for j, m in enumerate(metrics):
            if m in chance:
                ax.hlines(chance[m], j - 0.45, j + 0.45, colors="k", linestyles=":", linewidth=1)
        ax.set_xticks(x, [METRICS[m] for m in metrics], rotation=15)
        ax.set_title(
            f"{title} (bars: mean; whiskers: min-max over seeds; dots: seeds; dotted: chance)",
            fontsize=9,
        )
    axes[0].legend(fontsize=8)
    files = ["benchmark_bars.png"]
    fig.savefig(out / files[0], dpi=110)

    fig = Figure(figsize=(13, 4.5), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [
        ("zeroshot_top1", "zero-shot top-1"),
        ("zeroshot_top1_tail", "top-1, tail half"),
        ("mean_recall", "retrieval mean recall"),
    ]
    for ax, (metric, title) in zip(axes, panels, strict=True):
        for recipe in recipes:
            mine = [r for r in runs if r["recipe"] == recipe]
            steps = [h["step"] for h in mine[0]["history"]]
            values = np.asarray([[h[metric] for h in r["history"]] for r in mine])
            ax.plot(
                steps,
                values.mean(axis=0),
                label=RECIPES.get(recipe, recipe),
                color=_COLORS.get(recipe),
            )
            ax.fill_between(
                steps, values.min(axis=0), values.max(axis=0), alpha=0.15, color=_COLORS.get(recipe)
            )
        if metric in chance:
            ax.axhline(chance[metric], color="k", linestyle=":", linewidth=1)
        ax.set_xlabel("step")
        ax.set_title(f"{title} (mean, min-max band over seeds)", fontsize=9)
    axes[0].legend(fontsize=8)
    files.append("zeroshot_over_training.png")
    fig.savefig(out / files[1], dpi=110)
    return files


def run_benchmark(
    *,
    data: str,
    out: str,
    recipes: Sequence[str] = tuple(RECIPES),
    seeds: Sequence[int] = (0, 1, 2),
    split: str = "test",
    overrides: Sequence[str] = (),
    jobs: int = 1,
    threads: int | None = None,
    evaluations: int = 6,
    device: str | None = None,
    recipe_dir: str | os.PathLike[str] = "yamls/benchmarks",
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run ``recipes x seeds``, ``jobs`` at a time, and write results, a table and figures.

    ``threads`` (default: the machine's cores over ``jobs``) is each run's torch and decoding
    thread count on the CPU: more threads than cores in all makes every run many times slower
    (OpenMP threads wait for each other on a busy core).

    Writes ``results.json`` (every run, the summary, the machine and the time taken),
    ``results.md`` (the table) and the figures of :func:`plot_results` into ``out``; each run's
    log goes to ``out/logs/``. Returns what ``results.json`` holds.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    train_dir = os.path.join(data, "train")
    if not os.path.isfile(os.path.join(train_dir, "index.json")):
        raise FileNotFoundError(
            f"{train_dir}/index.json does not exist: generate the benchmark data with "
            f"'python tools/make_sample.py --preset longtail --out {data}'"
        )
    out_dir = Path(out)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    head, tail, counts = concept_halves(train_dir)
    cores = os.cpu_count() or 1
    if threads is None and device != "gpu":
        threads = max(1, cores // max(1, jobs))
    specs = [
        RunSpec(
            recipe=name,
            recipe_file=str(recipe_path(name, recipe_dir)),
            seed=seed,
            data=data,
            split=split,
            overrides=list(overrides),
            evaluations=evaluations,
            threads=threads,
            device=device,
        )
        for seed in seeds
        for name in recipes
    ]
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    pending = list(enumerate(specs, 1))
    running: list[tuple[int, RunSpec, subprocess.Popen[bytes], Path, float]] = []
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
    while pending or running:
        while pending and len(running) < max(1, jobs):
            index, spec = pending.pop(0)
            stem = f"{spec.recipe}-seed{spec.seed}"
            job = out_dir / "logs" / f"{stem}.job.json"
            result_file = out_dir / "logs" / f"{stem}.json"
            job.write_text(
                json.dumps(
                    {
                        "spec": spec.__dict__,
                        "head": head.tolist(),
                        "tail": tail.tolist(),
                        "result": str(result_file),
                    }
                )
            )
            log = open(out_dir / "logs" / f"{stem}.log", "wb")  # noqa: SIM115 (closed by child)
            proc = subprocess.Popen(
                [sys.executable, "-m", "cabs_streaming.benchmark", str(job)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            log.close()
            running.append((index, spec, proc, result_file, time.perf_counter()))
        time.sleep(0.5)
        for item in list(running):
            index, spec, proc, result_file, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            stem = f"{spec.recipe}-seed{spec.seed}"
            if proc.returncode != 0:
                for _, _, other, _, _ in running:
                    other.kill()
                raise RuntimeError(
                    f"benchmark run {stem} failed with exit status {proc.returncode}; see "
                    f"{out_dir / 'logs' / (stem + '.log')}"
                )
            result = json.loads(result_file.read_text())
            results.append(result)
            f = result["final"]
            progress(
                f"[{len(results)}/{len(specs)}] {stem}: zero-shot top-1 {f['zeroshot_top1']:.3f} "
                f"(head {f['zeroshot_top1_head']:.3f}, tail {f['zeroshot_top1_tail']:.3f}), "
                f"mean recall {f['mean_recall']:.3f}, kept tail share "
                f"{f['kept_tail_share']:.3f}; {time.perf_counter() - t0:.0f} s"
            )
    results.sort(key=lambda r: (list(recipes).index(r["recipe"]), r["seed"]))
    summary = aggregate(results)
    chance = chance_levels(len(counts), results[0]["retrieval_pairs"])
    figures = plot_results(results, summary, out_dir, chance)
    report = {
        "split": split,
        "data": os.path.abspath(data),
        "recipes": list(recipes),
        "seeds": list(seeds),
        "overrides": list(overrides),
        "head_concepts": head.tolist(),
        "tail_concepts": tail.tolist(),
        "train_instances_per_concept": counts.tolist(),
        "chance": chance,
        "summary": summary,
        "runs": results,
        "figures": figures,
        "wall_s": round(time.perf_counter() - started, 1),
        "jobs": jobs,
        "threads": threads,
        "machine": {
            "cpu_count": cores,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "device": device or "cpu",
        },
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    (out_dir / "results.md").write_text(markdown_table(summary))
    return report


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
