"""A 2-worker Ray run against the same run under torchrun with 2 processes, side by side: training tokens/s and
start-up time.

  tokens/s   the training loop's own figure for the whole job (TrainResult.tokens_per_s: tokens of every rank over
             the loop's wall time, evaluation and saves included), reported by rank 0; target: Ray / torchrun >= 0.95
  start-up   launch of the job's process (torchrun, or the Ray job's driver) to rank 0's first optimizer step report
  wall       launch to the job's end (the driver or torchrun exits)

Both run the same `wmtp_core.training.worker` ranks (gloo, DDP) on the same plan. The Ray cluster is
ray.cluster_utils.Cluster on this machine, started once: a head with no CPUs and two one-CPU worker nodes, every
address on loopback, so each rank runs on its own node. Launchers alternate (order reversed every other repeat);
figures are medians.

Run: uv run python benchmarks/ray_launcher.py [--repeats 5] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.servers import start_ray_cluster
from wmtp_core.launch.torchrun import worker_command
from wmtp_core.recipes import TINY_MODEL, load_recipe
from wmtp_core.run.plan import plan_run, write_plan
from wmtp_core.training.worker import METRICS_PREFIX

TORCHRUN_TEE = re.compile(r"^\[default\d+\]:")  # what torchrun puts before each line it tees to the console
MODEL = ["model.d_model=128", "model.num_layers=4", "model.num_heads=4", "model.max_seq_len=128"]
"""Bigger than the tests' tiny model, so that a step is compute, not overhead (on 2 CPU cores)."""


def recipe_for(launcher: str, steps: int, address: str):
    sizing = ["ray.workers=2", "devices.launcher=ray", f"ray.address={address}"]
    if launcher == "torchrun":
        sizing = ["devices.nproc_per_node=2"]
    common = [f"train.max_steps={steps}", "train.save_every=1000", "train.eval_every=1000", "train.log_every=5"]
    overrides = [*TINY_MODEL, *MODEL, *common, "devices.strategy=ddp", "tracking.enabled=false", *sizing]
    return load_recipe(None, overrides)


def one_job(recipe, run_dir: Path) -> dict[str, float]:
    planned = plan_run(recipe, directory=run_dir)
    result = run_dir / "result.json"
    command = worker_command(planned.plan, write_plan(planned), result_file=result)
    started = time.monotonic()
    first_step = None
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        line = TORCHRUN_TEE.sub("", line, count=1)
        if first_step is None and line.startswith(METRICS_PREFIX) and '"loss"' in line:
            first_step = time.monotonic() - started
    process.wait(timeout=600)
    wall = time.monotonic() - started
    outcome = json.loads(result.read_text())
    assert outcome["ok"], outcome
    return {"tokens_per_s": outcome["result"]["tokens_per_s"], "start_s": first_step, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    cluster = start_ray_cluster(worker_nodes=2)
    scratch = Path(tempfile.mkdtemp(prefix="wmtp-ray-bench-"))
    figures: dict[str, list[dict]] = {"ray": [], "torchrun": []}
    try:
        for repeat in range(args.repeats):
            order = ["ray", "torchrun"] if repeat % 2 == 0 else ["torchrun", "ray"]
            for launcher in order:
                run_dir = scratch / f"{launcher}-{repeat}"
                figures[launcher].append(one_job(recipe_for(launcher, args.steps, cluster.address), run_dir))
                shutil.rmtree(run_dir)
                print(launcher, repeat, figures[launcher][-1], flush=True)
    finally:
        cluster.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    medians = {
        launcher: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for launcher, runs in figures.items()
    }
    ratios = [r["tokens_per_s"] / t["tokens_per_s"] for r, t in zip(figures["ray"], figures["torchrun"])]
    print(json.dumps({"medians": medians, "ray_over_torchrun_tokens_per_s": statistics.median(ratios)}, indent=2))


if __name__ == "__main__":
    main()
