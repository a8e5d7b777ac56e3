"""What `wmtp checkpoints` does: list a run's checkpoints, each verified, and convert a sharded one to the full
format, with a progress bar (on stderr, only on a terminal) driven by wmtp_core's on_progress callbacks."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from wmtp_core.checkpoint.digests import ProgressCallback
from wmtp_core.checkpoint.manifest import CheckpointError, list_checkpoints, step_dir_name

INVALID_INPUT = 2


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[ProgressCallback]:
    """A bar of bytes done over bytes in all, as an on_progress(done_bytes, total_bytes) callback. It is drawn on
    stderr and erased when done, so stdout (--json) stays one clean line; off a terminal nothing is drawn."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=min(done, total), total=total)


def print_checkpoints(directory: Path, *, as_json: bool) -> None:
    """Every checkpoint of the run, oldest first, each verified (every file's digest), with why one does not count."""
    with progress_bar(f"verifying {directory.name}") as on_progress:
        infos = list_checkpoints(directory, on_progress=on_progress)
    if as_json:
        rows = [{"step": i.step, "path": str(i.path), "valid": i.valid, "problem": i.problem} for i in infos]
        print(json.dumps(rows))
        return
    for info in infos:
        print(f"{info.step:>10}  {'valid  ' if info.valid else 'INVALID'}  {info.path}  {info.problem or ''}")
    if not infos:
        print(f"run {directory.name} has no checkpoints yet")


def convert_checkpoint(directory: Path, step: int) -> None:
    """Rewrite the run's sharded checkpoint at step in the full format; exit 2 when there is none to convert."""
    from wmtp_core.checkpoint.conversion import convert_to_full  # torch loads here, not for a plain listing

    path = directory / "checkpoints" / step_dir_name(step)
    if not path.is_dir():
        print(
            f"error: run {directory.name} has no checkpoint at step {step} (see `wmtp checkpoints {directory.name}`)",
            file=sys.stderr,
        )
        raise typer.Exit(INVALID_INPUT)
    try:
        with progress_bar(f"converting step {step}") as on_progress:
            converted = convert_to_full(path, directory, on_progress=on_progress)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(INVALID_INPUT) from None
    print(
        f"converted {converted} to the full format (model.safetensors + optimizer in train_state.pt)", file=sys.stderr
    )
