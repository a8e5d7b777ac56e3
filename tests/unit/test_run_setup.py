"""Where a run starts from (tasks.run_setup.start_checkpoint): a new run refuses a name that has checkpoints, and a
resume takes the run's newest valid checkpoint (latest, its step or its path) or another run's checkpoint directory."""

from __future__ import annotations

import json

import pytest

from tasks.run_setup import start_checkpoint
from wmtp_core.checkpoint.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    CheckpointError,
    describe_files,
    step_dir_name,
)


def _fake_checkpoints(run_dir, steps):
    """Step directories whose manifests verify (start_checkpoint reads manifests only, never tensors)."""
    for step in steps:
        path = run_dir / "checkpoints" / step_dir_name(step)
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"weights %d" % step)
        manifest = {"format_version": FORMAT_VERSION, "step": step, "files": describe_files(path)}
        (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    return run_dir


def test_a_new_run_refuses_a_name_with_checkpoints_and_latest_needs_one(tmp_path):
    run = _fake_checkpoints(tmp_path / "run", [2, 4])
    with pytest.raises(FileExistsError, match="already has checkpoints; resume it"):
        start_checkpoint("run", run, None)
    assert start_checkpoint("run", run, "latest") == run / "checkpoints" / "step_00000004"
    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        start_checkpoint("empty", tmp_path / "empty", "latest")


def test_a_step_or_path_resume_must_be_the_runs_newest_checkpoint(tmp_path):
    run = _fake_checkpoints(tmp_path / "run", [2, 4])
    assert start_checkpoint("run", run, 4) == run / "checkpoints" / "step_00000004"
    with pytest.raises(FileExistsError, match="up to step 4.*with a new run.name"):
        start_checkpoint("run", run, 2)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        start_checkpoint("run", run, 3)


def test_a_new_run_can_start_from_another_runs_checkpoint_directory(tmp_path):
    source = _fake_checkpoints(tmp_path / "source", [2])
    assert start_checkpoint("branch", tmp_path / "branch", source / "checkpoints" / "step_00000002") == (
        source / "checkpoints" / "step_00000002"
    )
