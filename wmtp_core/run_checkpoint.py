"""A training run's checkpoints: what goes in one (model, optimizer, scheduler, scaler, every rank's RNG, data
position), in which format (full or sharded), written synchronously or in the background, and how a run resumes.

Under torchrun every rank calls save_run_checkpoint and restore_checkpoint (they hold collectives); rank 0 writes
the full format, every rank writes its shards of the sharded one.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from wmtp_core.checkpoint import (
    STATE_FILE,
    check_shapes_match,
    load_checkpoint,
    load_sharded,
    make_durable,
    publish_checkpoint,
    save_checkpoint,
    staging_dir,
    write_sharded,
)
from wmtp_core.config import Recipe
from wmtp_core.distributed import DistContext, background_group, barrier, broadcast_object, gather_objects, unwrap
from wmtp_core.hashed_files import torch_save_hashed
from wmtp_core.manifest import CheckpointError, prune_checkpoints
from wmtp_core.run_parts import RunParts, TrainState
from wmtp_core.state_dicts import gather_sharded_state, gather_state, restore_sharded_state, restore_state

log = logging.getLogger(__name__)


class CheckpointWriter:
    """Runs checkpoint saves in two parts: write (publish a checkpoint, return its path) and settle (make it durable,
    then prune older ones).

    Synchronous (the default): write runs in the caller's thread, settle in a background thread, so training goes
    on while the disk flushes. checkpoint.async_save: both run in the background. Either way at most one save is in
    flight: a new one first waits for the previous. `wait()` must run before the process exits; a background
    failure is raised there (or at the next save), never lost.
    """

    def __init__(self, *, background: bool):
        self.background = background
        self._stager: DefaultStager | None = None  # snapshot_shards' CPU buffers, refilled at every save
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.latest: Path | None = None

    def submit(self, write: Callable[[], Path], settle: Callable[[Path], None] | None = None) -> None:
        self.wait()
        if self.background:
            self._start(lambda: self._save(write, settle))
            return
        self.latest = path = write()
        if settle is not None:
            self._start(lambda: settle(path))

    def snapshot_shards(self, shards: dict, *, pin_memory: bool) -> dict:
        """This rank's shards copied to CPU memory (DTensors stay DTensors; pin_memory for shards on a GPU, so the
        copy is fast) for a background write while training changes the originals. The buffers are kept and refilled
        at the next save, so this first waits for the pending write, which may still be reading them."""
        self.wait()
        if self._stager is None:
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=pin_memory,
                                                        use_shared_memory=False, use_async_staging=False,
                                                        use_non_blocking_copy=False))
        return self._stager.stage(shards)

    def wait(self) -> Path | None:
        """Block until no save is pending; re-raise a background failure; return the newest checkpoint."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"background checkpoint write failed: {error}") from error
        return self.latest

    def _save(self, write: Callable[[], Path], settle: Callable[[Path], None] | None) -> None:
        self.latest = path = write()
        if settle is not None:
            settle(path)

    def _start(self, work: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(work,), name="wmtp-checkpoint-writer")
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as error:  # handed to the training thread by wait()
            self._error = error


def save_run_checkpoint(
    parts: RunParts, state: TrainState, run_dir: Path, *, recipe: Recipe, manifest_extra: dict, writer: CheckpointWriter
) -> None:
    """Snapshot the run's state at this step (collectives on every rank) and hand the write to `writer`."""
    ctx = parts.ctx
    train_state = {
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "rng_per_rank": gather_objects(capture_rng(), ctx),
        "progress": asdict(state),
    }
    manifest = {"recipe": recipe.model_dump(mode="json"), "torch_version": torch.__version__,
                "world_size": ctx.world_size, **manifest_extra}
    step = state.step
    settle = (lambda path: _settle(path, run_dir, recipe.train.keep_last)) if ctx.is_main else None
    if recipe.checkpoint.format == "sharded":
        _submit_sharded(parts, run_dir, step, train_state, manifest, writer=writer, settle=settle,
                        timeout_s=recipe.devices.timeout_s)
        return
    model_state, optim_state = gather_state(parts.model, parts.optimizer, recipe.phases, ctx)
    if writer.background:
        # The gathered tensors (already on CPU) may be the live ones, which training changes while the write runs.
        # A clone beats refilling kept buffers through the shards' stager here: 21 ms vs 34 ms for 215 MB, 2 cores.
        model_state, optim_state = _copy_tensors(model_state), _copy_tensors(optim_state)
    if ctx.is_main:
        train_state["optimizer"] = optim_state
        writer.submit(lambda: _save_full(run_dir, step, model_state, train_state, manifest, parts.export), settle)


