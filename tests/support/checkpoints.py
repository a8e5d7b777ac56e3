"""Reading what a checkpoint holds, whatever its format."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def full_model_state(checkpoint: Path) -> dict:
    """A checkpoint's full model weights: its model.safetensors or, for a sharded checkpoint, that of a converted
    copy (torch.distributed.checkpoint's own consolidation). The checkpoint itself is left as it is."""
    from safetensors.torch import load_file

    from wmtp_core.checkpoint.conversion import convert_to_full
    from wmtp_core.checkpoint.storage import MODEL_FILE

    if (checkpoint / MODEL_FILE).is_file():
        return load_file(checkpoint / MODEL_FILE)
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "checkpoints" / checkpoint.name
        shutil.copytree(checkpoint, copy)
        return load_file(convert_to_full(copy, Path(scratch)) / MODEL_FILE)


def copy_run_up_to(source: Path, target: Path, step: int) -> None:
    """A run directory holding only source's checkpoints up to `step`: an interrupted run."""
    for checkpoint in sorted((source / "checkpoints").glob("step_*")):
        if int(checkpoint.name.removeprefix("step_")) <= step:
            shutil.copytree(checkpoint, target / "checkpoints" / checkpoint.name)
