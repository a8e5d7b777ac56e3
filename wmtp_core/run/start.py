"""The one function that chooses which checkpoint a run starts from or reads: train, resume, evaluate, generate and
the rho1 reference all ask choose_checkpoint, so they follow the same rules and say the same things.

Imports no torch: the CLI and Prefect tasks choose cheaply (the chosen checkpoint is hashed once, here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from wmtp_core.checkpoint.manifest import (
    CheckpointError,
    Verdicts,
    latest_valid_checkpoint,
    read_manifest,
    verdict_of,
)
from wmtp_core.layout import STEP_DIR, RunLayout

Latest = Literal["latest"]
At = Latest | int | Path | None
"""Which checkpoint: None (a fresh start, or for a reader the newest), "latest" (the newest valid one), a step of
the run, or a checkpoint directory (of any run)."""


class StartPoint(BaseModel):
    """Where a run starts: fresh (no checkpoint), or a verified checkpoint directory and its step."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    checkpoint: Path | None = None
    """The checkpoint directory to load, verified against its manifest when chosen; None starts fresh."""
    step: int = 0
    """The optimizer step of that checkpoint (0 for a fresh start)."""

    @property
    def fresh(self) -> bool:
        return self.checkpoint is None

    def describe(self) -> str:
        return "new" if self.fresh else f"from {self.checkpoint} (step {self.step})"


FRESH = StartPoint()


def choose_checkpoint(
    layout: RunLayout,
    at: At,
    *,
    continuing: bool,
    fresh_if_none: bool = False,
    checksums: bool = True,
    verdicts: Verdicts | None = None,
    option: str = "resume",
) -> StartPoint:
    """The checkpoint of the run in layout that `at` names, verified (presence and sizes only with checksums=False).

    continuing (train, resume): the run continues from it and saves after it, so it must be the run's newest valid
    checkpoint (an older one would be overwritten), and a fresh start (at None) refuses a run that has checkpoints.
    Otherwise (evaluate, generate, the rho1 reference) any valid checkpoint may be read, and None means the newest.
    fresh_if_none: "latest" on a run without checkpoints starts fresh instead of failing. option names `at` the way
    the caller's user sets it (e.g. "--step"). verdicts (updated here) holds what is known already: nothing known
    valid is hashed again. Raises CheckpointError, FileNotFoundError or FileExistsError saying what to do.
    """
    known = verdicts if verdicts is not None else {}
    if at is None and continuing:
        if latest_valid_checkpoint(layout.root, checksums=False) is not None:  # any complete one: nothing is hashed
            raise FileExistsError(
                f"run {layout.name!r} already has checkpoints; resume it (resume=latest, `wmtp resume {layout.name}`) "
                "or pick another run.name"
            )
        return FRESH
    if at is None or at == "latest":
        return _newest(layout, checksums=checksums, verdicts=known, fresh_if_none=fresh_if_none)
    path = layout.checkpoint(at) if isinstance(at, int) else Path(at).resolve()
    problem = verdict_of(path, known, checksums=checksums)
    if problem is not None:
        raise CheckpointError(f"{option} {at}: {problem} {_see(layout)}")
    chosen = StartPoint(checkpoint=path, step=_step_of(path))
    if continuing:
        newest = latest_valid_checkpoint(layout.root, verdicts=known, checksums=checksums)
        if newest is not None and newest.path != path:
            raise FileExistsError(
                f"run {layout.name!r} already has checkpoints up to step {newest.step}, so it continues only from "
                f"the newest (resume=latest); to branch from {path}, pass it as resume with a new run.name"
            )
    return chosen


def _newest(layout: RunLayout, *, checksums: bool, verdicts: Verdicts, fresh_if_none: bool) -> StartPoint:
    newest = latest_valid_checkpoint(layout.root, verdicts=verdicts, checksums=checksums)
    if newest is not None:
        return StartPoint(checkpoint=newest.path, step=newest.step)
    if fresh_if_none:
        return FRESH
    raise FileNotFoundError(f"run {layout.name!r} has no valid checkpoint in {layout.checkpoints} {_see(layout)}")


def _step_of(path: Path) -> int:
    """The step a checkpoint directory's name says (its manifest when it is named otherwise)."""
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else int(read_manifest(path)["step"])


def _see(layout: RunLayout) -> str:
    return f"(see `wmtp checkpoints {layout.name}`)"
