"""The driver of a Ray job: trains a run plan with Ray Train workers on a Ray cluster.

    python -m wmtp_core.launch.ray_job --plan RUN/plan.json --result RUN/ray_result.json

The training task launches this as it launches torchrun, and streams what it prints the same way: rank 0's lines
(progress, `WMTP_METRICS` lines), followed from rank 0's log in the shared run directory. The driver checks the
cluster first (reachable, room for the workers, the run directory visible from every node), then runs a
TorchTrainer whose workers each run one rank (wmtp_core.launch.ray_ranks). A lost worker or node restarts the worker
group (ray.max_failures times), each restart resuming from the newest valid checkpoint. SIGTERM and Ctrl-C are passed
to every rank through the job directory, so each saves at one step and stops, as under torchrun.

Outcome: rank 0 writes --result as a torchrun rank does; when the job fails (the cluster check, or past the allowed
restarts) the driver writes it: {"ok": false, "error_type": ..., "message": ...}. Exit status 0 when the workers
ended (the result says how), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from wmtp_core.launch.ray_ranks import STOP_FILE, run_rank
from wmtp_core.run.plan import RunPlan, read_plan
from wmtp_core.runtime.atomic_files import write_atomically
from wmtp_core.runtime.ray_cluster import (
    ClusterError,
    check_every_node_sees,
    cluster_address,
    connected_to_cluster,
    write_visibility_marker,
)
from wmtp_core.training.worker import job_arguments, parse_job_arguments

FOLLOW_S = 0.2


def ray_job_arguments(plan_file: Path, *, result_file: Path, manifest_extra: dict | None = None) -> list[str]:
    """`-m wmtp_core.launch.ray_job ...`: what follows `python` to train plan_file on Ray."""
    return job_arguments(__name__, plan_file, result_file=result_file, manifest_extra=manifest_extra)


def main(argv: list[str] | None = None) -> int:
    args = parse_job_arguments(
        argv, description="Train a WMTP run plan with Ray Train workers on a Ray cluster.", result_required=True
    )
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    plan = read_plan(args.plan)
    job_dir = plan.layout.ray_logs / f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{os.getpid()}"
    address = cluster_address(plan.recipe.ray)
    try:
        # Workers' lines are followed from their log files, not forwarded by Ray (which prefixes and deduplicates
        # them): connected_to_cluster turns log_to_driver off.
        with connected_to_cluster(plan.recipe.ray, address) as nodes:
            live = sum(node["Alive"] for node in nodes)
            print(f"Ray cluster {address or '(started here)'}: {live} live node(s)", flush=True)
            token = write_visibility_marker(job_dir)
            check_every_node_sees(plan.run_dir, job_dir, token)
            return _train(plan, args, job_dir, token)
    except ClusterError as error:
        _write_failure(args.result, error)
        print(f"error: {error}", flush=True)
        return 1


def _train(plan: RunPlan, args: argparse.Namespace, job_dir: Path, token: str) -> int:
    with _following(job_dir), stop_signals_to(job_dir / STOP_FILE):
        try:
            _trainer(plan, args, job_dir, token).fit()
        except Exception as error:  # Ray Train's TrainingFailedError, past ray.max_failures restarts
            _write_failure(args.result, error)
            print(f"error: the Ray job failed after {plan.recipe.ray.max_failures} restarts: {error}", flush=True)
            return 1
    return 0


def _trainer(plan: RunPlan, args: argparse.Namespace, job_dir: Path, token: str):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    settings = plan.recipe.ray
    return TorchTrainer(
        run_rank,
        train_loop_config={
            "job_dir": str(job_dir),
            "plan_file": str(args.plan),
            "result_file": str(args.result),
            "token": token,
            "extra": json.loads(args.manifest_extra),
        },
        torch_config=TorchConfig(backend="gloo", timeout_s=plan.recipe.devices.timeout_s),
        scaling_config=ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.gpus_per_worker > 0,
            resources_per_worker={"CPU": settings.cpus_per_worker, "GPU": settings.gpus_per_worker},
        ),
        run_config=RunConfig(
            name=job_dir.name,
            storage_path=str(job_dir.parent),
            failure_config=FailureConfig(max_failures=settings.max_failures),
        ),
    )


class _following:
    """While the job runs, print every line rank 0 writes, following the newest attempt's log (a restarted worker
    group writes a new one); on leaving, the rest of it."""

    def __init__(self, job_dir: Path):
        self.job_dir, self.done = job_dir, threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> _following:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    def _follow(self) -> None:
        current, offset, pending = None, 0, ""
        while True:
            finishing = self.done.is_set()
            newest = max(self.job_dir.glob("attempt_*/rank_0.log"), key=_attempt_number, default=None)
            if newest is not None and newest != current:
                current, offset, pending = newest, 0, ""
            if current is not None:
                with current.open(errors="replace") as log:
                    log.seek(offset)
                    text = pending + log.read()
                    offset = log.tell()
                *lines, pending = text.split("\n")
                for line in lines:
                    print(line, flush=True)
            if finishing:
                return
            time.sleep(FOLLOW_S)


def _attempt_number(log: Path) -> int:
    return int(log.parent.name.removeprefix("attempt_"))


class stop_signals_to:
    """SIGTERM and Ctrl-C write the signal's name to the stop file; every rank passes it to its training process."""

    def __init__(self, stop_file: Path):
        self.stop_file, self.previous = stop_file, {}

    def __enter__(self) -> stop_signals_to:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._request_stop)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _request_stop(self, signum, frame) -> None:
        self.stop_file.parent.mkdir(parents=True, exist_ok=True)
        self.stop_file.write_text(signal.Signals(signum).name)


def _write_failure(result_file: Path, error: BaseException) -> None:
    message = " ".join(str(error).split())[:2000]
    write_atomically(result_file, json.dumps({"ok": False, "error_type": type(error).__name__, "message": message}))


if __name__ == "__main__":
    sys.exit(main())
