"""The directories a save builds a checkpoint in (checkpoints/.tmp-step_<N>-<owner>), owned by the save: a save that
fails removes its own, and one a killed process left is removed when the run's next trainer starts.

A save that fails for want of space becomes one OutOfSpaceError naming the file system's directory, the space the
checkpoint needs and the space free: torch reports a full disk as `RuntimeError: [enforce fail at
inline_container.cc] unexpected pos`, which says neither, and a retry would meet the same full disk.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from wmtp_core.checkpoint.manifest import CheckpointError, checkpoints_dir
from wmtp_core.layout import step_dir_name

log = logging.getLogger(__name__)
MIB = 2**20
_SAVE_DEBRIS = re.compile(r"^\.(?:tmp|old)-step_\d+-")
"""A save's staging directory (.tmp-step_<N>-<owner>) or the copy of a retried step it set aside (.old-...)."""


class OutOfSpaceError(CheckpointError):
    """A checkpoint did not fit on its file system. Not retried: a retry meets the same full disk."""


def staging_dir(run_dir: Path, step: int, *, owner: str) -> Path:
    """An empty directory to build a checkpoint in; every rank of a job passes the same owner to share it."""
    staging = checkpoints_dir(run_dir) / f".tmp-{step_dir_name(step)}-{owner}"
    shutil.rmtree(staging, ignore_errors=True)  # a directory of this name is a dead save's, never a live one's
    staging.mkdir(parents=True)
    return staging


@contextlib.contextmanager
def removed_on_failure(staging: Path, *, step: int, needed: Callable[[], int]) -> Iterator[Path]:
    """staging for the block; if the block fails, staging is removed (space back, nothing left behind) and a
    failure for want of space is raised as OutOfSpaceError. needed() gives the checkpoint's size in bytes: asked
    only on failure, so a save that succeeds does not walk its state for it."""
    try:
        yield staging
    except BaseException as error:
        free = shutil.disk_usage(staging.parent).free  # before the removal gives the partial files' space back
        shutil.rmtree(staging, ignore_errors=True)  # ignore_errors: it may be partly gone, or never renamed to
        needed_bytes = needed()
        if _for_want_of_space(error, free=free, needed_bytes=needed_bytes):
            raise OutOfSpaceError(
                f"no space left for the checkpoint of step {step} in {staging.parent}: it needs about "
                f"{needed_bytes / MIB:,.1f} MiB and the file system has {free / MIB:,.1f} MiB free; free some "
                "space (or lower train.keep_last, or move WMTP_HOME to a larger disk), then resume the run"
            ) from error
        raise


def _for_want_of_space(error: BaseException, *, free: int, needed_bytes: int) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch's and safetensors' writers report a failed write as a RuntimeError without the errno
    return isinstance(error, OSError | RuntimeError) and free < needed_bytes


def state_bytes(*trees) -> int:
    """Bytes of the tensors in nested dicts/lists: about what a checkpoint of them takes on disk."""
    total = 0
    for tree in trees:
        if hasattr(tree, "element_size"):  # a tensor (duck-typed: the training task imports this without torch)
            local = tree.to_local() if hasattr(tree, "to_local") else tree  # a DTensor: this rank's shard
            total += local.numel() * local.element_size()
        elif isinstance(tree, dict):
            total += state_bytes(*tree.values())
        elif isinstance(tree, list | tuple):
            total += state_bytes(*tree)
    return total


def remove_save_debris(run_dir: Path) -> list[Path]:
    """Remove the directories killed saves left in the run's checkpoints/. Call it only while holding the run's
    lock (wmtp_core.runtime.run_lock): then no other process of this run is saving, so every such directory not
    owned by this process is a dead writer's. Returns what was removed."""
    parent = checkpoints_dir(run_dir)
    if not parent.is_dir():
        return []
    mine = f"-{os.getpid()}"
    removed = []
    for path in sorted(parent.iterdir()):
        if path.is_dir() and _SAVE_DEBRIS.match(path.name) and not path.name.endswith(mine):
            shutil.rmtree(path)
            removed.append(path)
    if removed:
        log.info("removed %d director(ies) left by killed saves in %s", len(removed), parent)
    return removed
