"""The one place that writes, verifies, lists, loads and prunes checkpoints.

Layout: <run_dir>/checkpoints/step_<8 digits>/ holding model.safetensors (full weights), train_state.pt
(everything else, loadable with torch.load(weights_only=True)) and manifest.json (sha256 and size per file),
written last. The directory is built under a temporary name and appears by an atomic rename, and only
directories whose manifest verifies count.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MODEL_FILE, STATE_FILE, MANIFEST_FILE = "model.safetensors", "train_state.pt", "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory or file and the problem."""


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    valid: bool
    problem: str | None = None


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(
    run_dir: Path, *, step: int, model_state: dict[str, torch.Tensor], train_state: dict, manifest_extra: dict
) -> Path:
    """Write one checkpoint atomically and return its directory; an existing one for the same step is replaced."""
    parent = checkpoints_dir(run_dir)
    final = parent / f"step_{step:08d}"
    staging = parent / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({name: tensor.contiguous() for name, tensor in model_state.items()}, staging / MODEL_FILE)
    torch.save(train_state, staging / STATE_FILE)
    for written in (staging / MODEL_FILE, staging / STATE_FILE):
        _fsync_file(written)
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": _describe_files(staging), **manifest_extra}
    _write_synced(staging / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))
    if final.exists():
        # A retried step: set the old copy aside first so a valid checkpoint exists at every instant.
        stale = parent / f".old-step_{step:08d}-{os.getpid()}"
        final.rename(stale)
        shutil.rmtree(stale)
    staging.rename(final)
    _fsync_dir(parent)
    return final


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


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model_state, train_state, manifest) of a verified checkpoint; nothing is unpickled beyond plain data."""
    manifest = verify_checkpoint(path)
    model_state = load_file(path / MODEL_FILE)
    try:
        train_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise CheckpointError(f"{path / STATE_FILE} holds objects that are not plain data; refusing it ({error})".splitlines()[0]) from None
    return model_state, train_state, manifest


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


def check_shapes_match(model_state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, source: Path) -> None:
    """Refuse a checkpoint from a differently shaped model, naming the tensors that do not fit."""
    missing = sorted(set(expected) - set(model_state))
    unexpected = sorted(set(model_state) - set(expected))
    mismatched = [
        f"{name} {tuple(model_state[name].shape)} vs model {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in model_state and model_state[name].shape != tensor.shape
    ]
    problems = [f"missing {missing[:5]}"] * bool(missing) + [f"unexpected {unexpected[:5]}"] * bool(unexpected)
    problems += mismatched[:5]
    if problems:
        raise CheckpointError(f"{source} does not fit this model (check the model.* recipe keys): {'; '.join(problems)}")


def _describe_files(directory: Path) -> dict[str, dict]:
    return {path.name: {"sha256": _sha256(path), "size": path.stat().st_size} for path in sorted(directory.iterdir())}


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


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
