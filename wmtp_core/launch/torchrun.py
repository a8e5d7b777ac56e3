"""Launching a multi-process training job from the training task, and reading it back: torchrun on this node, or the
driver of a Ray job (wmtp_core.launch.ray_job), which prints rank 0's lines and writes the outcome the same way.

torchrun runs `wmtp_core.training.worker` on every rank. Every rank's stdout and stderr are kept in the run
directory (logs/torchrun/<job>/attempt_<n>/<local rank>/); rank 0's are also streamed here line by line: progress
lines go to the Prefect run log, `WMTP_METRICS` lines to the metrics callback. A failed job names the rank that
failed first, with the last lines of that rank's own log. The job is bounded by its own silence
timeout (Prefect's task timeout cannot interrupt a child process); SIGTERM and Ctrl-C to this process are passed
on (wmtp_core.launch.job_signals), so the ranks save a checkpoint before exiting; when any rank dies, torchrun stops
the others and exits non-zero.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from wmtp_core.launch.job_signals import forwarded_stop_signals, stop_job
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
    """The job was stopped by SIGTERM after saving a checkpoint."""


_ROOT_CAUSE_RANK = re.compile(r"^\s*rank\s*:\s*(\d+) \(local_rank: (\d+)\)")  # torchrun's "Root Cause" block
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
    log.info("launching: %s", " ".join(command))
    log_dir = _log_dir(command)
    jobs_before = _job_dirs(log_dir)
    # A session of its own: the terminal's Ctrl-C reaches this process only, which passes it on (job_signals).
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    tail: list[str] = []
    with forwarded_stop_signals(process, log) as signals:
        while (line := _next_line(lines, process, silence_timeout_s, _job_name(command))) is not None:
            if line.startswith(METRICS_PREFIX):
                report = json.loads(line[len(METRICS_PREFIX) :])
                if on_metrics is not None:
                    on_metrics(report["step"], report["metrics"])
                continue
            log.info("%s", line)
            if line.strip():
                tail = (tail + [line])[-60:]
        status = process.wait()
    new_jobs = [job for job in _job_dirs(log_dir) if job not in jobs_before]
    job_dir = new_jobs[-1] if new_jobs else None
    name = _job_name(command)
    return _outcome(status, result_file, tail, job_dir=job_dir, interrupted=signals.interrupted, name=name)


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


def _next_line(lines: queue.Queue, process: subprocess.Popen, silence_timeout_s: float, name: str) -> str | None:
    try:
        return lines.get(timeout=silence_timeout_s)
    except queue.Empty:
        stop_job(process)
        raise TimeoutError(
            f"{name} printed nothing for {silence_timeout_s:.0f} s (devices.timeout_s): stopped it; "
            "a rank is probably stuck; resume continues from the newest checkpoint"
        ) from None


def _outcome(
    status: int,
    result_file: Path,
    tail: list[str],
    *,
    job_dir: Path | None = None,
    interrupted: bool = False,
    name: str = "torchrun",
) -> dict:
    outcome = json.loads(result_file.read_text()) if result_file.is_file() else {"ok": False}
    # After Ctrl-C torchrun exits non-zero (it re-raises the signal) though every rank saved and returned.
    if outcome.get("ok") and (status == 0 or interrupted):
        return outcome["result"]
    if interrupted:  # Ctrl-C before the ranks could stop cleanly (e.g. still starting): not a failure to retry
        raise WorkerInterrupted(
            f"stopped by Ctrl-C ({name} exited {status}); resume continues from the newest checkpoint"
        )
    failed_rank, failed_local_rank = _root_cause_rank(tail)
    if failed_rank not in (None, 0):
        outcome = _rank_outcome(result_file, failed_rank) or outcome
    error_type, message = outcome.get("error_type"), outcome.get("message")
    if status == EXIT_TERMINATED or error_type == "TrainingInterrupted":
        raise WorkerInterrupted(message or f"{name} exited {status} after SIGTERM")
    if error_type in INPUT_ERROR_TYPES:
        raise WorkerInputError(f"{error_type}: {message}")
    who = f"rank {failed_rank} failed first, " if failed_rank is not None else ""
    cause = f"{error_type}: {message}" if error_type else "died without reporting an error (killed?)"
    own_log = _rank_log_tail(job_dir, failed_local_rank)
    last = "\n".join(own_log or _before_torchrun_summary(tail)[-12:])
    logs = f" (every rank's output: {job_dir})" if job_dir else ""
    raise RuntimeError(f"{name} exited with status {status}: {who}{cause}{logs}; last lines:\n{last}")


def _rank_log_tail(job_dir: Path | None, local_rank: int | None, lines: int = 12) -> list[str]:
    """The last lines a rank wrote (stderr, where tracebacks go, else stdout) in its newest attempt's log."""
    if job_dir is None or local_rank is None:
        return []
    attempts = sorted(job_dir.glob("attempt_*"), key=lambda p: int(p.name.split("_")[1]))
    for stream in ("stderr.log", "stdout.log"):
        path = attempts[-1] / str(local_rank) / stream if attempts else None
        if path is not None and path.is_file():
            text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
            if text:
                return text[-lines:]
    return []


def _rank_outcome(result_file: Path, rank: int) -> dict | None:
    path = rank_result_file(result_file, rank)
    return json.loads(path.read_text()) if path.is_file() else None


def _root_cause_rank(tail: list[str]) -> tuple[int | None, int | None]:
    """The rank (and its local rank) torchrun names as the first observed failure, if it printed its summary."""
    ranks = [(int(m.group(1)), int(m.group(2))) for line in tail if (m := _ROOT_CAUSE_RANK.match(line))]
    return ranks[-1] if ranks else (None, None)


def _before_torchrun_summary(tail: list[str]) -> list[str]:
    """The job's own last lines: torchrun's closing ChildFailedError report (and its banner) cut off."""
    for index, line in enumerate(tail):
        if "ChildFailedError" in line or "elastic.multiprocessing.errors" in line:
            return tail[:index] or tail
    return tail
