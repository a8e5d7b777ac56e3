"""The habits users bring from other CLIs: -h, --version, --name/-n and --experiment, printing the resolved recipe,
help text on every argument, shell completion of run names, and progress bars on long commands."""

from __future__ import annotations

import os
import subprocess

import typer
import yaml
from support.cli import WMTP
from typer.testing import CliRunner

from deployments.cli import app

runner = CliRunner()


def test_dash_h_is_help_on_the_app_and_every_command():
    assert "Usage: wmtp" in runner.invoke(app, ["-h"], prog_name="wmtp").output
    for command in ("train", "resume", "checkpoints", "upload", "serve"):
        assert runner.invoke(app, [command, "-h"]).exit_code == 0, command


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("wmtp 0.")


def test_name_and_experiment_shortcuts_reach_the_resolved_recipe(wmtp_home):
    result = runner.invoke(app, ["train", "-n", "short", "--experiment", "team-x", "--print-recipe"])
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load(result.output)
    assert recipe["run"]["name"] == "short" and recipe["tracking"]["experiment"] == "team-x"
    assert not (wmtp_home / "runs").exists()  # printed, not run


def test_print_recipe_applies_overrides_and_still_refuses_bad_input(wmtp_home):
    result = runner.invoke(app, ["train", "--set", "train.max_steps=700", "--print-recipe"])
    assert yaml.safe_load(result.output)["train"]["max_steps"] == 700
    assert runner.invoke(app, ["train", "--set", "train.lr=-1", "--print-recipe"]).exit_code == 2


def test_every_argument_and_option_has_help_text():
    missing = [
        f"{name} {param.name}"
        for name, command in typer.main.get_command(app).commands.items()
        for param in command.params
        if not getattr(param, "help", None)
    ]
    assert missing == []


def test_shell_completion_offers_the_runs_under_wmtp_home(wmtp_home):
    for name in ("alpha-1", "alpha-2", "beta"):
        (wmtp_home / "runs" / name).mkdir(parents=True)
    env = {**os.environ, "_WMTP_COMPLETE": "complete_bash", "COMP_WORDS": "wmtp resume al", "COMP_CWORD": "2"}
    out = subprocess.run([WMTP], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["alpha-1", "alpha-2"], out.stderr[-2000:]


def test_progress_bars_draw_one_bar_per_description_on_stderr(capsys):
    from deployments.progress_bars import byte_progress_bars

    with byte_progress_bars() as on_progress:
        for done in (1000, 2000, 3000):
            on_progress("uploading checkpoints", done, 3000)
        on_progress("uploading the final model", 500, 500)
    drawn = capsys.readouterr()
    assert drawn.out == ""  # stdout stays for --json
    assert "uploading checkpoints" in drawn.err and "3.0/3.0 kB" in drawn.err
    assert "uploading the final model" in drawn.err
