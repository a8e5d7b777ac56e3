"""Progress bars for the CLI's long commands (rich, on stderr so that --json output stays one clean line).

The work reports through a plain callback, on_progress(description, done, total), in bytes or in counts, so the
library and the tasks never import rich: each description gets a bar of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from wmtp_core.progress import DescribedProgress


@contextmanager
def byte_progress_bars() -> Iterator[DescribedProgress]:
    """Yields on_progress(description, done_bytes, total_bytes); a bar per description, drawn until the block ends.
    Off a terminal (CI logs, pipes) rich draws each bar once, as it ends."""
    with _progress_bars(DownloadColumn(), TransferSpeedColumn()) as on_progress:
        yield on_progress


@contextmanager
def count_progress_bars() -> Iterator[DescribedProgress]:
    """The same for counted work (tests run, problems completed): on_progress(description, done, total)."""
    with _progress_bars(MofNCompleteColumn()) as on_progress:
        yield on_progress


@contextmanager
def _progress_bars(*figures: ProgressColumn) -> Iterator[DescribedProgress]:
    columns = (TextColumn("{task.description}"), BarColumn(), *figures, TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        bars: dict[str, TaskID] = {}

        def on_progress(description: str, done: int, total: int) -> None:
            if description not in bars:
                bars[description] = progress.add_task(description, total=total)
            progress.update(bars[description], completed=done, total=total)

        yield on_progress
