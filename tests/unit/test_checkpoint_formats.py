"""Manifest formats: format 2 (BLAKE3) is what saves write; a format-1 (sha256) checkpoint written by the code before
it (tests/fixtures/checkpoint_v1) still verifies and resumes bitwise; one flipped byte fails a format-2 checkpoint.
Verify once: a resume hashes the checkpoint it loads once, and a verdict passed along is not hashed again."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from support import ROOT
from support.hashing import HashedBytes
from support.recipes import TINY_OVERRIDES
from support.training import plan_and_train

from wmtp_core.checkpoint.manifest import (
    MANIFEST_FILE,
    checkpoint_bytes,
    latest_valid_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from wmtp_core.checkpoint.storage import MODEL_FILE, STATE_FILE, load_checkpoint, save_checkpoint
from wmtp_core.layout import step_dir_name
from wmtp_core.recipes import load_recipe

FIXTURE = ROOT / "tests" / "fixtures" / "checkpoint_v1"


def _run_with_v1_checkpoint(run_dir):
    shutil.copytree(FIXTURE / "step_00000002", run_dir / "checkpoints" / "step_00000002")
    return run_dir / "checkpoints" / "step_00000002"


def _resume(run_dir, checkpoint) -> tuple[dict[int, float], bytes]:
    """Resume the tiny run from checkpoint to its step 4; its losses per step and its final model file."""
    recipe = load_recipe(None, TINY_OVERRIDES)
    losses = {}
    result = plan_and_train(
        recipe,
        run_dir,
        resume_from=checkpoint,
        on_metrics=lambda step, metrics: losses.update({step: metrics["loss"]} if "loss" in metrics else {}),
    )
    assert result.resumed_from_step == 2 and result.steps == 4
    return losses, (run_dir / "checkpoints" / step_dir_name(4) / MODEL_FILE).read_bytes()


def _flip_one_byte(path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_a_format_1_checkpoint_verifies_with_its_sha256_digests(tmp_path):
    path = _run_with_v1_checkpoint(tmp_path)
    manifest = verify_checkpoint(path)
    assert manifest["format_version"] == 1 and set(manifest["files"][MODEL_FILE]) == {"sha256", "size"}
    assert latest_valid_checkpoint(tmp_path).path == path


def test_a_format_1_checkpoint_resumes_bitwise_as_the_same_state_saved_in_format_2(tmp_path):
    v1 = _run_with_v1_checkpoint(tmp_path / "v1")
    model_state, train_state, manifest = load_checkpoint(v1)
    extra = {k: v for k, v in manifest.items() if k not in ("format_version", "step", "files", "format")}
    v2 = save_checkpoint(
        tmp_path / "v2", step=2, model_state=model_state, train_state=train_state, manifest_extra=extra
    )
    assert json.loads((v2 / MANIFEST_FILE).read_text())["format_version"] == 2
    losses_v1, weights_v1 = _resume(tmp_path / "v1", v1)
    losses_v2, weights_v2 = _resume(tmp_path / "v2", v2)
    assert losses_v1 == losses_v2 and weights_v1 == weights_v2
    # What the uninterrupted run that wrote the fixture did next (on its machine; another CPU may round differently).
    recorded = json.loads((FIXTURE / "continuation.json").read_text())["losses_after_step_2"]
    assert losses_v1 == pytest.approx({int(step): loss for step, loss in recorded.items()}, rel=1e-5)


@pytest.mark.parametrize("name", [MODEL_FILE, STATE_FILE])
def test_a_format_2_checkpoint_with_one_flipped_byte_is_skipped_by_latest(tmp_path, name):
    older = save_checkpoint(tmp_path, step=1, model_state={}, train_state={"x": 1}, manifest_extra={})
    newest = save_checkpoint(
        tmp_path, step=2, model_state={"w": torch.ones(64)}, train_state={"x": torch.ones(64)}, manifest_extra={}
    )
    _flip_one_byte(newest / name, offset=(newest / name).stat().st_size // 2)  # same size, one bit changed
    assert latest_valid_checkpoint(tmp_path).path == older
    listed = list_checkpoints(tmp_path)
    assert [(i.step, i.valid) for i in listed] == [(1, True), (2, False)]
    assert name in listed[1].problem and "blake3" in listed[1].problem


def _five_kept_checkpoints(run_dir):
    recipe = load_recipe(None, [*TINY_OVERRIDES, "train.save_every=1", "train.keep_last=5", "train.max_steps=5"])
    plan_and_train(recipe, run_dir)
    return recipe


@pytest.mark.parametrize("resume", ["latest", "newest path"])
def test_a_resume_hashes_the_checkpoint_it_loads_once_and_nothing_else(tmp_path, monkeypatch, resume):
    """The plan verifies the start checkpoint when it chooses it; loading it does not hash it again."""
    recipe = _five_kept_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / step_dir_name(5)
    hashed = HashedBytes(monkeypatch)
    longer = recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_steps": 6})})
    result = plan_and_train(longer, tmp_path, resume_from="latest" if resume == "latest" else newest)
    assert result.resumed_from_step == 5
    assert hashed.total == checkpoint_bytes(verify_checkpoint(newest)) and set(hashed.files) <= set(newest.iterdir())


def test_checkpoints_verified_earlier_are_not_hashed_again_and_broken_ones_stay_skipped(tmp_path, monkeypatch):
    older = save_checkpoint(tmp_path, step=1, model_state={"w": torch.ones(8)}, train_state={}, manifest_extra={})
    newer = save_checkpoint(tmp_path, step=2, model_state={"w": torch.ones(8)}, train_state={}, manifest_extra={})
    _flip_one_byte(newer / MODEL_FILE, offset=(newer / MODEL_FILE).stat().st_size - 1)
    verdicts = {}
    assert latest_valid_checkpoint(tmp_path, verdicts=verdicts).path == older
    assert verdicts[str(older)] is None and "blake3" in verdicts[str(newer)]
    hashed = HashedBytes(monkeypatch)
    assert latest_valid_checkpoint(tmp_path, verdicts=verdicts).path == older
    assert latest_valid_checkpoint(tmp_path, checksums=False).path == newer  # sizes alone cannot tell
    assert hashed.total == 0
