"""The recipe schema: every mistake a recipe or an override can hold is a ``ConfigError`` at
start-up, before torch, Composer or open_clip are imported, naming the key and what to write.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from paths import ROOT

from cabs_streaming.config import ConfigError, format_run_path, load_config, policy_options

QUICKSTART = ROOT / "yamls" / "quickstart.yaml"
PUBLISHED = sorted((ROOT / "yamls" / "published").glob("*.yaml"))


def error_of(*overrides: str, recipe: Path = QUICKSTART) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(recipe, list(overrides))
    return str(err.value)


def test_every_shipped_recipe_validates() -> None:
    for recipe in [QUICKSTART, *PUBLISHED]:
        load_config(recipe)


def test_a_misspelt_key_suggests_the_close_one_instead_of_listing_all() -> None:
    message = error_of("max_duraton=10ba")
    assert message == "unknown config key(s) max_duraton; did you mean 'max_duration'?"
    assert "did you mean 'selection.policy'?" in error_of("selection.polcy=iid")


def test_a_key_with_no_close_match_lists_the_valid_ones() -> None:
    message = error_of("foo=1")
    assert message.startswith("unknown config key(s) foo (valid keys: model, train_data,")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("selection.policy=foo", "selection.policy='foo' is not a policy (policies: iid,"),
        ("selection.policy=diversty", "did you mean 'diversity'?"),
        ("selection.options.concept_capp=3", "unknown option selection.options.concept_capp;"),
        ("selection.options.concept_cap=0", "concept_cap must be a positive int"),
        ("optimizer.betas=[0.9]", "optimizer.betas must be two numbers in [0, 1)"),
        ("optimizer.betas=[0.9,1.5]", "optimizer.betas must be two numbers in [0, 1)"),
        ("optimizer.lr=-1", "optimizer.lr and optimizer.eps must be > 0"),
        ("max_duration=abc", "max_duration='abc' is not a time"),
        ("max_duration=0.5dur", "max_duration='0.5dur' is not a time"),
        ("max_duration=1.5ba", "ba counts must be whole numbers"),
        ("save_interval=4epochs", "save_interval='4epochs' is not a time"),
        ("eval_data.interval=x", "eval_data.interval='x' is not a time"),
        ("scheduler.t_warmup=10", "scheduler.t_warmup=10 is not a time: write a number and"),
        ("status_interval=2ep", "status_interval='2ep' is not a time"),
        ("precision=fp33", "precision='fp33' is not valid; did you mean 'fp32'?"),
        ("device=cuda", "device='cuda' is not valid"),
        ("loggers.files.filename=x", "unknown logger loggers.files; did you mean 'file'?"),
        ("train_data.caption=recap", "train_data.caption='recap': use caption, recaption"),
        ("decode.threads=0", "decode.threads must be >= 1"),
        ("optimizer.betas=[0.9", "override 'optimizer.betas=[0.9': expected ','"),
        ("optimizer.lr", "override 'optimizer.lr' is not key=value"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_key(override: str, expected: str) -> None:
    assert expected in error_of(override)


def test_yaml_mistakes_name_the_file_and_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: 1\noptimizer:\n  betas: [0.9, 0.98\n  lr: 1e-3\n")
    assert error_of(recipe=broken).startswith(f"{broken}:4:5: expected ',' or ']'")
    duplicate = tmp_path / "duplicate.yaml"
    duplicate.write_text(QUICKSTART.read_text() + "\nmax_duration: 3ba\n")
    message = error_of(recipe=duplicate)
    assert message.startswith(f"{duplicate}:")
    assert "found duplicate key max_duration" in message


def test_a_recipe_path_that_is_a_folder_names_recipes_in_it() -> None:
    folder = ROOT / "yamls" / "published"
    message = error_of(recipe=folder)
    assert message.startswith(f"{folder} is a folder; name a recipe file such as ")
    assert str(PUBLISHED[0]) in message


def test_switching_policy_keeps_the_options_of_each_policy_to_itself() -> None:
    # The quickstart sets CABS-DM's concept_cap; the README's override switches to CABS-FM.
    cfg = load_config(QUICKSTART, ["selection.policy=frequency"])
    owners = {"concept_cap": ["diversity", "mixed"]}
    assert policy_options(cfg.selection) == ({}, owners)
    cfg = load_config(QUICKSTART, ["selection.policy=iid"])
    assert policy_options(cfg.selection) == ({}, owners)
    cfg = load_config(QUICKSTART)
    cap = cfg.selection.options["concept_cap"]  # the recipe's own value, whatever it is tuned to
    assert policy_options(cfg.selection) == ({"concept_cap": cap}, {})


def test_run_paths_follow_the_effective_run_name() -> None:
    cfg = load_config(QUICKSTART, ["run_name=other"])
    assert format_run_path(cfg.run_folder, "other", None) == "./runs/other"
    assert format_run_path(cfg.selection.selection_log, "other", cfg.run_folder) == (
        "./runs/other/selection.jsonl"
    )
    assert format_run_path(cfg.save_folder, "other", cfg.run_folder) == "./runs/other/checkpoints"
    # Composer's own placeholders are left for Composer to fill.
    assert format_run_path("s3://b/{run_name}/ep{epoch}", "r", None) == "s3://b/r/ep{epoch}"


def test_a_config_error_exits_2_before_the_heavy_stack_is_imported() -> None:
    """No torch, Composer or open_clip behind a config error: it comes in about a second."""
    probe = textwrap.dedent(
        f"""
        import sys
        from cabs_streaming.train import main
        status = main([{str(QUICKSTART)!r}, "max_duraton=10ba"])
        heavy = [m for m in ("torch", "composer", "open_clip", "streaming") if m in sys.modules]
        print(status, heavy)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.stdout.strip() == "2 []", run.stdout + run.stderr
    assert run.stderr == (
        "config error: unknown config key(s) max_duraton; did you mean 'max_duration'?\n"
    )
