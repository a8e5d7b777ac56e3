"""The trained model made ready to train, as torchtitan's parallelize step does it: per-block activation
checkpointing and torch.compile first, then DDP or FSDP2 (with FSDP2's bf16 mixed-precision policy where the device
plan computes in bf16); and rho1's frozen reference sharded like the model, so it costs 1/world of its weights per
process instead of a full copy.
"""

from __future__ import annotations

import logging

import torch

from wmtp_core.config import TrainConfig
from wmtp_core.runtime.blocks import wrap_block_forwards
from wmtp_core.runtime.devices import DevicePlan
from wmtp_core.runtime.distributed import DistContext, FsdpWrapper, shard_fully, wrap_model

log = logging.getLogger(__name__)


def parallelize(
    model: torch.nn.Module,
    train: TrainConfig,
    plan: DevicePlan,
    ctx: DistContext,
    *,
    strategy: str,
    sequential: bool,
    fsdp: FsdpWrapper = shard_fully,
) -> torch.nn.Module:
    """Checkpoint and compile the blocks as train says, then wrap for the strategy; before the optimizer.

    model: MTPTransformer or HFMTPModel (not wrapped yet). strategy: devices.strategy. sequential: whether the heads
    run one at a time (wmtp_core.algorithms.objective.sequential_heads)."""
    checkpointed = train.activation_checkpointing == "blocks"
    blocks = model.transformer_blocks()
    # Sequential heads already recompute each head's blocks in backward: checkpointing them too would run them thrice.
    head_blocks = {id(block) for block in model.head_blocks()} if sequential else set()
    trunk = [block for block in blocks if id(block) not in head_blocks]
    heads = [block for block in blocks if id(block) in head_blocks]
    wrap_block_forwards(trunk, checkpointed=checkpointed, compiled=train.compile)
    wrap_block_forwards(heads, checkpointed=False, compiled=train.compile)
    param_dtype = sharded_param_dtype(strategy, plan)
    if ctx.is_main:
        log.info(
            "heads %s; activation checkpointing %s (%d blocks); compile %s; FSDP2 mixed precision %s",
            "one at a time" if sequential else "all at once",
            train.activation_checkpointing,
            len(trunk) if checkpointed else 0,
            "on" if train.compile else "off",
            param_dtype or "off",
        )
    return wrap_model(model, strategy, ctx, plan.device, fsdp=fsdp, param_dtype=param_dtype)


def sharded_param_dtype(strategy: str, plan: DevicePlan) -> torch.dtype | None:
    """bf16 weights gathered by FSDP2 when the plan computes in bf16 under devices.strategy=fsdp, else None."""
    return torch.bfloat16 if plan.autocast_dtype == "bf16" and strategy == "fsdp" else None


def shard_reference(
    reference: torch.nn.Module | None,
    plan: DevicePlan,
    ctx: DistContext,
    *,
    strategy: str,
    fsdp: FsdpWrapper = shard_fully,
) -> torch.nn.Module | None:
    """rho1's frozen reference sharded like the model under devices.strategy=fsdp (strategy; gathered block by block
    in its forward, resharded after it), as it is otherwise."""
    if reference is None or strategy != "fsdp" or not ctx.active:
        return reference
    if ctx.is_main:
        log.info("rho1 reference sharded over %d processes like the model", ctx.world_size)
    return wrap_model(reference, "fsdp", ctx, plan.device, fsdp=fsdp, param_dtype=sharded_param_dtype(strategy, plan))
