"""One training process: `python -m wmtp_core.training.worker`, alone or as each rank under torchrun.

    torchrun --standalone --nproc_per_node 2 -m wmtp_core.training.worker --recipe R.yaml --run-dir D --result OUT.json

Rank 0 prints progress lines and one `WMTP_METRICS {json}` line per report on stdout (the Prefect task that
launched torchrun turns them into the run log and MLflow metrics) and writes the outcome to --result:
{"ok": true, "result": TrainResult} or {"ok": false, "error_type": ..., "message": ...}; another rank that fails
writes its own to <result>.rank<N>.json, so the launcher can name the rank that failed first.
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

from wmtp_core.checkpoint.manifest import latest_valid_checkpoint

METRICS_PREFIX = "WMTP_METRICS "
EXIT_FAILED, EXIT_TERMINATED = 1, 143


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # Imported here, not at the top: a spawned DataLoader worker re-imports this module (its parent's __main__),
    # and these (torch.distributed.tensor, sympy, ...) would cost every such worker about 3 s of CPU at start.
    from wmtp_core.fixplan.gates import resolve_gates
    from wmtp_core.recipes import load_recipe
    from wmtp_core.runtime.devices import probe_environment
    from wmtp_core.runtime.distributed import init_distributed, launched_by_torchrun, shutdown_distributed
    from wmtp_core.runtime.stopping import TrainingInterrupted
    from wmtp_core.training.loop import train

    recipe = load_recipe(args.recipe, [])
    gates = resolve_gates(recipe)
    plan = gates.plan_devices(recipe.devices, recipe.data, probe_environment())
    ctx = init_distributed(plan.device, timeout_s=recipe.devices.timeout_s)
    _configure_logging(ctx.rank, prefix=f"[rank {ctx.rank}] " if launched_by_torchrun() else "")
    outcome, status = {"ok": False}, EXIT_FAILED
    try:
        resume_from, verified = _resume_path(args.resume, args.run_dir, ctx, verified=args.resume_verified)
        result = train(
            recipe,
            args.run_dir,
            plan=plan,
            resume_from=resume_from,
            resume_verified=verified,
            on_metrics=print_metrics,
            manifest_extra=json.loads(args.manifest_extra),
            time_budget_s=args.time_budget_s,
            ctx=ctx,
        )
        outcome, status = {"ok": True, "result": asdict(result)}, 0
    except TrainingInterrupted as error:
        outcome, status = _failure(error), EXIT_TERMINATED
    except Exception as error:
        logging.getLogger(__name__).exception("rank %d failed", ctx.rank)
        outcome = _failure(error)
    finally:
        if args.result and (ctx.is_main or not outcome["ok"]):
            rank_result_file(args.result, ctx.rank).write_text(json.dumps(outcome))
        shutdown_distributed()
    if launched_by_torchrun() and gates.explicit_cleanup:
        exit_without_interpreter_teardown(status)
    return status


def worker_arguments(
    run_dir: Path,
    *,
    result_file: Path,
    resume: str | Path | None = None,
    resume_verified: bool = False,
    manifest_extra: dict | None = None,
    time_budget_s: float | None = None,
) -> list[str]:
    """`-m wmtp_core.training.worker ...`: what follows `python` (or torchrun) to train the run in run_dir from its
    recipe.yaml; resume is a checkpoint directory or "latest"; resume_verified: the caller has verified that
    directory, so no rank hashes it again."""
    arguments = ["-m", __name__, "--recipe", str(run_dir / "recipe.yaml"), "--run-dir", str(run_dir)]
    arguments += ["--result", str(result_file), "--manifest-extra", json.dumps(manifest_extra or {})]
    arguments += ["--resume", str(resume)] if resume else []
    arguments += ["--resume-verified"] if resume and resume_verified else []
    arguments += ["--time-budget-s", str(time_budget_s)] if time_budget_s is not None else []
    return arguments


def rank_result_file(result_file: Path, rank: int) -> Path:
    """Where a rank writes its outcome: rank 0 to result_file, another rank (only when it fails) beside it."""
    return result_file if rank == 0 else result_file.with_name(f"{result_file.stem}.rank{rank}{result_file.suffix}")


def print_metrics(step: int, metrics: dict[str, float]) -> None:
    print(METRICS_PREFIX + json.dumps({"step": step, "metrics": metrics}), flush=True)


def _resume_path(resume: str | None, run_dir: Path, ctx, *, verified: bool) -> tuple[Path | None, bool]:
    """(checkpoint to resume from, whether it is verified): "latest" is found and verified by rank 0 alone, and
    every rank gets its path."""
    if resume != "latest":
        return (Path(resume), verified) if resume else (None, False)
    from wmtp_core.runtime.distributed import broadcast_object

    latest = latest_valid_checkpoint(run_dir) if ctx.is_main else None
    path = broadcast_object(latest.path if latest else None, ctx)
    return path, path is not None


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


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="One WMTP training process (alone or one rank under torchrun).")
    parser.add_argument("--recipe", type=Path, required=True, help="complete recipe YAML (run_dir/recipe.yaml)")
    parser.add_argument("--run-dir", type=Path, required=True, help="the run directory checkpoints go to")
    parser.add_argument("--resume", default=None, help="a checkpoint directory, or 'latest' for the newest valid one")
    parser.add_argument(
        "--resume-verified", action="store_true", help="the --resume directory is verified already: hash nothing"
    )
    parser.add_argument("--result", type=Path, default=None, help="where rank 0 writes the outcome as JSON")
    parser.add_argument("--time-budget-s", type=float, default=None, help="save and stop after this many seconds")
    parser.add_argument("--manifest-extra", default="{}", help="JSON object added to every checkpoint manifest")
    return parser.parse_args(argv)


def exit_without_interpreter_teardown(status: int) -> None:
    """End a torchrun rank (with explicit cleanup) as a normal exit would, minus the interpreter's teardown.

    Functional collectives (FSDP2's DTensors use them) keep the gloo process group alive after
    destroy_process_group, its threads still running (torch 2.15, CPU). Tearing the interpreter down under those
    threads now and then aborts a rank that has finished ("terminate called without an active exception", exit
    -6: 1 in 15 runs of one series here, once in CI), and torchrun reports the whole job failed. The exit handlers
    still run first: multiprocessing's releases the semaphores of any DataLoader queue still alive (without it the
    resource tracker reports them leaked) and logging's flushes the log.
    """
    atexit._run_exitfuncs()  # what sys.exit would run; the teardown that follows it is what os._exit skips
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
