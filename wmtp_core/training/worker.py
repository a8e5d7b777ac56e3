"""One training process: `python -m wmtp_core.training.worker`, alone or as each rank under torchrun.

    torchrun --standalone --nproc_per_node 2 -m wmtp_core.training.worker --plan RUN/plan.json --result OUT.json

Every rank reads the run plan (wmtp_core.run.plan) and decides nothing it holds: no gate, device plan or start
checkpoint is chosen here; each rank only finds its own device index.
Rank 0 prints progress lines and one `WMTP_METRICS {json}` line per report on stdout (the Prefect task that
launched torchrun turns them into the run log and MLflow metrics) and writes the outcome to --result:
{"ok": true, "result": TrainResult} or {"ok": false, "error_type": ..., "message": ...}; another rank that fails
writes its own to <result>.rank<N>.json. Under torchrun every rank also keeps a record of itself with a heartbeat
(wmtp_core.runtime.rank_status), so the launcher can name the rank that died or stopped first.
Exit status: 0 done, 1 failed, 143 stopped by SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from wmtp_core.runtime.atomic_files import write_atomically
from wmtp_core.runtime.rank_status import end_rank_record, start_rank_record

METRICS_PREFIX = "WMTP_METRICS "
EXIT_FAILED, EXIT_TERMINATED = 1, 143
INPUT_ERROR_TYPES = frozenset(
    {
        "ValueError",
        "RecipeError",
        "DataError",
        "CheckpointError",
        "CheckpointSaveError",
        "OutOfSpaceError",
        "FileNotFoundError",
        "ClusterError",
    }
)
"""Outcomes' error types that say the input is wrong, or that the job would fail again the same way (a full disk): a
launcher does not run the job again for them."""


def main(argv: list[str] | None = None) -> int:
    args = parse_job_arguments(
        argv, description="One WMTP training process (alone or one rank under torchrun).", result_required=False
    )
    # First, before the slow imports: a rank killed or stopped from here on is still named, with its own log.
    record = start_rank_record()
    if record is not None:
        print(f"[rank {os.environ['RANK']}] started: pid {os.getpid()}, record {record}", flush=True)
    # Imported here, not at the top: a spawned DataLoader worker re-imports this module (its parent's __main__),
    # and these (torch.distributed.tensor, sympy, ...) would cost every such worker about 3 s of CPU at start.
    from wmtp_core.run.plan import read_plan
    from wmtp_core.runtime.distributed import init_distributed, launched_by_torchrun, shutdown_distributed
    from wmtp_core.runtime.stopping import TrainingInterrupted
    from wmtp_core.training.loop import train

    run_plan = read_plan(args.plan)
    ctx = init_distributed(run_plan.devices.device, timeout_s=run_plan.recipe.devices.timeout_s)
    _configure_logging(ctx.rank, prefix=f"[rank {ctx.rank}] " if launched_by_torchrun() else "")
    outcome, status = {"ok": False}, EXIT_FAILED
    try:
        result = train(run_plan, on_metrics=print_metrics, manifest_extra=json.loads(args.manifest_extra), ctx=ctx)
        outcome, status = {"ok": True, "result": asdict(result)}, 0
    except TrainingInterrupted as error:
        outcome, status = _failure(error), EXIT_TERMINATED
    except Exception as error:
        logging.getLogger(__name__).exception("rank %d failed", ctx.rank)
        outcome = _failure(error)
    finally:
        # Global rank 0 alone writes the job's outcome (another rank, only its failure, beside it), then ends its
        # record: a launcher on another node waits for that end before it reads the outcome.
        if args.result and (ctx.is_main or not outcome["ok"]):
            write_atomically(rank_result_file(args.result, ctx.rank), json.dumps(outcome))
        end_rank_record(record, outcome)
        shutdown_distributed()
    if launched_by_torchrun():  # on either gate: the legacy path's FSDP1 ranks aborted in teardown too (CI, exit -6)
        exit_without_interpreter_teardown(status)
    return status


def worker_arguments(plan_file: Path, *, result_file: Path, manifest_extra: dict | None = None) -> list[str]:
    """`-m wmtp_core.training.worker ...`: what follows `python` (or torchrun) to train the run plan_file plans."""
    return job_arguments(__name__, plan_file, result_file=result_file, manifest_extra=manifest_extra)


def job_arguments(module: str, plan_file: Path, *, result_file: Path, manifest_extra: dict | None) -> list[str]:
    """`-m MODULE --plan ... --result ... --manifest-extra ...`: the command line of a process that executes a run
    plan (this worker, or a Ray job's driver), as parse_job_arguments reads it."""
    arguments = ["-m", module, "--plan", str(plan_file), "--result", str(result_file)]
    return arguments + ["--manifest-extra", json.dumps(manifest_extra or {})]


def parse_job_arguments(argv: list[str] | None, *, description: str, result_required: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--plan", type=Path, required=True, help="the run plan (run_dir/plan.json) to execute")
    parser.add_argument("--result", type=Path, required=result_required, help="where the outcome is written as JSON")
    parser.add_argument("--manifest-extra", default="{}", help="JSON object added to every checkpoint manifest")
    return parser.parse_args(argv)


def rank_result_file(result_file: Path, rank: int) -> Path:
    """Where a rank writes its outcome: rank 0 to result_file, another rank (only when it fails) beside it."""
    return result_file if rank == 0 else result_file.with_name(f"{result_file.stem}.rank{rank}{result_file.suffix}")


def print_metrics(step: int, metrics: dict[str, float]) -> None:
    print(METRICS_PREFIX + json.dumps({"step": step, "metrics": metrics}), flush=True)


def _failure(error: BaseException) -> dict:
    return {
        "ok": False,
        "error_type": type(error).__name__,
        "message": str(error).splitlines()[0] if str(error) else "",
    }


def _configure_logging(rank: int, *, prefix: str) -> None:
    # Rank 0 speaks for the job; the other ranks only report problems, each line saying which rank it is.
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        stream=sys.stdout, level=level, format=f"{prefix}%(levelname)s %(name)s: %(message)s", force=True
    )


def exit_without_interpreter_teardown(status: int) -> None:
    """End a torchrun rank as a normal exit would, minus the interpreter's teardown.

    Functional collectives (FSDP2's DTensors use them) keep the gloo process group alive after
    destroy_process_group, its threads still running (torch 2.15, CPU). Tearing the interpreter down under those
    threads now and then aborts a rank that has finished ("terminate called without an active exception", exit
    -6: 1 in 15 runs of one series here, once in CI; an FSDP1 rank on the legacy API once in CI too), and torchrun
    reports the whole job failed. The exit handlers still run first: multiprocessing's releases the semaphores of
    any DataLoader queue still alive (without it the resource tracker reports them leaked) and logging's flushes
    the log.
    """
    atexit._run_exitfuncs()  # what sys.exit would run; the teardown that follows it is what os._exit skips
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
