"""Converting a sharded checkpoint (torch.distributed.checkpoint shards under sharded/) to the full format
(model.safetensors + the optimizer in train_state.pt), in place."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from wmtp_core.checkpoint.digests import ProgressCallback
from wmtp_core.checkpoint.manifest import CheckpointError, verify_checkpoint
from wmtp_core.checkpoint.storage import SHARDED_DIR, STATE_FILE, load_train_state, save_checkpoint


def convert_to_full(path: Path, run_dir: Path, *, on_progress: ProgressCallback | None = None) -> Path:
    """Rewrite a sharded checkpoint as the full format, in place; on_progress follows its verification."""
    manifest = verify_checkpoint(path, on_progress=on_progress)
    if manifest.get("format") != "sharded":
        raise CheckpointError(f"{path} is already in the full format")
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        gathered = Path(scratch) / "gathered.pt"
        dcp_to_torch_save(path / SHARDED_DIR, gathered)
        full = torch.load(gathered, map_location="cpu", weights_only=True)
    train_state = {**load_train_state(path / STATE_FILE), "optimizer": full["optimizer"]}
    extra = {k: v for k, v in manifest.items() if k not in ("format_version", "step", "files", "format")}
    return save_checkpoint(
        run_dir, step=manifest["step"], model_state=full["model"], train_state=train_state, manifest_extra=extra
    )
