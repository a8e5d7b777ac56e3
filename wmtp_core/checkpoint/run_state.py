"""A training run's checkpoints: what goes in one (model, optimizer, scheduler, scaler, every rank's RNG, the
loop's progress), in which format (full or sharded), and how a run resumes. Checkpointing is handed the pieces it
saves (RunPieces) and the progress as plain values; it knows nothing of the loop.

Under torchrun every rank calls save_run_checkpoint and restore_run_checkpoint (they hold collectives); rank 0 writes
the full format, every rank writes its shards of the sharded one.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from wmtp_core.checkpoint.hashed_files import torch_save_hashed
from wmtp_core.checkpoint.manifest import CheckpointError, CheckpointInfo, prune_checkpoints
from wmtp_core.checkpoint.save_dirs import removed_on_failure, staging_dir, state_bytes
from wmtp_core.checkpoint.staging import live_storages
from wmtp_core.checkpoint.state_dicts import (
    StateDictAPI,
    gather_sharded_state,
    restore_sharded_state,
    zero_adam_state,
)
from wmtp_core.checkpoint.storage import (
    STATE_FILE,
    check_shapes_match,
    load_sharded,
    load_train_state,
    make_durable,
    open_model_state,
    publish_checkpoint,
    read_checkpoint_manifest,
    save_checkpoint,
    write_sharded,
)
from wmtp_core.checkpoint.writer import CheckpointWriter
from wmtp_core.config import CheckpointConfig
from wmtp_core.runtime.distributed import (
    DistContext,
    background_group,
    barrier,
    broadcast_object,
    gather_objects,
    unwrap,
)


@dataclass(frozen=True)
class RunPieces:
    """What a run checkpoint saves and restores: the model as trained (wrapped or not) and what steps it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    export: Callable[[Path, dict[str, torch.Tensor]], None] | None = None
    """Writes a transformers-loadable copy of the trunk into a checkpoint being built, from the full model state
    (hf models; wmtp_core.models.hf.export_pretrained)."""


@dataclass(frozen=True, kw_only=True)
class SaveSettings:
    """Where and how a run saves: the same for every save of the run."""

    run_dir: Path
    checkpoint: CheckpointConfig
    """checkpoint.format: full or sharded (checkpoint.async_save is the writer's)."""
    keep_last: int
    """train.keep_last: checkpoints kept on disk."""
    timeout_s: int
    """devices.timeout_s: the bound on the collectives of a sharded save in the background."""
    recipe: dict
    """The run's recipe as plain values (Recipe.model_dump(mode="json")), written into every manifest as it is."""
    ctx: DistContext
    state_dicts: StateDictAPI
    writer: CheckpointWriter
    manifest_extra: dict


log = logging.getLogger(__name__)


def save_run_checkpoint(pieces: RunPieces, progress: dict, *, step: int, settings: SaveSettings) -> None:
    """Snapshot the pieces and the loop's progress (plain values) at this step (collectives on every rank) and hand
    the write to settings.writer."""
    ctx, writer, run_dir = settings.ctx, settings.writer, settings.run_dir
    train_state = {
        "scheduler": pieces.scheduler.state_dict(),
        "scaler": pieces.scaler.state_dict(),
        "rng_per_rank": gather_objects(capture_rng(), ctx),
        "progress": progress,
    }
    manifest = {
        "recipe": settings.recipe,
        "torch_version": torch.__version__,
        "world_size": ctx.world_size,
        **settings.manifest_extra,
    }
    settle = (lambda path: _settle(path, run_dir, settings.keep_last)) if ctx.is_main else None
    if settings.checkpoint.format == "sharded":
        _submit_sharded(
            pieces,
            run_dir,
            step,
            train_state,
            manifest,
            ctx=ctx,
            writer=writer,
            settle=settle,
            timeout_s=settings.timeout_s,
        )
        return
    model_state, optim_state = settings.state_dicts.gather(pieces.model, pieces.optimizer, ctx)
    if not ctx.is_main:
        return
    # One process gathers the live tensors themselves: an async save copies them before the next update.
    state = {"model": model_state, "train": {**train_state, "optimizer": optim_state}}
    writer.submit(
        lambda: _save_full(run_dir, step, state["model"], state["train"], manifest, pieces.export),
        settle,
        snapshot=state,
        live=_live(pieces, writer),
    )


