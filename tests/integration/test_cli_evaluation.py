"""`wmtp evaluate --completions` scores completions produced elsewhere without a model or Prefect, `wmtp generate`
continues a prompt with a run's model, and both refuse bad input with exit 2 (in this process: no server needed)."""

from __future__ import annotations

import json

import pytest
from support.recipes import TINY_OVERRIDES
from support.training import plan_and_train
from typer.testing import CliRunner

from deployments.cli import app
from wmtp_core.evaluation.problems import humaneval_problems
from wmtp_core.recipes import load_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def home_with_a_run(tmp_path_factory):
    """A $WMTP_HOME holding run `gen`: the tiny recipe trained 4 steps (once for the module)."""
    home = tmp_path_factory.mktemp("wmtp-home")
    recipe = load_recipe(None, [*TINY_OVERRIDES, "run.name=gen"])
    run_dir = home / "runs" / "gen"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(json.dumps(recipe.model_dump(mode="json")))
    plan_and_train(recipe, run_dir)
    return home


@pytest.fixture
def trained(home_with_a_run, monkeypatch):
    monkeypatch.setenv("WMTP_HOME", str(home_with_a_run))
    return "gen"


def test_completions_from_elsewhere_score_in_the_sandbox(tmp_path, wmtp_home):
    samples = tmp_path / "samples.jsonl"
    problems = humaneval_problems()[:4]
    lines = [{"task_id": p.task_id, "completion": p.canonical_solution} for p in problems[:3]]
    lines.append({"task_id": problems[3].task_id, "completion": "    pass\n"})
    samples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = runner.invoke(app, ["evaluate", "--completions", str(samples), "--benchmark", "humaneval", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.splitlines()[-1])["pass_at_k"] == {"1": 0.75}


def test_generate_continues_a_prompt_with_the_runs_model(trained):
    out = runner.invoke(
        app, ["generate", trained, "--prompt", "def f(", "--max-new-tokens", "6", "--heads", "2", "--json"]
    )
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["checkpoint"].endswith("step_00000004") and 1 <= result["tokens"] <= 6
    assert len(result["acceptance_per_head"]) == 1


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["evaluate"], "name the RUN"),
        (["evaluate", "gen", "--completions", "x.jsonl"], "not both"),
        (["evaluate", "gen", "--step", "3"], "--step 3"),
        (["evaluate", "gen", "--heads", "5"], "evaluation.heads (5) exceeds model.horizon (2)"),
        (["evaluate", "--completions", "missing.jsonl"], "missing.jsonl"),
        (["generate", "gen", "--prompt", "x", "--heads", "5"], "heads=5"),
        (["generate", "nope", "--prompt", "x"], "'nope' does not exist"),
    ],
)
def test_bad_evaluation_input_exits_2_naming_what_to_change(trained, args, named):
    out = runner.invoke(app, args)
    assert out.exit_code == 2, out.output
    assert named in out.output
