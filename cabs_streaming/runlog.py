"""What a person sees of a run: one progress bar, a status line every N steps, and its files.

``RunLog`` is a Composer ``LoggerDestination`` on global rank 0, so it receives every metric the
trainer, the algorithm and the callbacks log (loss, ``lr-AdamW/group0`` from ``LRMonitor``,
``throughput/*`` from ``SpeedMonitor``, ``cabs/*``, ``concepts/*``, ``metrics/<eval>/*``) and:

- writes ``history.jsonl``: one JSON object per training step with everything logged during
  it (``step`` counts from 0 like the selection log; eval metrics join the step they follow).
  A resumed run appends, so replayed steps appear twice; readers keep the last line of a step
  (``read_history``);
- shows one progress bar over the whole run and, every ``status_interval`` steps, one line
  (step, epoch counted from 1, loss, learning rate, kept distinct concepts, samples/s), plus a
  line per evaluation with each metric's chance level;
- at the end writes ``summary.json`` (final loss, wall time, samples/s trained and drawn, mean
  kept distinct concepts, final eval metrics with chance levels) and ``curves.png``.

Composer's own console logger prints about 20 lines per step and its progress bars start a new
bar per epoch and per evaluation, numbering epochs from 0 while the console counts from 1;
this is the compact default, and ``log_to_console: true`` still gives Composer's.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from composer.core import State, TimeUnit
from composer.loggers import Logger, LoggerDestination

__all__ = ["RunLog", "chance_levels", "plot_curves", "read_history", "summarize"]

LOSS = "loss/train/total"
KEPT_DISTINCT = "cabs/kept_distinct"
SUPERBATCH_DISTINCT = "cabs/superbatch_distinct"
EVAL_PREFIX = "metrics/"


def chance_levels(zeroshot: Mapping[str, int], retrieval: Mapping[str, int]) -> dict[str, float]:
    """What each eval metric scores by guessing, keyed like the logged names without ``metrics/``.

    ``zeroshot`` maps an evaluator label to its number of classes ``C`` (top-k: ``k / C``),
    ``retrieval`` a label to its number of pairs ``N`` (recall@k: ``k / N``; ``mean_recall``:
    the mean of its four recalls' chances).
    """
    out: dict[str, float] = {}
    for label, classes in zeroshot.items():
        for k in (1, 5):
            out[f"{label}/top{k}_accuracy"] = min(k, classes) / classes
    for label, pairs in retrieval.items():
        recalls = []
        for direction in ("image_to_text", "text_to_image"):
            for k in (1, 5):
                out[f"{label}/{direction}_recall_at_{k}"] = min(k, pairs) / pairs
                recalls.append(min(k, pairs) / pairs)
        out[f"{label}/mean_recall"] = sum(recalls) / len(recalls)
    return out


def read_history(path: str) -> list[dict[str, Any]]:
    """The records of ``history.jsonl`` by step, the last line of a replayed step winning.

    A line cut short by a crash (the run was killed while writing it) is passed over: its step
    is replayed by the resumed run anyway.
    """
    records: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[int(record["step"])] = record
    return [records[step] for step in sorted(records)]


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def summarize(
    records: Sequence[Mapping[str, Any]], chance: Mapping[str, float], **timing: Any
) -> dict[str, Any]:
    """The end-of-run numbers from the history records (one per step) and this session's timing.

    ``timing``: ``wall_time_s``, ``train_time_s``, ``steps_this_session``, ``kept_per_step``,
    ``drawn_per_step``, plus anything else to report as is.
    """
    losses = [r[LOSS] for r in records if LOSS in r]
    evals: dict[str, dict[str, float | None]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(EVAL_PREFIX):
                name = key[len(EVAL_PREFIX) :]
                after = int(record["step"]) + 1
                evals[name] = {"value": value, "chance": chance.get(name), "after_steps": after}
    steps = int(timing.pop("steps_this_session", 0))
    train_s = float(timing.get("train_time_s") or 0.0)
    kept, drawn = timing.pop("kept_per_step", 0), timing.pop("drawn_per_step", 0)
    return {
        "steps": int(records[-1]["step"]) + 1 if records else 0,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "final_loss_mean_last_10": _mean(losses[-10:]),
        "mean_kept_distinct": _mean([r.get(KEPT_DISTINCT) for r in records]),
        "mean_superbatch_distinct": _mean([r.get(SUPERBATCH_DISTINCT) for r in records]),
        **timing,
        "steps_this_session": steps,
        "samples_per_s_trained": steps * kept / train_s if train_s else None,
        "samples_per_s_drawn": steps * drawn / train_s if train_s else None,
        "eval": evals,
    }


def plot_curves(
    records: Sequence[Mapping[str, Any]], path: str, chance: Mapping[str, float], title: str
) -> None:
    """``curves.png``: loss, learning rate, kept distinct concepts, throughput and eval metrics.

    Uses matplotlib's object API (no pyplot), so it changes no global backend or state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in records if key in r]
        return [p[0] for p in points], [p[1] for p in points]

    keys = {k for r in records for k in r}
    lrs = sorted(k for k in keys if k.startswith("lr-"))
    evals = sorted(k for k in keys if k.startswith(EVAL_PREFIX))
    labels = sorted({k[len(EVAL_PREFIX) :].split("/")[0] for k in evals})
    panels = [
        ("training loss", [LOSS]),
        ("learning rate", lrs[:1]),
        ("distinct concepts per batch", [KEPT_DISTINCT, SUPERBATCH_DISTINCT]),
        ("drawn samples/s", ["throughput/samples_per_sec"]),
        *(
            (f"eval: {label}", [k for k in evals if k.startswith(f"{EVAL_PREFIX}{label}/")])
            for label in labels
        ),
    ]
    panels = [(t, [k for k in ks if k in keys]) for t, ks in panels]
    panels = [(t, ks) for t, ks in panels if ks]
    figure = Figure(figsize=(6.4, 2.2 * max(1, len(panels))), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(max(1, len(panels)), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, panel_keys) in zip(axes, panels, strict=False):
        for key in panel_keys:
            x, y = series(key)
            label = key[len(EVAL_PREFIX) :] if key.startswith(EVAL_PREFIX) else key
            is_eval = key.startswith(EVAL_PREFIX)
            line = ax.plot(x, y, marker="o" if is_eval else None, label=label)
            level = chance.get(label)
            if is_eval and level is not None:
                ax.axhline(level, color=line[0].get_color(), linestyle=":", linewidth=1)
        ax.set_title(name, fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("step (dotted: chance level of each eval metric)")
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=100)


def _epochs_done(state: State) -> float:
    """Epochs trained, with the share of an unfinished one (3.5: half-way through the fourth)."""
    done = int(state.timestamp.epoch)
    per_epoch = state.dataloader_len
    if per_epoch is not None and int(per_epoch) > 0:
        return round(done + int(state.timestamp.batch_in_epoch) / int(per_epoch), 3)
    return float(done)


def _step_of(record: Mapping[str, Any]) -> int:
    return int(record["step"])


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


class RunLog(LoggerDestination):
    """Progress bar, status lines, ``history.jsonl``, ``summary.json`` and ``curves.png``.

    Add it on global rank 0 only (the other ranks log the same numbers). Every path may be
    ``None`` to skip that file. ``kept_per_step`` / ``drawn_per_step`` are the global kept and
    drawn samples of one step (samples/s in the summary); ``chance`` is ``chance_levels``.
    """

    def __init__(
        self,
        *,
        run_name: str,
        history: str | None = None,
        summary: str | None = None,
        curves: str | None = None,
        status_interval: int | None = 10,
        progress_bar: bool = True,
        kept_per_step: int = 0,
        drawn_per_step: int = 0,
        chance: Mapping[str, float] | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.run_name = run_name
        self.paths = {"history": history, "summary": summary, "curves": curves}
        self.status_interval = status_interval
        self.show_bar = progress_bar
        self.kept_per_step, self.drawn_per_step = kept_per_step, drawn_per_step
        self.chance = dict(chance or {})
        self.stream = stream or sys.stdout
        self._pending: dict[str, Any] = {}
        self._records: list[dict[str, Any]] = []
        self._history_opened = False
        self._step: int | None = None
        self._bar: Any = None
        self._fit_started: float | None = None
        self._fit_ended = False
        self._step_started: float | None = None
        self._train_s = 0.0
        self._steps = 0
        self._start_step = 0
        self._total: int | None = None
        self._epochs: int | None = None
        self._summary_written = False

    # --------------------------------------------------------------------------- output

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _flush(self) -> None:
        """Append the finished step's record to the history file."""
        if self._step is None or not self._pending:
            self._pending = {}
            return
        record = {"step": self._step, **self._pending}
        self._pending = {}
        self._records.append(record)
        path = self.paths["history"]
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "a+", encoding="utf-8") as f:
                if not self._history_opened and f.tell() > 0:
                    f.seek(f.tell() - 1)
                    if f.read(1) != "\n":  # a line cut short by a crash: end it
                        f.write("\n")
                self._history_opened = True
                f.write(json.dumps(record, allow_nan=True) + "\n")

    # --------------------------------------------------------------------------- Composer

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Collect the metrics of the current step (the step is set by the training loop)."""
        del step  # Composer's step is the batch count at logging time: 1 late after BATCH_END
        for key, value in metrics.items():
            try:
                self._pending[key] = float(value)
            except (TypeError, ValueError):
                continue

    def fit_start(self, state: State, logger: Logger) -> None:
        """Start the clock and the progress bar over the whole run."""
        del logger
        self._fit_started = time.perf_counter()
        self._start_step = int(state.timestamp.batch)
        duration = state.max_duration
        per_epoch = int(state.dataloader_len) if state.dataloader_len is not None else None
        if duration is not None and duration.unit == TimeUnit.BATCH:
            self._total = int(duration.value)
        elif duration is not None and duration.unit == TimeUnit.EPOCH:
            self._epochs = int(duration.value)
            self._total = self._epochs * per_epoch if per_epoch else None
        if self._epochs is None and self._total and per_epoch:
            self._epochs = math.ceil(self._total / per_epoch)
        if self.show_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self._total,
                initial=self._start_step,
                desc=f"train {self.run_name}",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=1.0,
            )
        if self._start_step:
            self._write(f"resuming run {self.run_name} at step {self._start_step}")

    def before_dataloader(self, state: State, logger: Logger) -> None:
        """A new step begins: the previous one's record is complete."""
        del logger
        self._flush()
        self._step = int(state.timestamp.batch)
        self._step_started = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        """Count the step, move the bar, print a status line every ``status_interval`` steps."""
        del logger
        if self._step_started is not None:
            self._train_s += time.perf_counter() - self._step_started
        self._steps += 1
        done = int(state.timestamp.batch)
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
            if LOSS in self._pending:
                self._bar.set_postfix(loss=f"{self._pending[LOSS]:.4f}", refresh=False)
        if self.status_interval and done % self.status_interval == 0:
            self._write(self._status(state, done))

    def _status(self, state: State, done: int) -> str:
        epoch = int(state.timestamp.epoch) + (0 if int(state.timestamp.batch_in_epoch) == 0 else 1)
        lr = next((v for k, v in sorted(self._pending.items()) if k.startswith("lr-")), None)
        rate = self._steps * self.kept_per_step / self._train_s if self._train_s else None
        parts = [
            f"step {done}/{self._total or '?'}",
            f"epoch {max(epoch, 1)}/{self._epochs or '?'}",
            f"loss {_fmt(self._pending.get(LOSS))}",
            f"lr {_fmt(lr, 3)}",
            f"kept distinct {_fmt(self._pending.get(KEPT_DISTINCT), 3)}",
            f"{_fmt(rate, 3)} trained samples/s",
        ]
        return "  ".join(parts)

    def eval_end(self, state: State, logger: Logger) -> None:
        """One line per evaluator: each metric with its chance level."""
        del logger
        label = state.dataloader_label
        prefix = f"{EVAL_PREFIX}{label}/"
        shown = []
        for key, value in sorted(self._pending.items()):
            if key.startswith(prefix):
                name = key[len(EVAL_PREFIX) :]
                level = self.chance.get(name)
                extra = f" (chance {level:.3g})" if level is not None else ""
                shown.append(f"{key[len(prefix) :]} {value:.4g}{extra}")
        if shown:
            self._write(
                f"eval {label} after step {int(state.timestamp.batch)}: " + ", ".join(shown)
            )

    def fit_end(self, state: State, logger: Logger) -> None:
        """Training is over; the final evaluation (if any) comes next, then ``close``."""
        del state, logger
        self._fit_ended = True

    def close(self, state: State, logger: Logger) -> None:
        """Write the last record, then the summary and the curves of a finished ``fit``."""
        del logger
        self._flush()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._fit_ended and not self._summary_written:
            self._summary_written = True
            self._finish(state)

    def _finish(self, state: State) -> None:
        history = self.paths["history"]
        if history and os.path.exists(history):
            records = read_history(history)  # the whole run, earlier sessions included
        else:
            records = sorted({r["step"]: r for r in self._records}.values(), key=_step_of)
        wall = time.perf_counter() - self._fit_started if self._fit_started else None
        summary = {
            "run_name": self.run_name,
            **summarize(
                records,
                self.chance,
                wall_time_s=wall,
                train_time_s=self._train_s,
                resumed_from_step=self._start_step,
                steps_this_session=self._steps,
                kept_per_step=self.kept_per_step,
                drawn_per_step=self.drawn_per_step,
            ),
            "steps": int(state.timestamp.batch),
            "epochs": _epochs_done(state),
            "files": {k: v for k, v in self.paths.items() if v},
        }
        if self.paths["summary"]:
            with open(self.paths["summary"], "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        if self.paths["curves"] and records:
            plot_curves(records, self.paths["curves"], self.chance, f"run {self.run_name}")
        for line in summary_lines(summary):
            print(line, file=self.stream, flush=True)


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The summary as a few lines for the console."""
    lines = [
        f"run {summary['run_name']}: {summary['steps']} steps ({summary['epochs']:g} epochs); "
        f"this session {summary['steps_this_session']} steps in {_fmt(summary['wall_time_s'], 3)}"
        f" s, {_fmt(summary['samples_per_s_trained'], 3)} trained samples/s "
        f"({_fmt(summary['samples_per_s_drawn'], 3)} drawn)",
        f"loss {_fmt(summary['first_loss'])} at the first step, {_fmt(summary['final_loss'])} "
        f"at the last (mean of the last 10: {_fmt(summary['final_loss_mean_last_10'])}); kept "
        f"{_fmt(summary['mean_kept_distinct'], 3)} distinct concepts per batch on average "
        f"(superbatch: {_fmt(summary['mean_superbatch_distinct'], 3)})",
    ]
    for name, entry in summary["eval"].items():
        chance = entry["chance"]
        lines.append(
            f"{name} {_fmt(entry['value'])}"
            + (f" (chance {_fmt(chance, 3)})" if chance is not None else "")
        )
    files = summary.get("files") or {}
    if files:
        lines.append("written: " + ", ".join(files.values()))
    return lines
