"""Each algorithm trains a Hugging Face trunk (tiny Llama / GPT-2 built locally) through the wmtp-train flow,
resumes through wmtp-resume, and the checkpoint's hf/ export loads with transformers and predicts as the trained
model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from support.hf_models import HF_OVERRIDES
from transformers import AutoModelForCausalLM

from flows.resume import wmtp_resume
from flows.train import wmtp_train
from tracking.client import tracking_uri
from wmtp_core.models.hf import HF_EXPORT_DIR, load_hf_mtp_model
from wmtp_core.recipes import load_recipe

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("kind", "settings"),
    [
        ("gpt2", ["train.algorithm=baseline-mtp"]),
        ("llama", ["train.algorithm=critic-wmtp", "critic.pretrain_steps=3", "tracking.enabled=false"]),
        ("llama", ["train.algorithm=rho1-wmtp", "rho1.reference_hf_model={llama-seed-1}", "tracking.enabled=false"]),
        ("gpt2", ["train.algorithm=rho1-wmtp", "rho1.reference_steps=2", "tracking.enabled=false"]),
    ],
    ids=["baseline-gpt2", "critic-llama", "rho1-hf-reference-llama", "rho1-brief-reference-gpt2"],
)
def test_algorithm_trains_resumes_and_exports_a_trunk_transformers_loads(
    wmtp_home, hf_model_dirs, prefect_api_url, kind, settings, tmp_path
):
    settings = [s.format(**{k: str(v) for k, v in hf_model_dirs.items()}) for s in settings]
    recipe = load_recipe(None, [*HF_OVERRIDES, f"model.path={hf_model_dirs[kind]}", *settings, "run.name=hf"])
    first = wmtp_train(recipe=recipe, return_state=True)
    assert first.is_completed(), first.message
    resumed = wmtp_resume(run_name="hf", target_steps=6, return_state=True)
    assert resumed.is_completed(), resumed.message
    summary = json.loads((wmtp_home / "runs" / "hf" / "summary.json").read_text())
    assert (summary["status"], summary["resumed_from_step"], summary["steps"]) == ("completed", 4, 6)
    checkpoint = Path(summary["latest_checkpoint"])
    _assert_export_predicts_as_the_checkpoint(checkpoint, hf_model_dirs[kind], critic="critic" in settings[0])
    if recipe.tracking.enabled:  # the export travels with the checkpoint to MLflow, and is the final model
        mlflow = MlflowClient(tracking_uri())
        uploaded = mlflow.list_artifacts(summary["mlflow_run_id"], f"checkpoints/{checkpoint.name}/hf")
        assert f"checkpoints/{checkpoint.name}/hf/model.safetensors" in {a.path for a in uploaded}
        final = Path(mlflow.download_artifacts(summary["mlflow_run_id"], "final_model", str(tmp_path / "final")))
        assert (final / "mtp_heads.safetensors").is_file()
        _assert_export_predicts_as_the_checkpoint(checkpoint, hf_model_dirs[kind], critic=False, export=final)


def _assert_export_predicts_as_the_checkpoint(
    checkpoint: Path, original: Path, *, critic: bool, export: Path | None = None
) -> None:
    """The checkpoint's hf/ export (or the given export of it) predicts as the checkpoint's model, every head."""
    export = export or checkpoint / HF_EXPORT_DIR
    trained = load_hf_mtp_model(str(original), horizon=3, max_seq_len=64, with_value_head=critic).eval()
    trained.load_state_dict(load_file(checkpoint / "model.safetensors"))
    exported = AutoModelForCausalLM.from_pretrained(export).eval()
    every_head = load_hf_mtp_model(str(export), horizon=3, max_seq_len=64).eval()
    tokens_BT = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_BTKV = trained(tokens_BT)
        torch.testing.assert_close(exported(input_ids=tokens_BT).logits, expected_BTKV[:, :, 0])
        torch.testing.assert_close(every_head(tokens_BT), expected_BTKV)
    original_lm = AutoModelForCausalLM.from_pretrained(original).eval()
    with torch.no_grad():  # training changed the trunk: the export is not the model it started from
        assert not torch.allclose(original_lm(input_ids=tokens_BT).logits, expected_BTKV[:, :, 0])
