"""The one place that writes and loads checkpoints (wmtp_core.checkpoint.manifest verifies, lists and prunes them).

Layout: <run_dir>/checkpoints/step_<8 digits>/ holding model.safetensors (full weights), train_state.pt
(everything else, loadable with torch.load(weights_only=True)) and manifest.json (BLAKE3 digest and size per file,
format 2; format-1 sha256 manifests still load), written last. The sharded format (checkpoint.format=sharded) has
a torch.distributed.checkpoint directory `sharded/` with model and optimizer shards instead of model.safetensors
and the optimizer. The directory is built
under a temporary name and appears by an atomic rename, and only directories whose manifest verifies count; it is
fsynced on publishing or, for a run's saves, just after (make_durable), before anything older is pruned.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from wmtp_core.checkpoint.hashed_files import save_safetensors_hashed, torch_save_hashed
from wmtp_core.checkpoint.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    CheckpointError,
    checkpoints_dir,
    describe_files,
    verify_checkpoint,
)
from wmtp_core.checkpoint.save_dirs import removed_on_failure, staging_dir, state_bytes
from wmtp_core.layout import step_dir_name

MODEL_FILE, STATE_FILE, SHARDED_DIR = "model.safetensors", "train_state.pt", "sharded"


def save_checkpoint(
    run_dir: Path,
    *,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict,
    manifest_extra: dict,
    export: Callable[[Path, dict[str, torch.Tensor]], None] | None = None,
    durable: bool = True,
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Write one full-format checkpoint atomically and return its directory; one for the same step is replaced.

    The two files are written at the same time, each hashed while it is written (wmtp_core.checkpoint.hashed_files):
    the digest is the bound on a save, and this spreads it over two cores (the larger train_state.pt pipelines its
    hash, the model file hashes in its own writing thread). export(staging, model_state) may add files (an hf run's
    save_pretrained copy under hf/); the manifest covers them. durable: see publish_checkpoint. on_bytes(n), from
    either writing thread, follows the bytes written.
    """
    staging = staging_dir(run_dir, step, owner=str(os.getpid()))
    with removed_on_failure(staging, step=step, needed=lambda: state_bytes(model_state, train_state)):
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="wmtp-model-file") as pool:
            model_file = pool.submit(
                save_safetensors_hashed, model_state, staging / MODEL_FILE, pipelined=False, on_bytes=on_bytes
            )
            train_state_entry = torch_save_hashed(train_state, staging / STATE_FILE, on_bytes=on_bytes)
            described = {STATE_FILE: train_state_entry, MODEL_FILE: model_file.result()}
        if export is not None:
            export(staging, model_state)
        return publish_checkpoint(
            staging,
            run_dir,
            step=step,
            manifest_extra={"format": "full", **manifest_extra},
            described=described,
            durable=durable,
        )


def write_sharded(staging: Path, shards: dict, *, process_group: dist.ProcessGroup | None = None) -> None:
    """Every rank writes its own shards into staging/sharded (a torch.distributed.checkpoint directory); the
    write's collectives run on process_group (None: the default group)."""
    with single_process_is_intended():
        dcp.save(
            shards, checkpoint_id=staging / SHARDED_DIR, process_group=process_group, no_dist=not dist.is_initialized()
        )


def publish_checkpoint(
    staging: Path,
    run_dir: Path,
    *,
    step: int,
    manifest_extra: dict,
    described: dict | None = None,
    durable: bool = True,
) -> Path:
    """Write the manifest last and rename staging to step_<step> atomically; files not in `described` (manifest
    entries already computed) are hashed here.

    durable=False returns before the disk has the bytes: the caller must run make_durable(path) before it prunes
    anything older (a run does so in the background while training goes on). Until then a machine crash may tear
    this checkpoint, which its checksums reveal; loading then falls back to the older one, still on disk.
    """
    described = described or {}
    files = {**describe_files(staging, skip=set(described)), **described}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files, **manifest_extra}
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    parent = checkpoints_dir(run_dir)
    final = parent / step_dir_name(step)
    if final.exists():
        # A retried step: the new copy is made durable and the old one set aside before the swap, so a valid
        # checkpoint for this step exists at every instant, whatever happens to the machine.
        make_durable(staging)
        stale = parent / f".old-{step_dir_name(step)}-{os.getpid()}"
        final.rename(stale)
        shutil.rmtree(stale)
    staging.rename(final)
    if durable:
        make_durable(final)
    return final


def make_durable(path: Path) -> None:
    """fsync every file of a checkpoint directory, the directory and its parent: after this a power loss cannot
    take the checkpoint. The files are flushed in parallel threads (os.fsync releases the GIL)."""
    written = sorted(p for p in path.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(written)))) as pool:
        list(pool.map(fsync_file, written))
    for directory in sorted({p.parent for p in written} | {path}, reverse=True):
        _fsync_dir(directory)
    _fsync_dir(path.parent)


def load_checkpoint(path: Path, *, verified: bool = False) -> tuple[dict[str, torch.Tensor] | None, dict, dict]:
    """(model_state, train_state, manifest) of a checkpoint; model_state is None for the sharded format
    (load_sharded reads it). Nothing is unpickled beyond plain data, and nothing is copied into memory: tensors are
    views of the files (read_checkpoint_manifest says what verified means)."""
    manifest = read_checkpoint_manifest(path, verified=verified)
    model_state = open_model_state(path) if manifest.get("format", "full") == "full" else None
    return model_state, load_train_state(path / STATE_FILE), manifest


def read_checkpoint_manifest(path: Path, *, verified: bool) -> dict:
    """The manifest of a checkpoint whose files are present at their sizes; their digests are checked too unless
    verified (the caller holds a verdict for this checkpoint: wmtp_core.checkpoint.manifest.Verdicts)."""
    return verify_checkpoint(path, checksums=not verified)


def open_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The full model weights of a full-format checkpoint, as tensors over a private memory map of
    model.safetensors: a page is read when a tensor is first used, and never unless it is."""
    with safe_open(path / MODEL_FILE, framework="pt", device="cpu") as weights:
        return {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def load_train_state(path: Path) -> dict:
    """train_state.pt as plain data, its tensors over a memory map of the file (torch.load(mmap=True)): what a
    rank never uses (the optimizer state on a rank that receives rank 0's by broadcast) is never read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise CheckpointError(
            f"{path} holds objects that are not plain data; refusing it ({error})".splitlines()[0]
        ) from None


def load_sharded(path: Path, template: dict) -> None:
    """Fill template (this rank's current state dicts, giving shapes and sharding) from path/sharded, in place;
    the saving job's world size does not matter (torch.distributed.checkpoint reshards)."""
    with single_process_is_intended():
        dcp.load(template, checkpoint_id=path / SHARDED_DIR, no_dist=not dist.is_initialized())


def check_shapes_match(
    model_state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, source: Path
) -> None:
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
        raise CheckpointError(
            f"{source} does not fit this model (check the model.* recipe keys): {'; '.join(problems)}"
        )


@contextlib.contextmanager
def single_process_is_intended():
    """torch.distributed.checkpoint warns on every single-process save/load, even with no_dist=True; here one
    process is a supported way to save or read a sharded checkpoint, so that warning says nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def fsync_file(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
