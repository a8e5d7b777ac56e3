"""Checkpoint directories without tensors: naming, manifests (digest and size per file), listing, pruning.

Imports no torch, so the CLI and Prefect tasks can list and verify checkpoints cheaply. A step directory
counts only when its manifest.json, written last, verifies against every file it lists. Format 2 records a BLAKE3
digest per file; format 1 (sha256) still verifies.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from wmtp_core.checkpoint import digests
from wmtp_core.checkpoint.digests import DIGEST_ALGORITHM
from wmtp_core.layout import STEP_DIR, RunLayout
from wmtp_core.progress import CountProgress

FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
FINAL_MODEL_CONFIG = "model_config.json"  # beside model.safetensors in an exported final model


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory or file and the problem."""


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    valid: bool
    problem: str | None = None


def checkpoints_dir(run_dir: Path) -> Path:
    return RunLayout(run_dir).checkpoints


def read_manifest(path: Path) -> dict:
    """The manifest of the checkpoint directory path, checked for a readable format; no file is hashed."""
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} has no {MANIFEST_FILE}: the save did not finish (or it was just pruned)"
        ) from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({error.msg})") from None
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise CheckpointError(
            f"{manifest_path}: format_version {manifest.get('format_version')} is not one this version reads "
            f"{list(READABLE_FORMAT_VERSIONS)}; upgrade wmtp to load it"
        )
    return manifest


def verify_checkpoint(path: Path, *, checksums: bool = True, on_progress: CountProgress | None = None) -> dict:
    """Return the manifest if every listed file matches its size and digest, else raise CheckpointError.

    checksums=False checks presence and sizes only: enough to tell a finished save from a torn one, at no read cost.
    on_progress(done_bytes, total_bytes) follows the hashing.
    """
    manifest = read_manifest(path)
    progress = _Progress(checkpoint_bytes(manifest) if checksums else 0, on_progress)
    _verify_files(path, manifest, checksums=checksums, on_bytes=progress.add)
    return manifest


def checkpoint_bytes(manifest: dict) -> int:
    """The bytes a manifest lists: what verifying its checkpoint hashes."""
    return sum(entry["size"] for entry in manifest["files"].values())


def list_checkpoints(
    run_dir: Path, *, checksums: bool = True, on_progress: CountProgress | None = None
) -> list[CheckpointInfo]:
    """Every step directory of the run, oldest first, each verified against its manifest; on_progress follows the
    hashing of them all."""
    steps = _step_dirs(run_dir)
    progress = _Progress(sum(_listed_bytes(path) for _, path in steps) if checksums else 0, on_progress)
    return [_checked(step, path, checksums=checksums, on_bytes=progress.add) for step, path in steps]


Verdicts = dict[str, str | None]
"""What a caller already knows of a run's checkpoints: directory (as a string) -> None when it verified (or was
written, hashed while written, by this very run), else why it does not count. Passed along, between functions and
Prefect tasks, so that no checkpoint is hashed twice."""


def latest_valid_checkpoint(
    run_dir: Path,
    *,
    verdicts: Verdicts | None = None,
    checksums: bool = True,
    on_progress: CountProgress | None = None,
) -> CheckpointInfo | None:
    """The newest checkpoint whose manifest verifies; tampered or half-written ones are skipped.

    Scans newest first and stops at the first that verifies, so only the checkpoint returned (and any newer broken
    one) is hashed. A checkpoint with a verdict in `verdicts` is not hashed again (a valid one is still checked for
    presence and sizes: it may have been pruned since); the verdicts reached here are added to it. checksums=False
    checks presence and sizes only (nothing is hashed, no verdict recorded).
    """
    known = verdicts if verdicts is not None else {}
    for step, path in reversed(_step_dirs(run_dir)):
        if known.get(str(path)) is not None:
            continue  # known not to count
        hash_it = checksums and str(path) not in known
        info = _checked(step, path, checksums=hash_it, on_progress=on_progress)
        if hash_it:
            known[str(path)] = info.problem
        if info.valid:
            return info
    return None


def verdict_of(path: Path, verdicts: Verdicts, *, checksums: bool = True) -> str | None:
    """None when the checkpoint at path verifies, else why not; taken from verdicts when it is there, else found
    (hashing the checkpoint) and added to it. checksums=False checks presence and sizes only, and records nothing."""
    if str(path) in verdicts:
        return verdicts[str(path)]
    try:
        verify_checkpoint(path, checksums=checksums)
        problem = None
    except CheckpointError as error:
        problem = str(error)
    if checksums:
        verdicts[str(path)] = problem
    return problem


