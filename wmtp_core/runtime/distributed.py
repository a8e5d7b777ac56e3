"""Processes under torchrun: the process group, model wrapping (DDP, FSDP2) and the few collectives the training
loop needs. One process without torchrun is a world of size 1 and every function here is a no-op.

Every collective is bounded by devices.timeout_s (the process-group timeout), so a dead rank fails the run
instead of hanging it; torchrun then stops the other ranks.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from wmtp_core.runtime.blocks import BlockModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; rank 0 writes checkpoints and reports metrics."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    """Where collective buffers live: cuda for nccl, cpu for gloo."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str, *, timeout_s: int) -> DistContext:
    """Join the torchrun job (gloo on CPU, nccl on CUDA); a single process gets SINGLE and no process group."""
    if not launched_by_torchrun():
        return SINGLE
    rank, world_size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    ctx = DistContext(rank, world_size, local_rank, device="cuda" if device == "cuda" else "cpu")
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    log.info("rank %d of %d joined the %s process group", ctx.rank, ctx.world_size, backend)
    return ctx


def shutdown_distributed() -> None:
    global _background_group
    if dist.is_initialized():
        dist.destroy_process_group()  # every group, the background one included
    _background_group = None


_background_group: dist.ProcessGroup | None = None


def background_group(ctx: DistContext, *, timeout_s: int) -> dist.ProcessGroup | None:
    """A gloo process group for the collectives a background thread runs (an async sharded save's) while training
    runs its own on the default group: two threads taking turns on one group may order their collectives differently
    on each rank and deadlock. Made on first use, which is itself a collective: every rank asks at the same point.
    None on a single process."""
    global _background_group
    if ctx.active and _background_group is None:
        _background_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return _background_group


FsdpWrapper = Callable[..., torch.nn.Module]
"""(model, blocks sharded one by one, ctx, device, *, param_dtype) -> the sharded model; param_dtype (or None) is the
dtype the weights are gathered in to compute (the mixed-precision policy). The model is a BlockModel."""


def check_strategy(strategy: str, ctx: DistContext) -> None:
    """Refuse combinations that cannot work, naming the recipe keys to change."""
    if ctx.active and strategy == "single":
        raise ValueError(f"{ctx.world_size} processes but devices.strategy=single; set devices.strategy=ddp or fsdp")


def shard_fully(
    model: BlockModel,
    blocks: list[torch.nn.Module],
    ctx: DistContext,
    device: str,
    *,
    param_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """FSDP2: each block is its own unit, the root holds the rest (embeddings, norm, unembedding).

    With param_dtype (bf16), FSDP2's MixedPrecisionPolicy gathers the weights in it and frees them after use, so
    autocast finds nothing to cast and keeps no per-op weight copies; gradients reduce in fp32 into the fp32 master
    weights. The model's full-precision modules (the value head) stay fp32, each its own unit: TD weights are
    differences of values that bf16 blurs.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    if param_dtype is not None:
        for module in model.full_precision_modules():
            fully_shard(module)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def wrap_model(
    model: torch.nn.Module,
    strategy: str,
    ctx: DistContext,
    device: str,
    *,
    fsdp: FsdpWrapper = shard_fully,
    param_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """DDP, or FSDP through `fsdp` (FSDP2's fully_shard unless the run says otherwise) of the model's transformer
    blocks (a BlockModel) computing with weights in param_dtype; call before building the optimizer."""
    if not ctx.active or strategy == "single":
        return model
    if strategy == "ddp":
        return DDP(model, device_ids=[ctx.local_rank] if device == "cuda" else None)
    return fsdp(model, model.transformer_blocks(), ctx, device, param_dtype=param_dtype)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose state-dict keys have no wrapper prefix (DDP's `module.`)."""
    return model.module if isinstance(model, DDP) else model


def all_reduce_mean(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean over ranks (so metrics and skip decisions are the same everywhere); identity on one process."""
    if ctx.active:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= ctx.world_size
    return values


def reshard_after_forward_only(model: torch.nn.Module) -> None:
    """FSDP2 keeps the root module's parameters unsharded after its forward, for the backward that usually
    follows. After a forward without one (an eval) that would hold their full size until the next backward, and
    module.parameters() would not be the sharded parameters an optimizer built now must hold: reshard them."""
    if isinstance(model, FSDPModule):
        model.reshard()


@contextlib.contextmanager
def gradients_averaged_by_hand(
    model: torch.nn.Module, params: list[torch.nn.Parameter], ctx: DistContext
) -> Iterator[None]:
    """Around a backward that reaches only `params` (critic Stage 1: the value head). DDP would wait for every
    parameter's gradient, so its own reduction is off inside and params' gradients are averaged over ranks on
    exit. FSDP reduces whatever gradients exist by itself, and one process needs nothing."""
    if not isinstance(model, DDP):
        yield
        return
    with model.no_sync():
        yield
    for param in params:
        param.grad = all_reduce_mean(param.grad, ctx)


def max_over_ranks(value: int, ctx: DistContext) -> int:
    """The largest value any rank holds, on every rank (e.g. one rank got SIGTERM: all stop at the same step)."""
    if not ctx.active:
        return value
    tensor = torch.tensor([value], device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def sum_over_ranks(count: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """An integer count (a 0-d tensor) summed over every rank, exactly (int64), on every rank: a tensor on the
    count's device, so the caller reads it with its next host sync instead of adding one (on CUDA the all-reduce
    is only queued here)."""
    if not ctx.active:
        return count
    total = count.reshape(1).to(dtype=torch.int64, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def barrier(ctx: DistContext, group: dist.ProcessGroup | None = None) -> None:
    if ctx.active:
        dist.barrier(group=group)


def gather_objects(value: object, ctx: DistContext) -> list[object]:
    """Every rank's value, in rank order, on every rank ([value] on one process)."""
    if not ctx.active:
        return [value]
    gathered: list[object] = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: object, ctx: DistContext, group: dist.ProcessGroup | None = None) -> object:
    """Rank 0's value on every rank."""
    if not ctx.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
