"""Counting what is hashed: every read-back hash of a checkpoint file goes through wmtp_core.checkpoint.digests."""

from __future__ import annotations

from pathlib import Path

from wmtp_core.checkpoint import digests


class HashedBytes:
    """Counts the bytes of every file hashed (read back) in this process while the test runs."""

    def __init__(self, monkeypatch):
        self.total = 0
        self.files: list[Path] = []
        real = digests.file_digest

        def counting(path, algorithm, *, on_bytes=None):
            self.total += Path(path).stat().st_size
            self.files.append(Path(path))
            return real(path, algorithm, on_bytes=on_bytes)

        monkeypatch.setattr(digests, "file_digest", counting)