def _live(pieces: RunPieces, writer: CheckpointWriter) -> set[int]:
    """What an async save must copy before training changes it (nothing for a synchronous save)."""
    return live_storages(unwrap(pieces.model), pieces.optimizer) if writer.background else set()


def _save_full(
    run_dir: Path, step: int, model_state: dict, train_state: dict, manifest: dict, export: Callable | None = None
) -> Path:
    path = save_checkpoint(
        run_dir,
        step=step,
        model_state=model_state,
        train_state=train_state,
        manifest_extra=manifest,
        export=export,
        durable=False,
    )
    log.info("saved checkpoint %s", path)
    return path


def _settle(path: Path, run_dir: Path, keep_last: int) -> list[CheckpointInfo]:
    """Make the new checkpoint durable, and only then prune older ones: a crash at any point leaves one to resume.
    Returns the run's checkpoints as pruning listed them."""
    make_durable(path)
    return prune_checkpoints(run_dir, keep_last=keep_last).kept


def _submit_sharded(
    pieces: RunPieces,
    run_dir: Path,
    step: int,
    train_state: dict,
    manifest: dict,
    *,
    ctx: DistContext,
    writer: CheckpointWriter,
    settle: Callable[[Path], object] | None,
    timeout_s: int,
) -> None:
    """Every rank writes its own shards, then rank 0 publishes. In the background (async_save) the shards are
    first copied to CPU by the writer (the live ones keep training), and the write's collectives run on a process
    group of their own, apart from training's."""
    staging = staging_dir(run_dir, step, owner="job") if ctx.is_main else None
    barrier(ctx)  # the staging directory exists (and is empty) before any rank writes into it
    staging = broadcast_object(staging, ctx)
    shards = gather_sharded_state(pieces.model, pieces.optimizer)
    group = background_group(ctx, timeout_s=timeout_s) if writer.background else None

    def needed() -> int:
        return state_bytes(shards) * ctx.world_size + state_bytes(train_state)  # every rank's shards, about

    # rank 0 made the staging directory: it removes it if the save fails
    owned = removed_on_failure(staging, step=step, needed=needed) if ctx.is_main else contextlib.nullcontext()

    def write() -> Path:
        with owned:
            write_sharded(staging, shards, process_group=group)
            return _publish_sharded(staging, run_dir, step, train_state, manifest, ctx=ctx, group=group)

    writer.submit(write, settle, snapshot=shards, live=_live(pieces, writer))


