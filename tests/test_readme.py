"""Every command the README shows works as written.

- The Python snippets that users copy (the dataset one) run from the repository root.
- Every training command (``composer ... train.py RECIPE k=v ...``), and the example overrides
  written as ``... k=v``, validate; the quickstart command itself runs on two gloo ranks
  (shortened by overrides appended after the README's own) and prints what the README says.
- Every command of ``[project.scripts]`` (``cabs-convert`` ...) and every ``tools/*.py`` one: each
  option it uses is one the command's ``--help`` describes.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from paths import ROOT

from cabs_streaming.config import load_config, policy_options

README = (ROOT / "README.md").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]


def section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def shell_commands() -> list[list[str]]:
    """Every command line of the README's shell blocks, continuations joined, comments cut."""
    commands = []
    for language, body in FENCE.findall(README):
        if language not in ("", "bash", "sh"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                program = next((w for w in part.split() if "=" not in w), "")
                if not Path(program).name.startswith(("composer", "python", "cabs-")):
                    continue  # not a command: the layout's "train.py  recipe -> Trainer"
                words = shlex.split(part, comments=True)
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # NUMBA_NUM_THREADS=1 ...
                commands.append(words)
    return commands


def training_commands() -> list[tuple[str, list[str]]]:
    """``(recipe, overrides)`` of every ``train.py`` command and every ``... k=v`` example."""
    found = []
    for words in shell_commands():
        if "train.py" in words:
            rest = words[words.index("train.py") + 1 :]
            found.append((rest[0], rest[1:]))
    for example in re.findall(r"`\.\.\. ([^`]+)`", README):
        found.append(("yamls/quickstart.yaml", example.split()))
    return found


def tool_commands() -> dict[str, list[list[str]]]:
    """Command (an entry point's name or a tools/ path) -> the argument lists the README uses."""
    found: dict[str, list[list[str]]] = {}
    for words in shell_commands():
        tool = next(
            (
                w
                for w in words
                if Path(w).name in SCRIPTS or w.startswith("tools/") and w.endswith(".py")
            ),
            None,
        )
        if tool:
            name = Path(tool).name if Path(tool).name in SCRIPTS else tool
            found.setdefault(name, []).append(words[words.index(tool) + 1 :])
    return found


def help_command(tool: str) -> list[str]:
    """How to run ``tool --help`` from this checkout: an entry point through its function."""
    if tool not in SCRIPTS:
        return [sys.executable, str(ROOT / tool), "--help"]
    module, function = SCRIPTS[tool].split(":")
    code = f"import sys; from {module} import {function}; sys.exit({function}())"
    return [sys.executable, "-c", code, "--help"]


def test_the_readme_shows_the_commands_this_test_checks() -> None:
    recipes = [recipe for recipe, _ in training_commands()]
    assert recipes.count("yamls/quickstart.yaml") >= 2  # the command and its override example
    assert {"cabs-convert", "cabs-tag", "cabs-report", "cabs-bench-pipeline"} <= set(
        tool_commands()
    )


@pytest.mark.parametrize(("recipe", "overrides"), training_commands())
def test_every_training_command_of_the_readme_validates(recipe: str, overrides: list[str]) -> None:
    cfg = load_config(ROOT / recipe, overrides)
    policy_options(cfg.selection)  # e.g. selection.policy=frequency on CABS-DM's options


@pytest.mark.parametrize("tool", sorted(tool_commands()))
def test_every_tool_command_of_the_readme_uses_documented_options(tool: str) -> None:
    run = subprocess.run(
        help_command(tool),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    for args in tool_commands()[tool]:
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", run.stdout), (tool, flag)


def test_the_readme_dataset_snippet_runs_as_written() -> None:
    (snippet,) = [b for lang, b in FENCE.findall(section("Data: streaming")) if lang == "python"]
    run = subprocess.run(
        [sys.executable, "-c", snippet],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "torch.Size([16, 3, 224, 224])"


def test_bench_help_describes_every_option_with_its_default_before_heavy_imports() -> None:
    for tool in ("tools/bench_tagging.py", "tools/bench_pipeline.py"):
        run = subprocess.run(
            [sys.executable, "-X", "importtime", str(ROOT / tool), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()}
        assert not {"torch", "open_clip"} & imported, tool
        options = re.findall(r"^  (--[\w-]+)", run.stdout, re.MULTILINE)
        assert len(options) >= 4, run.stdout
        described = re.split(r"\n  (?=--)", run.stdout.split("options:", 1)[1])[1:]
        for option, text in zip(options, described, strict=True):
            words = text.split()
            assert len(words) > 2 and "(default:" in text.replace("\n", " "), (tool, option)


def quickstart_command() -> list[str]:
    (words,) = [w for w in shell_commands() if "train.py" in w and "-n" in w]
    return [str(BIN / "composer") if w.endswith("/composer") else w for w in words]


@pytest.mark.slow
def test_the_readme_quickstart_runs_with_its_override_example_and_learns(tmp_path: Path) -> None:
    """The README's command and example overrides on 2 gloo ranks: it finishes and learns.

    The example trains 10 steps (instead of the recipe's 600) at a higher learning rate, with
    CABS-FM; evaluation, a checkpoint and the files a run writes come at the end.
    """
    (example,) = re.findall(r"`\.\.\. ([^`]+)`", section("Quickstart"))
    assert "max_duration=10ba" in example.split()
    folder = tmp_path / "quickstart"
    shorter = [
        "eval_data.interval=10ba",
        "save_interval=10ba",
        "scheduler.t_warmup=0ba",  # a warmup over 10 steps would barely move the weights
        f"loggers.file.filename={tmp_path}/train-rank{{rank}}.log",  # each rank its own
        "loggers.file.capture_stdout=false",
        "loggers.file.capture_stderr=false",
        "loggers.file.flush_interval=1",
    ]
    run = subprocess.run(
        [*quickstart_command(), *example.split(), *shorter, f"run_folder={tmp_path}/{{run_name}}"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert "run quickstart: 10 steps" in output
    assert "selection.options.concept_cap belongs to policy diversity" in output
    assert "zeroshot/top1_accuracy" in output and "(chance 0.05)" in output
    for noise in ("Traceback", "resource_tracker", "No pretrained weights", "Train cabs/"):
        assert noise not in output, noise
    lines = [line for line in output.replace("\r", "\n").splitlines() if line.strip()]
    assert len([line for line in lines if not line.startswith("train quickstart")]) < 40, output
    assert (folder / "summary.json").is_file()

    # Every step keeps the global batch, half on each rank, no sample on both.
    steps = [json.loads(line) for line in (folder / "selection.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(10))
    half = load_config(ROOT / "yamls" / "quickstart.yaml").global_train_batch_size // 2
    for step in steps:
        rank0, rank1 = step["keys"]
        assert len(rank0) == len(rank1) == half and not set(rank0) & set(rank1)
    # It learns: the loss of the last steps is below that of the first ones.
    pattern = r"\[metric\]\[batch=\d+\]: loss/train/total: ([0-9.]+)"
    losses = [float(v) for v in re.findall(pattern, (tmp_path / "train-rank0.log").read_text())]
    assert len(losses) == 10
    assert sum(losses[-3:]) < sum(losses[:3])
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics) >= {"zeroshot/top1_accuracy", "retrieval/mean_recall"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert list((folder / "checkpoints").glob("ep*-ba10-rank0.pt"))


@pytest.mark.slow
def test_a_config_error_under_the_launcher_is_printed_once_with_status_2(tmp_path: Path) -> None:
    run = subprocess.run(
        [*quickstart_command(), "max_duraton=2ba", f"run_folder={tmp_path}/{{run_name}}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 2, output
    assert output.count("config error: unknown config key(s) max_duraton; did you mean") == 1
    assert "Traceback" not in output
