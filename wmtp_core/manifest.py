"""Checkpoint directories without tensors: naming, manifests (sha256 and size per file), listing, pruning.

Imports no torch, so the CLI and Prefect tasks can list and verify checkpoints cheaply. A step directory
counts only when its manifest.json, written last, verifies against every file it lists.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
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


def verify_checkpoint(path: Path) -> dict:
    """Return the manifest if every listed file matches its size and sha256, else raise CheckpointError."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST_FILE}: the save did not finish")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({error.msg})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    for name, expected in manifest["files"].items():
        _verify_file(path / name, expected)
    return manifest


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Every step directory of the run, oldest first, each verified against its manifest."""
    found = []
    parent = checkpoints_dir(run_dir)
    for entry in sorted(parent.iterdir()) if parent.is_dir() else []:
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            try:
                verify_checkpoint(entry)
                found.append(CheckpointInfo(int(match.group(1)), entry, valid=True))
            except CheckpointError as error:
                found.append(CheckpointInfo(int(match.group(1)), entry, valid=False, problem=str(error)))
    return found


def latest_valid_checkpoint(run_dir: Path) -> CheckpointInfo | None:
    """The newest checkpoint whose manifest verifies; tampered or half-written ones are skipped."""
    valid = [info for info in list_checkpoints(run_dir) if info.valid]
    return valid[-1] if valid else None


def prune_checkpoints(run_dir: Path, *, keep_last: int) -> list[Path]:
    """Delete all but the newest keep_last valid checkpoints (and anything older); return what was removed."""
    infos = list_checkpoints(run_dir)
    valid_steps = [info.step for info in infos if info.valid]
    if len(valid_steps) <= keep_last:
        return []
    oldest_kept = valid_steps[-keep_last]
    removed = [info.path for info in infos if info.step < oldest_kept]
    for path in removed:
        shutil.rmtree(path)
    return removed


def describe_files(directory: Path) -> dict[str, dict]:
    """sha256 and size of every file under directory (subdirectories included), keyed by relative POSIX path."""
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    return {path.relative_to(directory).as_posix(): {"sha256": _sha256(path), "size": path.stat().st_size} for path in files}


def _verify_file(path: Path, expected: dict) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} is listed in the manifest but missing")
    if path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
        raise CheckpointError(f"{path} does not match its manifest checksum: the file was modified or truncated")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
