"""One `wmtp resume` decides each thing once (issue 25): counted over the whole process tree (the CLI, the flow it
runs, every torchrun rank) with strace for the files opened and a start-up hook for the calls
(tests/support/call_counts).

The run has 5 kept checkpoints and a user data file; tracking is off, so what is counted is planning and training
(an upload lists the run's checkpoints once more, to send what MLflow is owed). An open counts when our code opens a
file (Python and Rust open with O_CLOEXEC); the second open that safetensors' zero-copy load and torch.load(mmap=True)
make of a file they are already reading, to map it, is not counted as another read of it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from support import ROOT
from support.cli import WMTP, wmtp_environment
from support.torchrun import torchrun_worker

from wmtp_core.data.records import builtin_dataset_path
from wmtp_core.layout import RunLayout
from wmtp_core.recipes import TINY_MODEL, load_recipe

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt-get install strace)"),
]

KEPT = 5
_OPEN = re.compile(r'^(\d+) +open(?:at)?\((?:AT_FDCWD|\d+), "([^"]+)", ([A-Z_|]+O_CLOEXEC[A-Z_|]*)[^)]*\) = \d+')


def _run_with_five_checkpoints(home: Path, name: str, *extra: str) -> RunLayout:
    """A run of 5 steps saving at each (all 5 kept), trained on a user data file."""
    data = home / "user-data.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(builtin_dataset_path().read_text().splitlines(keepends=True)[:64]))
    overrides = [*TINY_MODEL, f"run.name={name}", f"data.path={data}", "tracking.enabled=false"]
    overrides += ["train.max_steps=5", "train.save_every=1", f"train.keep_last={KEPT}", "train.eval_every=100"]
    overrides += ["train.warmup_steps=1", "train.eval_batches=1", *extra]
    recipe = load_recipe(None, overrides)
    layout = RunLayout(home / "runs" / name)
    torchrun_worker(recipe, layout.root)
    assert len(list(layout.checkpoints.glob("step_*"))) == KEPT
    return layout


def _counted_resume(layout: Path, home: Path, api_url: str, tmp_path: Path) -> tuple[Counter, Counter]:
    """(calls by function over every process, successful opens by path) of `wmtp resume` to step 6."""
    counts_dir, trace = tmp_path / "calls", tmp_path / "strace.log"
    counts_dir.mkdir()
    env = wmtp_environment(home, api_url=api_url)
    env["WMTP_CALL_COUNTS"] = str(counts_dir)
    env["PYTHONPATH"] = f"{ROOT / 'tests' / 'support' / 'call_counts'}:{env.get('PYTHONPATH', '')}"
    command = ["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", str(trace)]
    command += [WMTP, "resume", layout.name, "--set", "train.max_steps=6"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    calls = Counter()
    for written in counts_dir.glob("*.json"):
        calls.update(json.loads(written.read_text()))
    opens = Counter()
    for line in trace.read_text().splitlines():
        if (match := _OPEN.match(line)) is not None:
            opens[(match.group(2), "O_DIRECTORY" in match.group(3))] += 1
    return calls, opens


def _assert_decided_once(layout: RunLayout, data: Path, calls: Counter, opens: Counter, *, ranks: int = 1) -> None:
    """ranks: the processes that load the checkpoint; each opens a file of it once, after the planner's verify."""
    start = layout.checkpoint(KEPT)
    listings = opens[(str(layout.checkpoints), True)]
    assert calls["wmtp_core.fixplan.gates.resolve_gates"] == 1, calls
    device_plans = ("wmtp_core.runtime.devices.plan_devices", "wmtp_core.fixplan.legacy.plan_devices_as_configured")
    assert sum(calls[name] for name in device_plans) == 1, calls
    assert calls["wmtp_core.runtime.devices.apply_device_profile"] <= 1, calls
    assert opens[(str(data), False)] == 1, "the user's data file is read by the planner alone"
    # One listing chooses the start; pruning after the one save lists once more (the checkpoints table the flow
    # publishes reuses that listing).
    assert calls["wmtp_core.checkpoint.manifest._step_dirs"] == 2, calls
    # The directory is listed once more, by the trainer as it starts under the run lock, for the staging directories
    # of killed saves (wmtp_core.checkpoint.save_dirs.remove_save_debris): nothing is decided or read there.
    assert listings == 3, listings
    for file in sorted(path for path in start.rglob("*") if path.is_file() and path.name != "manifest.json"):
        assert opens[(str(file), False)] <= 1 + ranks, f"{file} opened {opens[(str(file), False)]} times"
    # The manifest: verify, each loading rank, and pruning's listing (which reads every kept manifest).
    assert opens[(str(start / "manifest.json"), False)] <= 2 + ranks


def test_one_resume_with_five_checkpoints_plans_lists_and_reads_once(prefect_api_url, tmp_path):
    home = tmp_path / "home"
    layout = _run_with_five_checkpoints(home, "counted")
    calls, opens = _counted_resume(layout, home, prefect_api_url, tmp_path)
    _assert_decided_once(layout, home / "user-data.jsonl", calls, opens, ranks=1)


@pytest.mark.distributed
def test_one_two_process_sharded_resume_plans_lists_and_reads_once(prefect_api_url, tmp_path):
    home = tmp_path / "home"
    two = ["devices.strategy=fsdp", "devices.nproc_per_node=2", "checkpoint.format=sharded"]
    layout = _run_with_five_checkpoints(home, "counted-sharded", *two)
    calls, opens = _counted_resume(layout, home, prefect_api_url, tmp_path)
    _assert_decided_once(layout, home / "user-data.jsonl", calls, opens, ranks=2)