@dataclass(frozen=True)
class Pruned:
    kept: list[CheckpointInfo]
    """What the run holds after pruning, oldest first (presence and sizes checked): the listing pruning made."""
    removed: list[Path]


def prune_checkpoints(run_dir: Path, *, keep_last: int) -> Pruned:
    """Delete all but the newest keep_last valid checkpoints (and anything older); return what was kept and removed.

    Validity here is presence and size (no re-hashing of every kept checkpoint at every save); loading still
    verifies the digests of the checkpoint it uses, and skips to an older one when they do not match.
    """
    infos = list_checkpoints(run_dir, checksums=False)
    valid_steps = [info.step for info in infos if info.valid]
    oldest_kept = valid_steps[-keep_last] if len(valid_steps) > keep_last else -1
    removed = [info.path for info in infos if info.step < oldest_kept]
    for path in removed:
        shutil.rmtree(path)
    return Pruned(kept=[info for info in infos if info.step >= oldest_kept], removed=removed)


def describe_files(directory: Path, *, skip: set[str] = frozenset()) -> dict[str, dict]:
    """describe_file of every file under directory (subdirectories included, names in skip left out), keyed by
    relative POSIX path. Files are hashed in parallel threads (the hashers release the GIL)."""
    files = [
        path
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.relative_to(directory).as_posix() not in skip
    ]
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(files)))) as pool:
        described = list(pool.map(describe_file, files))
    return {path.relative_to(directory).as_posix(): entry for path, entry in zip(files, described)}


def describe_file(path: Path) -> dict:
    """The manifest entry of one file already on disk (read back to hash it)."""
    return file_entry(digests.file_digest(path, DIGEST_ALGORITHM), path.stat().st_size)


def file_entry(digest_hex: str, size: int, *, algorithm: str = DIGEST_ALGORITHM) -> dict:
    """One file's manifest entry (format 2): the digest's algorithm, the digest and the size in bytes."""
    return {"algorithm": algorithm, "digest": digest_hex, "size": size}


def entry_digest(entry: dict) -> tuple[str, str]:
    """(algorithm, hex digest) of a manifest entry of either format (format 1 entries hold only a sha256)."""
    if "algorithm" in entry:
        return entry["algorithm"], entry["digest"]
    return "sha256", entry["sha256"]


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    parent = checkpoints_dir(run_dir)
    entries = sorted(parent.iterdir()) if parent.is_dir() else []
    return [(int(m.group(1)), e) for e in entries if (m := STEP_DIR.match(e.name)) and e.is_dir()]


def _checked(
    step: int, path: Path, *, checksums: bool, on_bytes=None, on_progress: CountProgress | None = None
) -> CheckpointInfo:
    """The checkpoint's verdict; its manifest is read once (on_progress follows the hashing of this one)."""
    try:
        manifest = read_manifest(path)
        if on_progress is not None and checksums:
            on_bytes = _Progress(checkpoint_bytes(manifest), on_progress).add
        _verify_files(path, manifest, checksums=checksums, on_bytes=on_bytes)
    except CheckpointError as error:
        return CheckpointInfo(step, path, valid=False, problem=str(error))
    return CheckpointInfo(step, path, valid=True)


def _listed_bytes(path: Path) -> int:
    """What verifying path would hash; 0 for a checkpoint whose manifest cannot be read (verifying it fails fast)."""
    try:
        return checkpoint_bytes(read_manifest(path))
    except CheckpointError:
        return 0


def _verify_files(path: Path, manifest: dict, *, checksums: bool, on_bytes) -> None:
    for name, expected in manifest["files"].items():
        _verify_file(path / name, expected, checksum=checksums, on_bytes=on_bytes)


def _verify_file(path: Path, expected: dict, *, checksum: bool, on_bytes) -> None:
    try:
        algorithm, digest = entry_digest(expected)
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"{path} does not match its manifest checksum: {size} bytes where the manifest lists "
                f"{expected['size']} (the file was truncated or rewritten)"
            )
        if checksum and digests.file_digest(path, algorithm, on_bytes=on_bytes) != digest:
            raise CheckpointError(
                f"{path} does not match its manifest checksum ({algorithm} digest): the file was modified"
            )
    except FileNotFoundError:  # also when a concurrent prune removes the directory while it is being listed
        raise CheckpointError(f"{path} is listed in the manifest but missing") from None
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: its manifest entry {expected} is malformed ({error})") from None


class _Progress:
    """Adds up hashed bytes and reports (done, total) to an optional callback."""

    def __init__(self, total: int, on_progress: CountProgress | None):
        self.total, self.done, self.on_progress = total, 0, on_progress

    def add(self, num_bytes: int) -> None:
        self.done += num_bytes
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)
