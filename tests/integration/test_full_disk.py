"""A save that meets a full disk, on a real one (a small tmpfs mounted for the test; the sessions and CI run as root):
one clear `error:` line naming the directory and the space needed, no traceback, no retry into the same full disk,
nothing left behind, the newest checkpoint intact; and once space is freed, the run resumes. A save killed by
SIGKILL leaves its staging directory, which the next trainer of the run removes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.cli import WMTP, run_wmtp_json, wmtp_environment
from support.recipes import TINY_OVERRIDES

from wmtp_core.checkpoint.manifest import list_checkpoints, verify_checkpoint
from wmtp_core.layout import RunLayout

pytestmark = pytest.mark.slow
NO_TRACKING = ["--set", "tracking.enabled=false"]


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs, unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def _settings(*keys: str) -> list[str]:
    return [arg for key in [*TINY_OVERRIDES, *keys] for arg in ("--set", key)]


def _fill(disk: Path, *, leave: int) -> Path:
    """A file taking all but `leave` bytes of the disk's free space."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with filler.open("wb") as out:
        out.truncate(0)
        out.write(b"\0" * max(0, free - leave))  # written, not sparse: tmpfs counts only written pages
    return filler


def test_a_save_on_a_full_disk_fails_once_with_one_line_and_the_run_resumes_once_space_is_freed(
    small_disk, prefect_api_url
):
    home = small_disk / "home"
    out, summary = run_wmtp_json(
        ["train", *_settings("run.name=full"), *NO_TRACKING], home=home, api_url=prefect_api_url
    )
    assert out.returncode == 0, out.stderr[-3000:]
    layout = RunLayout(home / "runs" / "full")
    checkpoint_bytes = sum(f.stat().st_size for f in layout.checkpoint(4).rglob("*") if f.is_file())
    filler = _fill(small_disk, leave=checkpoint_bytes // 3)

    out, _ = run_wmtp_json(
        ["resume", "full", "--set", "train.max_steps=8", *NO_TRACKING], home=home, api_url=prefect_api_url
    )
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1, out.stderr[-3000:]
    assert len(errors) == 1 and "no space left for the checkpoint of step 6" in errors[0], out.stderr[-3000:]
    assert str(layout.checkpoints) in errors[0] and "MiB free" in errors[0]
    assert "Traceback" not in out.stderr and "AwaitingRetry" not in out.stderr  # and no retry into the full disk
    assert [p.name for p in layout.checkpoints.iterdir() if p.name.startswith(".")] == []  # no staging left
    assert [c.step for c in list_checkpoints(layout.root)] == [2, 4]
    verify_checkpoint(layout.checkpoint(4))  # the newest checkpoint is intact
    json.loads(layout.summary.read_text())  # whole, whichever run wrote it

    filler.unlink()
    out, summary = run_wmtp_json(
        ["resume", "full", "--set", "train.max_steps=8", *NO_TRACKING], home=home, api_url=prefect_api_url
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (summary["status"], summary["steps"], summary["resumed_from_step"]) == ("completed", 8, 4)


def test_the_staging_directory_of_a_save_killed_by_sigkill_is_removed_by_the_next_trainer(tmp_path, prefect_api_url):
    """A model big enough that a save takes a while; the training process group is killed while a staging
    directory exists, then `wmtp resume` finishes the run with none left."""
    home = tmp_path / "home"
    bigger = ["model.d_model=192", "model.num_layers=3", "model.num_heads=4", "train.save_every=1"]
    train = subprocess.Popen(
        [WMTP, "train", *_settings("run.name=killed", "train.max_steps=40", *bigger), *NO_TRACKING],
        env=wmtp_environment(home, api_url=prefect_api_url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    layout = RunLayout(home / "runs" / "killed")
    try:
        deadline = time.monotonic() + 300
        while not (layout.checkpoint(1) / "manifest.json").is_file():  # one to resume from, then a save in progress
            assert train.poll() is None and time.monotonic() < deadline, "training ended before its first save"
            time.sleep(0.05)
        while not _staging_dirs(layout):
            assert train.poll() is None and time.monotonic() < deadline, "no save was caught in progress"
            time.sleep(0.002)
        os.killpg(train.pid, signal.SIGKILL)
    finally:
        train.wait()
    assert _staging_dirs(layout)  # what the killed save left

    one_more = max(c.step for c in list_checkpoints(layout.root) if c.valid) + 1
    resume = ["resume", "killed", "--set", f"train.max_steps={one_more}", *NO_TRACKING]
    out, summary = run_wmtp_json(resume, home=home, api_url=prefect_api_url)
    assert out.returncode == 0, out.stderr[-3000:]
    assert summary["status"] == "completed" and _staging_dirs(layout) == []


def _staging_dirs(layout: RunLayout) -> list[Path]:
    return sorted(layout.checkpoints.glob(".tmp-*")) if layout.checkpoints.is_dir() else []
