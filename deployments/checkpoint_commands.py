"""What `wmtp checkpoints` does: list a run's checkpoints, each verified, and convert a sharded one to the full
format, with progress bars (deployments.progress_bars, on stderr) driven by wmtp_core's on_progress callbacks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from deployments.cli_options import INVALID_INPUT
from deployments.progress_bars import byte_progress_bars
from wmtp_core.checkpoint.manifest import CheckpointError, list_checkpoints
from wmtp_core.layout import RunLayout


def print_checkpoints(directory: Path, *, as_json: bool) -> None:
    """Every checkpoint of the run, oldest first, each verified (every file's digest), with why one does not count."""
    with byte_progress_bars() as on_progress:
        infos = list_checkpoints(directory, on_progress=lambda done, total: on_progress("verifying", done, total))
    if as_json:
        rows = [{"step": i.step, "path": str(i.path), "valid": i.valid, "problem": i.problem} for i in infos]
        print(json.dumps(rows))
        return
    if not infos:
        print(f"run {directory.name} has no checkpoints yet")
        return
    print(f"{'step':>10}  {'status':<7}  path" + ("  problem" if any(not i.valid for i in infos) else ""))
    for info in infos:
        problem = f"  {info.problem}" if info.problem else ""
        print(f"{info.step:>10}  {'valid' if info.valid else 'INVALID':<7}  {info.path}{problem}")


def convert_checkpoint(directory: Path, step: int) -> None:
    """Rewrite the run's sharded checkpoint at step in the full format; exit 2 when there is none to convert."""
    from wmtp_core.checkpoint.conversion import convert_to_full  # torch loads here, not for a plain listing

    path = RunLayout(directory).checkpoint(step)
    if not path.is_dir():
        print(
            f"error: run {directory.name} has no checkpoint at step {step} (see `wmtp checkpoints {directory.name}`)",
            file=sys.stderr,
        )
        raise typer.Exit(INVALID_INPUT)
    try:
        with byte_progress_bars() as on_progress:
            converted = convert_to_full(
                path, directory, on_progress=lambda done, total: on_progress(f"converting step {step}", done, total)
            )
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(INVALID_INPUT) from None
    print(
        f"converted {converted} to the full format (model.safetensors + optimizer in train_state.pt)", file=sys.stderr
    )
