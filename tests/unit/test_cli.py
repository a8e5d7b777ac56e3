"""The `wmtp` CLI contract for invalid input: exit 2, one line naming the field or file, nothing written."""

from __future__ import annotations

import json

import pytest
import yaml
from support import ROOT
from typer.testing import CliRunner

from deployments.cli import app
from wmtp_core.checkpoint.storage import save_checkpoint
from wmtp_core.recipes import load_recipe

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["train", "--set", "train.lr=-1"], "train.lr"),
        (["train", "--set", "train.nope=1"], "train.nope"),
        (["train", "--set", "train.algorithm=magic"], "train.algorithm"),
        (["train", "--set", "model.horizon=0"], "model.horizon"),
        (["train", "--set", "train.keep_last=1"], "train.keep_last"),
        (["train", "--set", "run.name=../escape"], "run.name"),
        (["train", "--set", "notakeyvalue"], "dotted.key=value"),
        (["train", "--recipe", "missing.yaml"], "missing.yaml"),
        (["resume", "no-such-run"], "no-such-run"),
        (["checkpoints", "../etc"], "../etc"),
    ],
)
def test_invalid_input_exits_2_naming_the_field_and_writes_nothing(wmtp_home, args, named):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(wmtp_home.iterdir()) == []


def test_unknown_verify_stage_is_invalid_input(wmtp_home):
    result = runner.invoke(app, ["verify", "--stage", "p4"])
    assert result.exit_code == 2 and "p4" in result.output


def test_malformed_data_line_exits_2_naming_file_and_line(wmtp_home, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "t", "code": "c", "test_list": []}\n{"text": oops}\n')
    result = runner.invoke(app, ["train", "--set", f"data.path={data}"])
    assert result.exit_code == 2
    assert f"{data}:2" in result.output
    assert list(wmtp_home.iterdir()) == []


def test_training_an_existing_run_name_asks_for_resume(wmtp_home):
    save_checkpoint(wmtp_home / "runs" / "taken", step=1, model_state={}, train_state={}, manifest_extra={})
    result = runner.invoke(app, ["train", "--set", "run.name=taken"])
    assert result.exit_code == 2
    assert "wmtp resume taken" in result.output


def test_checkpoints_json_lists_step_path_and_validity(wmtp_home):
    run = wmtp_home / "runs" / "listed"
    good = save_checkpoint(run, step=1, model_state={}, train_state={}, manifest_extra={})
    bad = save_checkpoint(run, step=2, model_state={}, train_state={"x": 1}, manifest_extra={})
    (bad / "train_state.pt").write_bytes(b"tampered")
    result = runner.invoke(app, ["checkpoints", "listed", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(r["step"], r["path"], r["valid"]) for r in rows] == [(1, str(good), True), (2, str(bad), False)]


def test_checkpoints_flags_a_format_2_checkpoint_with_one_flipped_byte(wmtp_home):
    import torch

    run = wmtp_home / "runs" / "flipped"
    save_checkpoint(run, step=1, model_state={"w": torch.ones(8)}, train_state={}, manifest_extra={})
    bad = save_checkpoint(run, step=2, model_state={"w": torch.ones(8)}, train_state={}, manifest_extra={})
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-3] ^= 0x10  # same size: only the digest can tell
    (bad / "model.safetensors").write_bytes(bytes(data))
    result = runner.invoke(app, ["checkpoints", "flipped"])
    assert result.exit_code == 0
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().split()[:1] in (["1"], ["2"])]
    assert [row[:2] for row in rows] == [["1", "valid"], ["2", "INVALID"]]
    assert "(blake3 digest)" in result.stdout


@pytest.mark.parametrize("recipe", sorted(ROOT.glob("configs/*.yaml")))
def test_example_recipes_load_and_are_complete(recipe):
    raw = yaml.safe_load(recipe.read_text())
    loaded = load_recipe(recipe)
    assert raw == loaded.model_dump(mode="json")  # flat and complete: every key written out


def test_checkpoints_convert_turns_a_sharded_checkpoint_into_the_full_format(wmtp_home, tiny_recipe):
    import torch
    from safetensors.torch import load_file
    from support.training import plan_and_train

    from wmtp_core.checkpoint.storage import load_checkpoint

    recipe = tiny_recipe.model_copy(
        update={"checkpoint": tiny_recipe.checkpoint.model_copy(update={"format": "sharded"})}
    )
    run = wmtp_home / "runs" / "sharded"
    plan_and_train(recipe, run)
    step = run / "checkpoints" / "step_00000004"
    assert not (step / "model.safetensors").exists() and (step / "sharded" / ".metadata").exists()
    result = runner.invoke(app, ["checkpoints", "sharded", "--convert", "4"])
    assert result.exit_code == 0, result.output
    model_state, train_state, manifest = load_checkpoint(step)
    assert manifest["format"] == "full" and not (step / "sharded").exists()
    assert set(model_state) == set(load_file(step / "model.safetensors")) and "token_embedding.weight" in model_state
    assert set(train_state["optimizer"]["state"]) >= {"token_embedding.weight"}
    assert torch.is_tensor(train_state["optimizer"]["state"]["token_embedding.weight"]["exp_avg"])
    again = runner.invoke(app, ["checkpoints", "sharded", "--convert", "4"])
    assert again.exit_code == 2 and "already in the full format" in again.output


def test_resume_hands_the_verification_to_the_flow_and_hashes_nothing_itself(wmtp_home, monkeypatch):
    from support.hashing import HashedBytes

    from deployments.cli import _resume_recipe

    run = wmtp_home / "runs" / "resumable"
    save_checkpoint(run, step=1, model_state={}, train_state={}, manifest_extra={})
    (run / "recipe.yaml").write_text(yaml.safe_dump(load_recipe(None, ["run.name=resumable"]).model_dump(mode="json")))
    hashed = HashedBytes(monkeypatch)
    assert _resume_recipe("resumable", []).run.name == "resumable"
    assert hashed.total == 0 and hashed.files == []
