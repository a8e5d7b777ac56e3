"""rho1-wmtp's brief reference is a step of its own: trained under torchrun like the run, then loaded as a file by
every rank, whatever the run's checkpoint format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_rho1_with_a_brief_reference_trains_on_two_processes_with_sharded_checkpoints(
    run_wmtp, prefect_api_url, tmp_path
):
    home = tmp_path / "home"
    overrides = [
        "train.algorithm=rho1-wmtp",
        "devices.nproc_per_node=2",
        "devices.strategy=fsdp",
        "checkpoint.format=sharded",
        "train.max_steps=6",
        "train.save_every=3",
        "rho1.reference_steps=4",
        "devices.timeout_s=120",
        "run.name=rho1-two",
    ]
    args = ["train", "--recipe", "configs/tiny.yaml", *[part for key in overrides for part in ("--set", key)]]
    summary = run_wmtp(args, home=home, api_url=prefect_api_url)
    assert summary["status"] == "completed" and summary["steps"] == 6
    run = Path(summary["run_dir"])
    reference = json.loads((run / "reference" / "checkpoints" / "step_00000004" / "manifest.json").read_text())
    assert (reference["format"], reference["world_size"]) == ("full", 2)  # trained by both ranks, saved whole
    assert reference["recipe"]["train"]["algorithm"] == "baseline-mtp"
    final = json.loads((Path(summary["latest_checkpoint"]) / "manifest.json").read_text())
    assert (final["format"], final["world_size"], final["recipe"]["train"]["algorithm"]) == ("sharded", 2, "rho1-wmtp")
