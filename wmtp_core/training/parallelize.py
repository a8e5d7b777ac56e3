"""The trained model made ready to train, as torchtitan's parallelize step does it: per-block activation
checkpointing and torch.compile first, then DDP or FSDP2 (with FSDP2's bf16 mixed-precision policy where the device
plan computes in bf16); and rho1's frozen reference sharded like the model, so it costs 1/world of its weights per
process instead of a full copy.
"""

from __future__ import annotations

import logging

import torch

from wmtp_core.algorithms.objective import sequential_heads
from wmtp_core.config import Recipe
from wmtp_core.runtime.blocks import transformer_blocks, wrap_block_forwards
from wmtp_core.runtime.devices import DevicePlan
from wmtp_core.runtime.distributed import DistContext, FsdpWrapper, shard_fully, wrap_model

log = logging.getLogger(__name__)


def parallelize(
    model: torch.nn.Module, recipe: Recipe, plan: DevicePlan, ctx: DistContext, *, fsdp: FsdpWrapper = shard_fully
) -> torch.nn.Module:
    """Checkpoint and compile the blocks as the recipe says, then wrap for the strategy; before the optimizer."""
    train = recipe.train
    checkpointed, sequential = train.activation_checkpointing == "blocks", sequential_heads(recipe, plan)
    blocks = transformer_blocks(model)
    # Sequential heads already recompute each head's blocks in backward: checkpointing them too would run them thrice.
    head_blocks = {id(block) for block in model.head_blocks()} if sequential else set()
    trunk = [block for block in blocks if id(block) not in head_blocks]
    heads = [block for block in blocks if id(block) in head_blocks]
    wrap_block_forwards(trunk, checkpointed=checkpointed, compiled=train.compile)
    wrap_block_forwards(heads, checkpointed=False, compiled=train.compile)
    param_dtype = sharded_param_dtype(recipe, plan)
    if ctx.is_main:
        log.info(
            "heads %s; activation checkpointing %s (%d blocks); compile %s; FSDP2 mixed precision %s",
            "one at a time" if sequential else "all at once",
            train.activation_checkpointing,
            len(trunk) if checkpointed else 0,
            "on" if train.compile else "off",
            param_dtype or "off",
        )
    return wrap_model(model, recipe.devices.strategy, ctx, plan.device, fsdp=fsdp, param_dtype=param_dtype)


def sharded_param_dtype(recipe: Recipe, plan: DevicePlan) -> torch.dtype | None:
    """bf16 weights gathered by FSDP2 when the plan computes in bf16 under devices.strategy=fsdp, else None."""
    return torch.bfloat16 if plan.autocast_dtype == "bf16" and recipe.devices.strategy == "fsdp" else None


def shard_reference(
    reference: torch.nn.Module | None,
    recipe: Recipe,
    plan: DevicePlan,
    ctx: DistContext,
    *,
    fsdp: FsdpWrapper = shard_fully,
) -> torch.nn.Module | None:
    """rho1's frozen reference sharded like the model under devices.strategy=fsdp (gathered block by block in its
    forward, resharded after it), as it is otherwise."""
    if reference is None or recipe.devices.strategy != "fsdp" or not ctx.active:
        return reference
    if ctx.is_main:
        log.info("rho1 reference sharded over %d processes like the model", ctx.world_size)
    return wrap_model(reference, "fsdp", ctx, plan.device, fsdp=fsdp, param_dtype=sharded_param_dtype(recipe, plan))
