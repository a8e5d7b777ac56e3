"""File digests for checkpoint manifests: BLAKE3 for format 2 (`b3sum FILE` prints the same hex), sha256 for the
format-1 manifests written before it. Imports no torch.

Every read-back hash of a checkpoint file goes through file_digest, so what a command hashes can be counted there.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Callable
from pathlib import Path

import blake3

DIGEST_ALGORITHM = "blake3"
"""What new checkpoints are hashed with (manifest format 2)."""
ALGORITHMS = ("blake3", "sha256")
"""What a manifest may name: blake3 (format 2), sha256 (format 1)."""

# A file read back is hashed in pieces of this size, so progress moves at least every few tens of milliseconds.
_PIECE_BYTES = 64 << 20


def new_hasher(algorithm: str, *, threads: bool = False):
    """A hashlib-style object (update, hexdigest) for algorithm.

    threads=True lets BLAKE3 spread one large update over every core: right when a file is read back and nothing
    else runs, wrong when it is hashed while being written (the write needs a core of its own).
    """
    match algorithm:
        case "blake3":
            return blake3.blake3(max_threads=blake3.blake3.AUTO if threads else 1)
        case "sha256":
            return hashlib.sha256()
    raise ValueError(f"unknown digest algorithm {algorithm!r}; a manifest may name one of {list(ALGORITHMS)}")


def file_digest(path: Path, algorithm: str, *, on_bytes: Callable[[int], None] | None = None) -> str:
    """Hex digest of a file on disk, read through a memory map (no copy into Python memory; both hashers release
    the GIL on large buffers); on_bytes(n) is called after each piece of n bytes is hashed."""
    hasher = new_hasher(algorithm, threads=True)
    if path.stat().st_size == 0:  # mmap refuses an empty file
        return hasher.hexdigest()
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with memoryview(mapped) as view:
            for start in range(0, len(view), _PIECE_BYTES):
                piece = view[start : start + _PIECE_BYTES]
                hasher.update(piece)
                piece.release()
                if on_bytes is not None:
                    on_bytes(min(_PIECE_BYTES, len(view) - start))
    return hasher.hexdigest()