def _publish_sharded(
    staging: Path,
    run_dir: Path,
    step: int,
    train_state: dict,
    manifest: dict,
    *,
    ctx: DistContext,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Rank 0 adds train_state.pt and the manifest to the shards every rank has written, and publishes."""
    path = None
    if ctx.is_main:
        described = {STATE_FILE: torch_save_hashed(train_state, staging / STATE_FILE)}
        path = publish_checkpoint(
            staging,
            run_dir,
            step=step,
            manifest_extra={"format": "sharded", **manifest},
            described=described,
            durable=False,
        )
        log.info("saved sharded checkpoint %s", path)
    barrier(ctx, group)  # no rank moves on (or exits) before the checkpoint is published
    return broadcast_object(path, ctx, group)


def restore_run_checkpoint(
    pieces: RunPieces, path: Path, *, ctx: DistContext, state_dicts: StateDictAPI, verified: bool = False
) -> dict:
    """Load model, optimizer, scheduler, scaler and this rank's RNG from a checkpoint; return the saved progress.

    Unless verified (the caller holds its verdict), rank 0 alone hashes the checkpoint, and its verdict reaches every
    rank. Files are read through memory maps: a rank that receives rank 0's state by broadcast reads only the small
    parts of train_state.pt it uses, never the weights or the optimizer state.
    """
    manifest, model_state = _checked_on_rank0(pieces, path, ctx=ctx, verified=verified)
    train_state = load_train_state(path / STATE_FILE)
    zero_adam_state(pieces.optimizer)  # before torch's state-dict API would make it by a zero-gradient step
    if manifest.get("format", "full") == "sharded":
        template = gather_sharded_state(pieces.model, pieces.optimizer)
        load_sharded(path, template)
        restore_sharded_state(pieces.model, pieces.optimizer, template)
    else:
        reads_state = ctx.is_main or not state_dicts.reads_on_rank0_only
        state_dicts.restore(
            pieces.model,
            pieces.optimizer,
            (model_state if ctx.is_main else open_model_state(path)) if reads_state else {},
            train_state["optimizer"] if reads_state else {},
            ctx,
        )
    pieces.scheduler.load_state_dict(train_state["scheduler"])
    if train_state["scaler"]:
        pieces.scaler.load_state_dict(train_state["scaler"])
    restore_rng(_rng_for_rank(train_state["rng_per_rank"], ctx, saved_world=manifest["world_size"]))
    progress = progress_counting_every_rank(train_state["progress"], saved_world_size=manifest["world_size"])
    log.info(
        "resumed from %s at step %d (saved by %d processes, now %d)",
        path,
        progress["step"],
        manifest["world_size"],
        ctx.world_size,
    )
    return progress


def progress_counting_every_rank(progress: dict, *, saved_world_size: int) -> dict:
    """A checkpoint's progress with tokens_seen counting every rank's tokens. One written before that count was
    global holds rank 0's count (and no tokens_global): scaled by the number of processes that saved it, exact on
    one process and an estimate on more (each rank trains on about as many tokens)."""
    if progress.get("tokens_global", False):
        return progress
    return {**progress, "tokens_seen": progress["tokens_seen"] * saved_world_size, "tokens_global": True}


def _checked_on_rank0(pieces: RunPieces, path: Path, *, ctx: DistContext, verified: bool) -> tuple[dict, dict]:
    """(the checkpoint's manifest, rank 0's open model state of a full checkpoint) once rank 0 has checked the
    checkpoint (digests unless verified, and that its weights fit the model); a problem is raised on every rank, so
    none waits for a broadcast that never comes. Rank 0 opens each file once here; the restore reuses it."""
    problem, manifest, model_state = None, None, {}
    # On every rank: under FSDP1 (the legacy API) state_dict() is a collective, which rank 0 alone would wait on.
    expected = unwrap(pieces.model).state_dict()
    if ctx.is_main:
        try:
            manifest = read_checkpoint_manifest(path, verified=verified)
            if manifest.get("format", "full") == "full":
                model_state = open_model_state(path)
                check_shapes_match(model_state, expected, source=path)
        except CheckpointError as error:
            problem = str(error)
    problem = broadcast_object(problem, ctx)
    if problem is not None:
        raise CheckpointError(problem)
    if manifest is None:
        manifest = read_checkpoint_manifest(path, verified=True)  # sizes only: rank 0 has checked the digests
    return manifest, model_state


def capture_rng() -> dict:
    """Every RNG the run uses, as values torch.load(weights_only=True) accepts."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _rng_for_rank(per_rank: list[dict], ctx: DistContext, *, saved_world: int) -> dict:
    if ctx.rank < len(per_rank):
        return per_rank[ctx.rank]
    # More ranks than when saved: a rank without its own state derives a distinct one from rank 0's.
    log.warning("checkpoint saved by %d processes has no RNG state for rank %d; deriving one", saved_world, ctx.rank)
    derived = dict(per_rank[0])
    generator = torch.Generator().manual_seed(int(per_rank[0]["torch"][:8].sum()) + ctx.rank)
    derived["torch"] = generator.get_state()
    return derived
