"""The fix plan's success metrics, measured: for each rollout stage (legacy, +P1, +P2, +P3) and model kind (a plain
model in one process, FSDP over 2 processes) train the built-in tiny model in fresh subprocesses and count what the
plan counts: checkpoint save success, resume success, Python warnings by category, leaked semaphores, step time.

Each stage runs twice: a first run with 2 spawned DataLoader workers (so leaks can show) is cancelled with SIGTERM
mid-training, as Prefect cancels a flow run; a second run resumes from the newest valid checkpoint to the end.
Children run with PYTHONWARNINGS=always so every warning (deprecations included) is printed, and is counted.
Each run is planned (wmtp_core.run.plan) and launched with the command training uses (worker_command); the
children train, this module launches and reads them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from wmtp_core.config import PhaseGates, Recipe
from wmtp_core.launch.torchrun import worker_command
from wmtp_core.recipes import TINY_MODEL, load_recipe
from wmtp_core.run.plan import plan_run, write_plan

STAGES = {
    "legacy": PhaseGates(checkpoint=False, mps=False, api=False),
    "p1": PhaseGates(checkpoint=True, mps=False, api=False),
    "p1+p2": PhaseGates(checkpoint=True, mps=True, api=False),
    "p1+p2+p3": PhaseGates(checkpoint=True, mps=True, api=True),
}
MODELS = ("plain", "fsdp")
TARGETS = {"checkpoint_save_success": 1.0, "resume_success": 1.0, "warnings": 0, "leaked_semaphores": 0}
MAX_STEPS, SAVE_EVERY, CANCEL_AT = 12, 4, 6  # cancel well before the end: a fast child must not finish first
TINY = [
    *TINY_MODEL,
    "train.warmup_steps=1",
    "train.eval_batches=2",
    "train.log_every=1",
    f"train.max_steps={MAX_STEPS}",
    f"train.save_every={SAVE_EVERY}",
    "train.eval_every=1000",
    "data.num_workers=2",
    "data.worker_start=spawn",
    "devices.timeout_s=120",
]
_WARNING = re.compile(r"^\S.*?:\d+: (\w+Warning): ")
_LEAK = re.compile(r"There appear to be (\d+) leaked semaphore")
_STEP = re.compile(r" step (\d+)/\d+ ")


def stage_recipe(stage: str, model: str) -> Recipe:
    # One DataLoader worker per rank: enough to show leaks, and spawning workers is most of a run's time on 2 cores.
    extra = ["devices.strategy=fsdp", "devices.nproc_per_node=2", "data.num_workers=1"] if model == "fsdp" else []
    recipe = load_recipe(None, [*TINY, *extra, f"run.name=verify-{stage.replace('+', '-')}-{model}"])
    return recipe.model_copy(update={"phases": STAGES[stage]})


def verify_stage(stage: str, model: str, workdir: Path, *, timeout_s: float = 300) -> dict:
    """Cancel a run mid-training, resume it, and return the stage's row of the report."""
    recipe = stage_recipe(stage, model)
    run_dir = workdir / recipe.run.name
    first = _run(recipe, run_dir, resume=False, cancel_at=CANCEL_AT, timeout_s=timeout_s)
    second = _run(recipe, run_dir, resume=True, cancel_at=None, timeout_s=timeout_s)
    saved = first["saved"] + second["saved"]
    failed_saves = int(first["error_type"] == "CheckpointSaveError") + int(
        second["error_type"] == "CheckpointSaveError"
    )
    warnings = first["warnings"] + second["warnings"]
    return {
        "stage": stage,
        "model": model,
        "checkpoint_save_success": round(saved / max(saved + failed_saves, 1), 3) if saved + failed_saves else 0.0,
        "resume_success": 1.0 if second["ok"] and second["steps"] == MAX_STEPS and second["resumed"] else 0.0,
        "warnings": sum(warnings.values()),
        "warnings_by_category": dict(warnings),
        "leaked_semaphores": first["leaked"] + second["leaked"],
        "step_time_s": first["step_time_s"],
        "cancelled_status": first["status"],
        "first_error": first["error_type"] or second["error_type"],
    }


def passed(rows: list[dict], *, last_stage: str = "p1+p2+p3") -> bool:
    """The plan's targets, held by every model at the last rollout stage."""
    final = [row for row in rows if row["stage"] == last_stage]
    return bool(final) and all(
        row["checkpoint_save_success"] >= TARGETS["checkpoint_save_success"]
        and row["resume_success"] >= TARGETS["resume_success"]
        and row["warnings"] <= TARGETS["warnings"]
        and row["leaked_semaphores"] <= TARGETS["leaked_semaphores"]
        for row in final
    )


def _run(recipe: Recipe, run_dir: Path, *, resume: bool, cancel_at: int | None, timeout_s: float) -> dict:
    try:
        planned = plan_run(recipe, resume="latest" if resume else None, directory=run_dir)
    except FileNotFoundError:  # the cancelled run saved nothing to resume from
        return _outcome(
            status=None, output="", result={"ok": False, "error_type": "NoCheckpoint"}, step_times=[], resumed=False
        )
    result_file = planned.plan.layout.verify_result
    result_file.unlink(missing_ok=True)
    command = worker_command(planned.plan, write_plan(planned), result_file=result_file, every_rank_on_console=True)
    env = {**os.environ, "PYTHONWARNINGS": "always"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, step_times, deadline = [], [], time.monotonic() + timeout_s
    for line in process.stdout:  # bounded below: an orphaned worker could keep the pipe open
        lines.append(line)
        if (match := _STEP.search(line)) is not None:
            step_times.append(time.monotonic())
            if cancel_at is not None and int(match.group(1)) >= cancel_at:
                process.send_signal(signal.SIGTERM)
                cancel_at = None  # once: a second SIGTERM would not be an orderly stop
        if time.monotonic() > deadline:
            process.kill()
            break
    try:
        status = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        status = process.wait()
    result = json.loads(result_file.read_text()) if result_file.is_file() else {"ok": False, "error_type": None}
    return _outcome(status=status, output="".join(lines), result=result, step_times=step_times, resumed=resume)


def _outcome(*, status: int | None, output: str, result: dict, step_times: list[float], resumed: bool) -> dict:
    warnings = Counter(match.group(1) for line in output.splitlines() if (match := _WARNING.match(line)))
    intervals = sorted(b - a for a, b in zip(step_times, step_times[1:]))
    return {
        "status": status,
        "ok": bool(result.get("ok")),
        "steps": result.get("result", {}).get("steps"),
        "error_type": result.get("error_type"),
        "saved": output.count("saved checkpoint") + output.count("saved sharded checkpoint"),
        "warnings": warnings,
        "leaked": sum(int(n) for n in _LEAK.findall(output)),
        "step_time_s": round(intervals[len(intervals) // 2], 4) if intervals else None,
        "resumed": resumed,
    }
