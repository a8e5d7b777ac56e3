"""Small state files (summaries, plans, results) replaced whole: a reader, or a run killed mid-write, sees the old
file or the new one, never a part of one, and a write that fails (a full disk) leaves the old one as it was."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Replace path's content with text: written beside it, flushed to disk, renamed over it, the directory
    flushed. On failure the partial file is removed and path is untouched."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with staging.open("w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)
