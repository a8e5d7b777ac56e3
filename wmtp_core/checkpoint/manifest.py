"""Checkpoint directories without tensors: naming, manifests (sha256 and size per file), listing, pruning.

Imports no torch, so the CLI and Prefect tasks can list and verify checkpoints cheaply. A step directory
counts only when its manifest.json, written last, verifies against every file it lists.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
FINAL_MODEL_CONFIG = "model_config.json"  # beside model.safetensors in an exported final model
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory or file and the problem."""


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    valid: bool
    problem: str | None = None


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def verify_checkpoint(path: Path, *, checksums: bool = True) -> dict:
    """Return the manifest if every listed file matches its size and sha256, else raise CheckpointError.

    checksums=False checks presence and sizes only: enough to tell a finished save from a torn one, at no read cost.
    """
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} has no {MANIFEST_FILE}: the save did not finish (or it was just pruned)"
        ) from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({error.msg})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}"
        )
    for name, expected in manifest["files"].items():
        _verify_file(path / name, expected, checksum=checksums)
    return manifest


def list_checkpoints(run_dir: Path, *, checksums: bool = True) -> list[CheckpointInfo]:
    """Every step directory of the run, oldest first, each verified against its manifest."""
    found = []
    parent = checkpoints_dir(run_dir)
    for entry in sorted(parent.iterdir()) if parent.is_dir() else []:
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            try:
                verify_checkpoint(entry, checksums=checksums)
                found.append(CheckpointInfo(int(match.group(1)), entry, valid=True))
            except CheckpointError as error:
                found.append(CheckpointInfo(int(match.group(1)), entry, valid=False, problem=str(error)))
    return found


def latest_valid_checkpoint(run_dir: Path) -> CheckpointInfo | None:
    """The newest checkpoint whose manifest verifies; tampered or half-written ones are skipped."""
    valid = [info for info in list_checkpoints(run_dir) if info.valid]
    return valid[-1] if valid else None


def prune_checkpoints(run_dir: Path, *, keep_last: int) -> list[Path]:
    """Delete all but the newest keep_last valid checkpoints (and anything older); return what was removed.

    Validity here is presence and size (no re-hashing of every kept checkpoint at every save); loading still
    verifies the sha256 of the checkpoint it uses, and skips to an older one when it does not match.
    """
    infos = list_checkpoints(run_dir, checksums=False)
    valid_steps = [info.step for info in infos if info.valid]
    if len(valid_steps) <= keep_last:
        return []
    oldest_kept = valid_steps[-keep_last]
    removed = [info.path for info in infos if info.step < oldest_kept]
    for path in removed:
        shutil.rmtree(path)
    return removed


def describe_files(directory: Path, *, skip: set[str] = frozenset()) -> dict[str, dict]:
    """describe_file of every file under directory (subdirectories included, names in skip left out), keyed by
    relative POSIX path. Files are hashed in parallel threads (hashlib releases the GIL)."""
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
    return file_entry(_sha256(path), path.stat().st_size)


def file_entry(sha256_hex: str, size: int) -> dict:
    """One file's manifest entry: its sha256 and its size in bytes."""
    return {"sha256": sha256_hex, "size": size}


def _verify_file(path: Path, expected: dict, *, checksum: bool = True) -> None:
    try:
        matches = path.stat().st_size == expected["size"] and (not checksum or _sha256(path) == expected["sha256"])
    except FileNotFoundError:  # also when a concurrent prune removes the directory while it is being listed
        raise CheckpointError(f"{path} is listed in the manifest but missing") from None
    if not matches:
        raise CheckpointError(f"{path} does not match its manifest checksum: the file was modified or truncated")


def _sha256(path: Path) -> str:
    """Hash through a memory map: no copy of the file into Python memory, and the GIL is released while hashing."""
    if path.stat().st_size == 0:
        return hashlib.sha256(b"").hexdigest()
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return hashlib.sha256(mapped).hexdigest()
