"""Launching a multi-process training job from the training task, and reading it back: torchrun on this node, or the
driver of a Ray job (wmtp_core.launch.ray_job), which prints rank 0's lines and writes the outcome the same way.

torchrun runs `wmtp_core.training.worker` on every rank. Every rank's stdout and stderr are kept in the run
directory (logs/torchrun/<job>/attempt_<n>/<local rank>/); rank 0's are also streamed here line by line: progress
lines go to the Prefect run log, `WMTP_METRICS` lines to the metrics callback. A failed or silent job names the
rank that died or stopped first, with the last lines of that rank's own log (wmtp_core.launch.rank_report); a
multi-node job writes the other nodes' command first (wmtp_core.launch.other_nodes). The job is bounded by its own
silence timeout (Prefect's task timeout cannot interrupt a child process); SIGTERM and Ctrl-C to this process are passed
on (wmtp_core.launch.job_signals), so the ranks save a checkpoint before exiting; when any rank dies, torchrun stops
the others and exits non-zero.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from wmtp_core.launch.job_signals import forwarded_stop_signals, kill_job, stop_job
from wmtp_core.launch.other_nodes import Rendezvous, node_count
from wmtp_core.launch.rank_report import (
    POLL_S,
    EndedJob,
    RankWatch,
    failed_first,
    failure_message,
    silence_message,
    wait_for_rank_0,
)
from wmtp_core.run.plan import RunPlan
from wmtp_core.training.worker import (
    EXIT_TERMINATED,
    INPUT_ERROR_TYPES,
    METRICS_PREFIX,
    rank_result_file,
    worker_arguments,
)


class WorkerInputError(ValueError):
    """The job failed on bad input (recipe, data, checkpoint); retrying cannot help."""


class WorkerInterrupted(RuntimeError):
    """The job was stopped by a signal (reason: "SIGTERM" or "Ctrl-C"); its ranks saved what they could."""

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason


_TEE_PREFIX = re.compile(r"^\[default\d+\]:")  # what torchrun puts before each line it tees to the console


def worker_command(
    run_plan: RunPlan,
    plan_file: Path,
    *,
    result_file: Path,
    manifest_extra: dict | None = None,
    every_rank_on_console: bool = False,
) -> list[str]:
    """The command line that executes a run plan: `python -m wmtp_core.training.worker` for one process, else
    torchrun running it on every rank: rank 0's output on the console and every rank's kept in files under the run
    directory, or (every_rank_on_console, as `wmtp verify` counts every rank's warnings) every rank's on the console.
    Training and `wmtp verify` both launch what this builds."""
    if run_plan.launcher == "ray":
        from wmtp_core.launch.ray_job import ray_job_arguments

        return [sys.executable, *ray_job_arguments(plan_file, result_file=result_file, manifest_extra=manifest_extra)]
    worker = worker_arguments(plan_file, result_file=result_file, manifest_extra=manifest_extra)
    if run_plan.launcher == "in-process":
        return [sys.executable, *worker]
    devices = run_plan.recipe.devices
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(devices.nproc_per_node)]
    launcher += ["--log-dir", str(run_plan.layout.torchrun_logs)]
    # Every rank's output straight to the console (unprefixed), or rank 0's teed there and every rank's to files.
    launcher += [] if every_rank_on_console else ["--tee", "3", "--local-ranks-filter", "0"]
    return launcher + _rendezvous(devices.nnodes, run_id=run_plan.recipe.run.name) + worker


def _rendezvous(nnodes: int, *, run_id: str) -> list[str]:
    """--standalone on one node; on several, the c10d rendezvous at MASTER_ADDR:MASTER_PORT."""
    if nnodes == 1:
        return ["--standalone"]
    endpoint = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
    if endpoint == ":":
        raise WorkerInputError(
            f"devices.nnodes={nnodes} needs MASTER_ADDR and MASTER_PORT in the environment "
            "(the rendezvous host every node can reach)"
        )
    return ["--nnodes", str(nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", run_id]


def run_job(
    command: list[str],
    *,
    result_file: Path,
    silence_timeout_s: float,
    log: logging.Logger,
    on_metrics: Callable[[int, dict], None] | None,
) -> dict:
    """Run the job (torchrun, or a Ray job's driver) to its end and return rank 0's TrainResult as a dict; raise a
    typed error otherwise."""
    for stale in [result_file, *result_file.parent.glob(f"{result_file.stem}.rank*{result_file.suffix}")]:
        stale.unlink(missing_ok=True)
    log.info("launching: %s", shlex.join(command))
    nnodes, log_dir, name = node_count(command), _log_dir(command), _job_name(command)
    rendezvous = Rendezvous.for_job(command, log_dir, silence_timeout_s) if nnodes > 1 else None
    if rendezvous is not None:
        log.info("the other %d node(s) run: bash %s", nnodes - 1, shlex.quote(str(rendezvous.script)))
    jobs_before = _job_dirs(log_dir)
    # A session of its own: the terminal's Ctrl-C reaches this process only, which passes it on (job_signals).
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True
    )
    watch = RankWatch(process.pid, log_dir)
    rendezvous_by = time.monotonic() + rendezvous.wait_s if rendezvous is not None else None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    tail: list[str] = []
    silence: Exception | None = None
    with forwarded_stop_signals(process, log) as signals:
        try:
            while (line := _next_line(lines, watch, silence_timeout_s, rendezvous_by)) is not None:
                if line.startswith(METRICS_PREFIX):
                    report = json.loads(line[len(METRICS_PREFIX) :])
                    if on_metrics is not None:
                        on_metrics(report["step"], report["metrics"])
                    continue
                log.info("%s", line)
                if line.strip():
                    tail = (tail + [line])[-60:]
        except _Blocked:  # a rank failed and a stopped one holds torchrun's teardown: its outcome still follows
            kill_job(process)
        except _Silent as quiet:
            silence = _stop_silent(process, quiet, watch, rendezvous, f"{name} printed nothing", silence_timeout_s)
        status = process.wait()
    if silence is not None:
        raise silence
    new_jobs = [job for job in _job_dirs(log_dir) if job not in jobs_before]
    job = EndedJob(name, new_jobs[-1] if new_jobs else None, watch, tail)
    return _outcome(status, result_file, job, interrupted=signals.interrupted, nnodes=nnodes)


class _Silent(Exception):
    """The job printed nothing for too long, or (rendezvous) its ranks never started."""

    def __init__(self, *, rendezvous: bool):
        self.rendezvous = rendezvous


class _Blocked(Exception):
    """A rank ended while another is stopped: torchrun would wait 30 s for the stopped one before it kills it."""


def _stop_silent(
    process: subprocess.Popen, quiet: _Silent, watch: RankWatch, rendezvous: Rendezvous | None, said: str, wait_s: float
) -> Exception:
    """Stop a silent job and return the error saying why, read before the stop: stopping changes what ranks show."""
    if quiet.rendezvous:
        kill_job(process)  # no rank started: nothing to save
        return rendezvous.failure()
    error = TimeoutError(silence_message(said, wait_s, watch))
    if watch.stopped:  # a stopped rank cannot save, and torchrun would wait 30 s for it after SIGTERM
        kill_job(process)
    else:
        stop_job(process)
    return error


def _job_name(command: list[str]) -> str:
    return "torchrun" if "torch.distributed.run" in command else "the Ray job"


def _log_dir(command: list[str]) -> Path | None:
    return Path(command[command.index("--log-dir") + 1]) if "--log-dir" in command else None


def _job_dirs(log_dir: Path | None) -> list[Path]:
    """The job directories torchrun made in log_dir, oldest first."""
    if log_dir is None or not log_dir.is_dir():
        return []
    return sorted((p for p in log_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(_TEE_PREFIX.sub("", line.rstrip("\n"), count=1))
    lines.put(None)


def _next_line(lines: queue.Queue, watch: RankWatch, silence_s: float, rendezvous_by: float | None) -> str | None:
    """The job's next line; while none comes, look at the ranks (started at all? one stopped while another ended?)."""
    deadline = time.monotonic() + silence_s
    while True:
        watch.poll()
        now = time.monotonic()
        if rendezvous_by is not None and now >= rendezvous_by and not watch.started:
            raise _Silent(rendezvous=True)
        if now >= deadline:
            raise _Silent(rendezvous=False)
        if watch.teardown_blocked:
            raise _Blocked
        try:
            return lines.get(timeout=min(POLL_S, deadline - now))
        except queue.Empty:
            continue


def _outcome(status: int, result_file: Path, job: EndedJob, *, interrupted: bool, nnodes: int) -> dict:
    if nnodes > 1:
        wait_for_rank_0(job.watch, result_file)
    outcome = _read_outcome(result_file)
    # After Ctrl-C torchrun exits non-zero (it re-raises the signal) though every rank saved and returned.
    if outcome.get("ok") and (status == 0 or interrupted):
        return outcome["result"]
    if interrupted:  # Ctrl-C before the ranks could stop cleanly (e.g. still starting): not a failure to retry
        raise WorkerInterrupted(
            f"stopped by Ctrl-C ({job.name} exited {status}); resume continues from the newest checkpoint",
            reason="Ctrl-C",
        )
    rank, _ = failed_first(job)
    if rank not in (None, 0):  # that rank's own outcome, or none: never rank 0's error in its name
        outcome = _read_outcome(rank_result_file(result_file, rank))
    error_type, message = outcome.get("error_type"), outcome.get("message")
    if status == EXIT_TERMINATED or error_type == "TrainingInterrupted":
        raise WorkerInterrupted(message or f"{job.name} exited {status} after SIGTERM", reason="SIGTERM")
    if error_type in INPUT_ERROR_TYPES:
        raise WorkerInputError(f"{error_type}: {message}")
    raise RuntimeError(failure_message(status, job, outcome))


def _read_outcome(path: Path) -> dict:
    """A rank's outcome file, {"ok": False} when it wrote none; one that does not parse is named, not a traceback."""
    if not path.is_file():
        return {"ok": False}
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise RuntimeError(
            f"the job's outcome {path} does not parse ({error}): something other than this job's rank wrote it "
            "(another job of the same run on another node?); run one job per run, then resume"
        ) from None
