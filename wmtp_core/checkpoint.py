"""The one place that writes and loads checkpoints (wmtp_core.manifest verifies, lists and prunes them).

Layout: <run_dir>/checkpoints/step_<8 digits>/ holding model.safetensors (full weights), train_state.pt
(everything else, loadable with torch.load(weights_only=True)) and manifest.json (sha256 and size per file),
written last. The directory is built under a temporary name and appears by an atomic rename, and only
directories whose manifest verifies count.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from wmtp_core.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    CheckpointError,
    checkpoints_dir,
    describe_files,
    step_dir_name,
    verify_checkpoint,
)

MODEL_FILE, STATE_FILE = "model.safetensors", "train_state.pt"


def save_checkpoint(
    run_dir: Path, *, step: int, model_state: dict[str, torch.Tensor], train_state: dict, manifest_extra: dict
) -> Path:
    """Write one checkpoint atomically and return its directory; an existing one for the same step is replaced."""
    parent = checkpoints_dir(run_dir)
    final = parent / step_dir_name(step)
    staging = parent / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({name: tensor.contiguous() for name, tensor in model_state.items()}, staging / MODEL_FILE)
    torch.save(train_state, staging / STATE_FILE)
    for written in (staging / MODEL_FILE, staging / STATE_FILE):
        _fsync_file(written)
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": describe_files(staging), **manifest_extra}
    _write_synced(staging / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))
    if final.exists():
        # A retried step: set the old copy aside first so a valid checkpoint exists at every instant.
        stale = parent / f".old-{step_dir_name(step)}-{os.getpid()}"
        final.rename(stale)
        shutil.rmtree(stale)
    staging.rename(final)
    _fsync_dir(parent)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model_state, train_state, manifest) of a verified checkpoint; nothing is unpickled beyond plain data."""
    manifest = verify_checkpoint(path)
    model_state = load_file(path / MODEL_FILE)
    try:
        train_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise CheckpointError(f"{path / STATE_FILE} holds objects that are not plain data; refusing it ({error})".splitlines()[0]) from None
    return model_state, train_state, manifest


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
