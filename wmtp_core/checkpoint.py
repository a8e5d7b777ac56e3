"""The one place that writes and loads checkpoints (wmtp_core.manifest verifies, lists and prunes them).

Layout: <run_dir>/checkpoints/step_<8 digits>/ holding model.safetensors (full weights), train_state.pt
(everything else, loadable with torch.load(weights_only=True)) and manifest.json (sha256 and size per file),
written last. The sharded format (checkpoint.format=sharded) has a torch.distributed.checkpoint directory
`sharded/` with model and optimizer shards instead of model.safetensors and the optimizer. The directory is built under a temporary name and appears by an atomic rename, and only
directories whose manifest verifies count.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from wmtp_core.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    CheckpointError,
    checkpoints_dir,
    describe_files,
    step_dir_name,
    verify_checkpoint,
)

MODEL_FILE, STATE_FILE, SHARDED_DIR = "model.safetensors", "train_state.pt", "sharded"


def save_checkpoint(
    run_dir: Path, *, step: int, model_state: dict[str, torch.Tensor], train_state: dict, manifest_extra: dict,
    export: Callable[[Path, dict[str, torch.Tensor]], None] | None = None,
) -> Path:
    """Write one full-format checkpoint atomically and return its directory; one for the same step is replaced.

    export(staging, model_state) may add files (an hf run's save_pretrained copy under hf/); the manifest covers them.
    """
    staging = staging_dir(run_dir, step, owner=str(os.getpid()))
    save_file(_unshared(model_state), staging / MODEL_FILE)
    torch.save(train_state, staging / STATE_FILE)
    if export is not None:
        export(staging, model_state)
    return publish_checkpoint(staging, run_dir, step=step, manifest_extra={"format": "full", **manifest_extra})


def _unshared(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with its own memory: safetensors refuses tensors that share it, as tied weights do
    (GPT-2's embedding and unembedding); loading the two copies fills the one parameter twice with the same values."""
    seen, unshared = set(), {}
    for name, tensor in model_state.items():
        tensor = tensor.contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        unshared[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return unshared


def staging_dir(run_dir: Path, step: int, *, owner: str) -> Path:
    """An empty directory to build a checkpoint in; every rank of a job passes the same owner to share it."""
    staging = checkpoints_dir(run_dir) / f".tmp-{step_dir_name(step)}-{owner}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def write_sharded(staging: Path, shards: dict) -> None:
    """Every rank writes its own shards into staging/sharded (a torch.distributed.checkpoint directory)."""
    with _single_process_is_intended():
        dcp.save(shards, checkpoint_id=staging / SHARDED_DIR, no_dist=not dist.is_initialized())


def publish_checkpoint(staging: Path, run_dir: Path, *, step: int, manifest_extra: dict) -> Path:
    """fsync what staging holds, write the manifest last, and rename staging to step_<step> atomically."""
    written = sorted(p for p in staging.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=2) as pool:
        synced = pool.submit(lambda: [_fsync_file(path) for path in written])  # the disk flushes while we hash
        files = describe_files(staging)
        synced.result()
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files, **manifest_extra}
    _write_synced(staging / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))
    parent = checkpoints_dir(run_dir)
    final = parent / step_dir_name(step)
    if final.exists():
        # A retried step: set the old copy aside first so a valid checkpoint exists at every instant.
        stale = parent / f".old-{step_dir_name(step)}-{os.getpid()}"
        final.rename(stale)
        shutil.rmtree(stale)
    staging.rename(final)
    _fsync_dir(parent)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor] | None, dict, dict]:
    """(model_state, train_state, manifest) of a verified checkpoint; model_state is None for the sharded format
    (load_sharded reads it). Nothing is unpickled beyond plain data."""
    manifest = verify_checkpoint(path)
    model_state = load_file(path / MODEL_FILE) if manifest.get("format", "full") == "full" else None
    return model_state, load_train_state(path / STATE_FILE), manifest


def load_train_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise CheckpointError(f"{path} holds objects that are not plain data; refusing it ({error})".splitlines()[0]) from None


def load_sharded(path: Path, template: dict) -> None:
    """Fill template (this rank's current state dicts, giving shapes and sharding) from path/sharded, in place;
    the saving job's world size does not matter (torch.distributed.checkpoint reshards)."""
    with _single_process_is_intended():
        dcp.load(template, checkpoint_id=path / SHARDED_DIR, no_dist=not dist.is_initialized())


def convert_to_full(path: Path, run_dir: Path) -> Path:
    """Rewrite a sharded checkpoint as the full format (model.safetensors + optimizer in train_state.pt), in place."""
    manifest = verify_checkpoint(path)
    if manifest.get("format") != "sharded":
        raise CheckpointError(f"{path} is already in the full format")
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        gathered = Path(scratch) / "gathered.pt"
        dcp_to_torch_save(path / SHARDED_DIR, gathered)
        full = torch.load(gathered, map_location="cpu", weights_only=True)
    train_state = {**load_train_state(path / STATE_FILE), "optimizer": full["optimizer"]}
    extra = {k: v for k, v in manifest.items() if k not in ("format_version", "step", "files", "format")}
    return save_checkpoint(run_dir, step=manifest["step"], model_state=full["model"], train_state=train_state,
                           manifest_extra=extra)


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


@contextlib.contextmanager
def _single_process_is_intended():
    """torch.distributed.checkpoint warns on every single-process save/load, even with no_dist=True; here one
    process is a supported way to save or read a sharded checkpoint, so that warning says nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


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
