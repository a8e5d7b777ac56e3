"""Converting a sharded checkpoint (torch.distributed.checkpoint shards under sharded/) to the full format
(model.safetensors + the optimizer in train_state.pt), in place, without holding the state in memory: the shards
are gathered into a scratch file mapped into memory (pages the kernel may write out and drop at will) and the full
files are written from there.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from wmtp_core.checkpoint.manifest import CheckpointError, checkpoint_bytes, read_manifest, verify_checkpoint
from wmtp_core.checkpoint.storage import (
    SHARDED_DIR,
    STATE_FILE,
    load_train_state,
    save_checkpoint,
    single_process_is_intended,
)
from wmtp_core.progress import CountProgress

_ALIGN = 64  # each tensor starts on a 64-byte boundary of the scratch file (as torch.save aligns its records)
_GROUP_BYTES = 256 << 20  # the shards are gathered this many bytes at a time, so progress moves as they arrive


def convert_to_full(path: Path, run_dir: Path, *, on_progress: CountProgress | None = None) -> Path:
    """Rewrite a sharded checkpoint as the full format, in place. on_progress(done_bytes, total_bytes) follows the
    checkpoint's verification, the gathering of its shards, then the writing of the full files."""
    manifest = read_manifest(path)
    if manifest.get("format") != "sharded":
        raise CheckpointError(f"{path} is already in the full format")
    metadata = FileSystemReader(path / SHARDED_DIR).read_metadata()
    data_bytes = sum(_nbytes(md) for md in metadata.state_dict_metadata.values() if _is_tensor(md))
    progress = _Progress(checkpoint_bytes(manifest) + 2 * data_bytes, on_progress)
    verify_checkpoint(path, on_progress=progress.follow())
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        full = gather_mapped(path / SHARDED_DIR, Path(scratch) / "gathered", on_bytes=progress.add)
        train_state = {**load_train_state(path / STATE_FILE), "optimizer": full["optimizer"]}
        extra = {k: v for k, v in manifest.items() if k not in ("format_version", "step", "files", "format")}
        converted = save_checkpoint(
            run_dir,
            step=manifest["step"],
            model_state=full["model"],
            train_state=train_state,
            manifest_extra=extra,
            on_bytes=progress.add,
        )
    progress.finish()
    return converted


def gather_mapped(sharded: Path, scratch: Path, *, only: str | None = None, on_bytes=None) -> dict:
    """The full state saved in a torch.distributed.checkpoint directory, nested as it was saved ({"model": ...,
    "optimizer": ...}), its tensors over a shared memory map of the new file scratch; only: just that top-level
    key's entries ("model": the weights, not the optimizer). on_bytes(n) follows the tensor bytes gathered."""
    reader = FileSystemReader(sharded)
    metadata = reader.read_metadata()
    keys = [k for k in metadata.state_dict_metadata if only is None or _path_of(metadata, k)[0] == only]
    flat = _mapped_tensors(metadata, keys, scratch)
    for group in _groups(metadata, keys):
        loaded = {k: flat.get(k) for k in group}  # tensors are filled in place; other values are set here
        with single_process_is_intended():
            dcp.load(loaded, storage_reader=reader, no_dist=True)
        flat.update(loaded)
        if on_bytes is not None:
            on_bytes(sum(_nbytes(md) for k in group if _is_tensor(md := metadata.state_dict_metadata[k])))
    return _nested({k: flat.get(k) for k in keys}, metadata)


def _mapped_tensors(metadata: Metadata, keys: list[str], scratch: Path) -> dict[str, torch.Tensor]:
    """An empty full-size tensor for each tensor key, each over its own region of one scratch file mapped shared
    (its own storage: torch.save writes a tensor's whole storage, so tensors must not share one)."""
    layout, offset = {}, 0
    for key in keys:
        md = metadata.state_dict_metadata[key]
        if _is_tensor(md) and _nbytes(md):
            layout[key], offset = offset, offset + -(-_nbytes(md) // _ALIGN) * _ALIGN
    with scratch.open("wb") as f:
        f.truncate(max(offset, 1))  # sparse: the disk fills only as the shards are gathered
    tensors = {}
    for key in keys:
        md = metadata.state_dict_metadata[key]
        if key in layout:
            region = np.memmap(scratch, dtype=np.uint8, mode="r+", offset=layout[key], shape=(_nbytes(md),))
            tensors[key] = torch.from_numpy(region).view(md.properties.dtype).view(md.size)
        elif _is_tensor(md):
            tensors[key] = torch.empty(md.size, dtype=md.properties.dtype)
    return tensors


def _groups(metadata: Metadata, keys: list[str]) -> list[list[str]]:
    groups, current, size = [], [], 0
    for key in keys:
        md = metadata.state_dict_metadata[key]
        current.append(key)
        size += _nbytes(md) if _is_tensor(md) else 0
        if size >= _GROUP_BYTES:
            groups, current, size = [*groups, current], [], 0
    return [*groups, current] if current else groups


def _nested(flat: dict, metadata: Metadata) -> dict:
    """Flat keys back into the nesting they were saved with (the object paths the checkpoint records)."""
    root: dict = {}
    for key, value in flat.items():
        path = _path_of(metadata, key)
        container = root
        for step, following in zip(path[:-1], path[1:]):
            default = {} if isinstance(following, str) else []
            if isinstance(container, list):
                container.extend([None] * (step + 1 - len(container)))
                container[step] = default if container[step] is None else container[step]
            else:
                container.setdefault(step, default)
            container = container[step]
        if isinstance(container, list):
            container.extend([None] * (path[-1] + 1 - len(container)))
        container[path[-1]] = value
    return root


def _path_of(metadata: Metadata, key: str) -> tuple:
    return tuple(metadata.planner_data[key]) if metadata.planner_data and key in metadata.planner_data else (key,)


def _is_tensor(md) -> bool:
    return isinstance(md, TensorStorageMetadata)


def _nbytes(md: TensorStorageMetadata) -> int:
    return md.size.numel() * torch.empty((), dtype=md.properties.dtype).element_size()


class _Progress:
    """Bytes done over a known total, reported to on_progress from any thread."""

    def __init__(self, total: int, on_progress: CountProgress | None):
        self.total, self.done, self.on_progress = total, 0, on_progress
        self._lock = threading.Lock()

    def add(self, num_bytes: int) -> None:
        with self._lock:
            self.done = min(self.done + num_bytes, self.total)
            if self.on_progress is not None:
                self.on_progress(self.done, self.total)

    def follow(self) -> CountProgress:
        """An on_progress callback for a step that reports its own running total (verification)."""
        start = self.done
        return lambda done, total: self.add(start + done - self.done)

    def finish(self) -> None:
        self.add(self.total - self.done)
