"""Which checkpoint a run starts from or reads (wmtp_core.run.start.choose_checkpoint, the one place that decides):
a new run refuses a name that has checkpoints, a resume takes the run's newest valid checkpoint (latest, its step or
its path) or another run's checkpoint directory, and a reader (evaluate, generate) may take any valid step."""

from __future__ import annotations

import json

import pytest

from wmtp_core.checkpoint.manifest import FORMAT_VERSION, MANIFEST_FILE, CheckpointError, describe_files
from wmtp_core.layout import RunLayout, step_dir_name
from wmtp_core.run.start import choose_checkpoint


def _fake_checkpoints(run_dir, steps) -> RunLayout:
    """Step directories whose manifests verify (choosing reads manifests and hashes files, never loads tensors)."""
    for step in steps:
        path = run_dir / "checkpoints" / step_dir_name(step)
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"weights %d" % step)
        manifest = {"format_version": FORMAT_VERSION, "step": step, "files": describe_files(path)}
        (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    return RunLayout(run_dir)


def _continue(layout, at):
    return choose_checkpoint(layout, at, continuing=True).checkpoint


def test_a_new_run_refuses_a_name_with_checkpoints_and_latest_needs_one(tmp_path):
    run = _fake_checkpoints(tmp_path / "run", [2, 4])
    with pytest.raises(FileExistsError, match="already has checkpoints; resume it"):
        _continue(run, None)
    start = choose_checkpoint(run, "latest", continuing=True)
    assert (start.checkpoint, start.step) == (run.checkpoint(4), 4)
    with pytest.raises(FileNotFoundError, match="no valid checkpoint.*wmtp checkpoints empty"):
        _continue(RunLayout(tmp_path / "empty"), "latest")
    assert choose_checkpoint(RunLayout(tmp_path / "empty"), "latest", continuing=True, fresh_if_none=True).fresh


def test_a_step_or_path_resume_must_be_the_runs_newest_checkpoint(tmp_path):
    run = _fake_checkpoints(tmp_path / "run", [2, 4])
    assert _continue(run, 4) == run.checkpoint(4)
    with pytest.raises(FileExistsError, match="up to step 4.*with a new run.name"):
        _continue(run, 2)
    with pytest.raises(CheckpointError, match="resume 3: .*no manifest.json"):
        _continue(run, 3)


def test_a_new_run_can_start_from_another_runs_checkpoint_directory(tmp_path):
    source = _fake_checkpoints(tmp_path / "source", [2])
    start = choose_checkpoint(RunLayout(tmp_path / "branch"), source.checkpoint(2), continuing=True)
    assert (start.checkpoint, start.step) == (source.checkpoint(2), 2)


def test_a_reader_takes_any_valid_step_and_names_its_option_when_one_is_missing(tmp_path):
    run = _fake_checkpoints(tmp_path / "run", [2, 4])
    assert choose_checkpoint(run, 2, continuing=False).checkpoint == run.checkpoint(2)
    assert choose_checkpoint(run, None, continuing=False).checkpoint == run.checkpoint(4)
    with pytest.raises(CheckpointError, match=r"--step 3: .*\(see `wmtp checkpoints run`\)"):
        choose_checkpoint(run, 3, continuing=False, option="--step")


def test_a_tampered_newest_checkpoint_is_skipped_for_the_one_before(tmp_path):
    run = _fake_checkpoints(tmp_path / "run", [2, 4])
    (run.checkpoint(4) / "model.safetensors").write_bytes(b"weights 5")  # same size, other bytes
    assert choose_checkpoint(run, "latest", continuing=False).step == 2
