"""MLflow as its users expect: the experiment is marked as model training, the final model is an MLflow Model
(pyfunc generates what `wmtp generate` prints, pytorch loads the network), the recipe can register it, and a CLI
run without a Prefect UI carries no broken link to one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import WMTP, wmtp_environment
from support.hf_models import HF_OVERRIDES
from support.recipes import TINY_OVERRIDES
from support.training import plan_and_train

from tracking import artifacts
from tracking import client as tracking
from wmtp_core.recipes import load_recipe

pytestmark = pytest.mark.slow
PROMPT = "def add(a, b):"
REGISTERED = "wmtp-tiny"

# Run in a fresh interpreter: what someone who only has the run id (or the registered name) does.
LOAD_BY_MLFLOW = """
import json, sys
import mlflow.pyfunc, mlflow.pytorch, torch
uri, registered, prompt = sys.argv[1:]
pyfunc = mlflow.pyfunc.load_model(uri)
network = mlflow.pytorch.load_model(uri)
print(json.dumps({
    "completion": pyfunc.predict([prompt], params={"max_new_tokens": 16})[0],
    "registered": mlflow.pyfunc.load_model(registered).predict([prompt], params={"max_new_tokens": 16})[0],
    "logits_shape": list(network(torch.tensor([[5, 6, 7]])).shape),
    "input_example": pyfunc.input_example,
    "params": [p.name for p in pyfunc.metadata.signature.params.params],
}))
"""


def _wmtp(args: list[str], home: Path) -> dict:
    """`wmtp ARGS --json` with its own temporary Prefect server (a plain CLI run); its JSON summary."""
    out = subprocess.run(
        [WMTP, *args, "--json"], env=wmtp_environment(home), capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _load_by_mlflow(uri: str, registered: str, home: Path) -> dict:
    env = {**wmtp_environment(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    out = subprocess.run(
        [sys.executable, "-c", LOAD_BY_MLFLOW, uri, registered, PROMPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cli_run_logs_a_registered_mlflow_model_that_generates_as_wmtp_generate(wmtp_home):
    recipe_sets = [f"--set={s}" for s in [*TINY_OVERRIDES, f"tracking.register_model={REGISTERED}"]]
    summary = _wmtp(["train", *recipe_sets], wmtp_home)
    run_id = summary["mlflow_run_id"]
    generated = _wmtp(["generate", summary["run_name"], "--prompt", PROMPT, "--max-new-tokens", "16"], wmtp_home)

    loaded = _load_by_mlflow(f"runs:/{run_id}/final_model", f"models:/{REGISTERED}/1", wmtp_home)

    assert loaded["completion"] == generated["completion"]
    assert loaded["registered"] == generated["completion"]
    assert loaded["logits_shape"] == [1, 3, 2, 259]  # tokens_BT -> logits_BTKV of the tiny model (horizon 2)
    assert loaded["input_example"] == [PROMPT]
    assert loaded["params"] == ["max_new_tokens", "temperature", "top_p", "seed", "heads"]
    mlflow = tracking.client()
    run = mlflow.get_run(run_id)
    assert "prefect.flow_run_id" in run.data.tags
    assert "prefect.flow_run_url" not in run.data.tags  # the CLI's temporary server has no UI to link to
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING_KIND
    # Uploading again (a retry, `wmtp upload`) registers no second version of the same step.
    assert artifacts.register_final_model(run_id, Path(summary["run_dir"])) == "1"
    assert [str(v.version) for v in mlflow.search_model_versions(f"name='{REGISTERED}'")] == ["1"]


def test_experiment_made_before_the_kind_tag_is_marked_as_model_training(wmtp_home, tiny_recipe, tmp_path):
    mlflow = tracking.client()
    experiment_id = mlflow.create_experiment(tiny_recipe.tracking.experiment)
    (tmp_path / "run").mkdir()

    tracking.open_tracking_run(tiny_recipe, tmp_path / "run", run_name="tiny", extra_tags={})

    tags = mlflow.get_experiment(experiment_id).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING_KIND


def test_hf_final_model_pyfunc_generates_as_the_checkpoint_does(tmp_path, hf_model_dirs, wmtp_home):
    from tracking.mlflow_model import add_mlflow_model
    from wmtp_core.checkpoint.final_model import load_checkpoint_model, write_final_model
    from wmtp_core.generation.generate import generate
    from wmtp_core.generation.settings import SamplingSettings

    recipe = load_recipe(None, [*HF_OVERRIDES, f"model.path={hf_model_dirs['gpt2']}", "train.max_steps=2"])
    checkpoint = Path(plan_and_train(recipe, tmp_path / "run").latest_checkpoint)
    model_dir = tmp_path / "final_model"
    model_dir.mkdir()
    write_final_model(checkpoint, model_dir)
    add_mlflow_model(model_dir)
    model, tokenizer = load_checkpoint_model(checkpoint)
    [expected], _ = generate(model, tokenizer, [PROMPT], SamplingSettings(max_new_tokens=16))

    loaded = _load_by_mlflow(str(model_dir), str(model_dir), wmtp_home)

    assert loaded["completion"] == expected.text
    assert loaded["logits_shape"][:3] == [1, 3, 3]  # gpt2 trunk, horizon 3