def _save_full(run_dir: Path, step: int, model_state: dict, train_state: dict, manifest: dict,
               export: Callable | None = None) -> Path:
    path = save_checkpoint(run_dir, step=step, model_state=model_state, train_state=train_state, manifest_extra=manifest,
                           export=export, durable=False)
    log.info("saved checkpoint %s", path)
    return path


def _settle(path: Path, run_dir: Path, keep_last: int) -> None:
    """Make the new checkpoint durable, and only then prune older ones: a crash at any point leaves one to resume."""
    make_durable(path)
    prune_checkpoints(run_dir, keep_last=keep_last)


def _submit_sharded(parts: RunParts, run_dir: Path, step: int, train_state: dict, manifest: dict, *,
                    writer: CheckpointWriter, settle: Callable[[Path], None] | None, timeout_s: int) -> None:
    """Every rank writes its own shards, then rank 0 publishes. In the background (async_save) the shards are
    first copied to CPU (the live ones keep training), and the write's collectives run on a process group of their
    own, apart from training's."""
    ctx = parts.ctx
    staging = staging_dir(run_dir, step, owner="job") if ctx.is_main else None
    barrier(ctx)  # the staging directory exists (and is empty) before any rank writes into it
    staging = broadcast_object(staging, ctx)
    shards, group = gather_sharded_state(parts.model, parts.optimizer), None
    if writer.background:
        on_gpu = next(parts.model.parameters()).is_cuda
        shards = writer.snapshot_shards(shards, pin_memory=on_gpu)
        group = background_group(ctx, timeout_s=timeout_s)

    def write() -> Path:
        write_sharded(staging, shards, process_group=group)
        return _publish_sharded(staging, run_dir, step, train_state, manifest, ctx=ctx, group=group)

    writer.submit(write, settle)


def _publish_sharded(staging: Path, run_dir: Path, step: int, train_state: dict, manifest: dict, *,
                     ctx: DistContext, group: dist.ProcessGroup | None = None) -> Path:
    """Rank 0 adds train_state.pt and the manifest to the shards every rank has written, and publishes."""
    path = None
    if ctx.is_main:
        described = {STATE_FILE: torch_save_hashed(train_state, staging / STATE_FILE)}
        path = publish_checkpoint(staging, run_dir, step=step, manifest_extra={"format": "sharded", **manifest},
                                  described=described, durable=False)
        log.info("saved sharded checkpoint %s", path)
    barrier(ctx, group)  # no rank moves on (or exits) before the checkpoint is published
    return broadcast_object(path, ctx, group)


def restore_checkpoint(parts: RunParts, path: Path, recipe: Recipe) -> TrainState:
    """Load model, optimizer, scheduler, scaler, this rank's RNG and the data position from a checkpoint."""
    ctx = parts.ctx
    model_state, train_state, manifest = load_checkpoint(path)
    if model_state is None:
        template = gather_sharded_state(parts.model, parts.optimizer)
        load_sharded(path, template)
        restore_sharded_state(parts.model, parts.optimizer, template)
    else:
        check_shapes_match(model_state, unwrap(parts.model).state_dict(), source=path)
        full_on_this_rank = ctx.is_main or not recipe.phases.api  # phases.api broadcasts rank 0's copy
        restore_state(parts.model, parts.optimizer, model_state if full_on_this_rank else {},
                      train_state["optimizer"] if full_on_this_rank else {}, recipe.phases, ctx)
    parts.scheduler.load_state_dict(train_state["scheduler"])
    if train_state["scaler"]:
        parts.scaler.load_state_dict(train_state["scaler"])
    restore_rng(_rng_for_rank(train_state["rng_per_rank"], ctx, saved_world=manifest["world_size"]))
    state = TrainState(**train_state["progress"])
    log.info("resumed from %s at step %d (saved by %d processes, now %d)", path, state.step, manifest["world_size"],
             ctx.world_size)
    return state


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


def _copy_tensors(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {key: _copy_tensors(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_copy_tensors(value) for value in tree)
    return tree
