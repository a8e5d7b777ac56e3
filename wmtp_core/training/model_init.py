"""The model a run trains, built and made ready for its processes (training.parallelize: checkpointed and compiled
blocks, then DDP or FSDP2 with its mixed precision).

One process, DDP and the legacy FSDP1: every process builds the full model, as before. FSDP2 under torchrun
(torchtitan's pattern): every rank builds the model on the meta device and shards it, so no rank holds more than
its shard; rank 0 alone builds the full initial weights (the same seeded draws as one process makes) and they reach
the other ranks' shards by broadcast (set_model_state_dict with full_state_dict and broadcast_from_rank0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from wmtp_core.algorithms.objective import sequential_heads
from wmtp_core.config import LossConfig, ModelConfig, TrainConfig
from wmtp_core.data.tokens import Tokenizer
from wmtp_core.models.build import build_model, build_model_skeleton
from wmtp_core.runtime.devices import DevicePlan
from wmtp_core.runtime.distributed import DistContext, FsdpWrapper, broadcast_object
from wmtp_core.training.optim import decayed_parameter_names
from wmtp_core.training.parallelize import parallelize


def build_wrapped_model(
    model_cfg: ModelConfig,
    tokenizer: Tokenizer,
    *,
    train: TrainConfig,
    loss: LossConfig,
    strategy: str,
    plan: DevicePlan,
    ctx: DistContext,
    wrap_fsdp: FsdpWrapper,
    from_meta: bool,
    with_value_head: bool,
) -> tuple[torch.nn.Module, torch.nn.Module, set[str]]:
    """(the model as trained, wrapped for DDP/FSDP or not; the model itself; its weight-decayed parameter names).

    train: its block features (activation checkpointing, compile); loss: whether the heads run one at a time;
    strategy: devices.strategy. from_meta: FSDP2 (wrap_fsdp shards modules on the meta device) builds through the
    meta device when strategy is fsdp under torchrun; otherwise every process builds the full model.
    """
    sequential = sequential_heads(loss, plan, horizon=model_cfg.horizon)
    if not (from_meta and ctx.active and strategy == "fsdp"):
        model = build_model(model_cfg, tokenizer, with_value_head=with_value_head).to(plan.device)
        decayed = decayed_parameter_names(model)  # before wrapping: FSDP1 flattens the shapes it is decided by
        wrapped = parallelize(model, train, plan, ctx, strategy=strategy, sequential=sequential, fsdp=wrap_fsdp)
        return wrapped, model, decayed
    full = build_model(model_cfg, tokenizer, with_value_head=with_value_head) if ctx.is_main else None
    model = build_model_skeleton(model_cfg, tokenizer, with_value_head=with_value_head)
    decayed = decayed_parameter_names(model)
    wrapped = parallelize(model, train, plan, ctx, strategy=strategy, sequential=sequential, fsdp=wrap_fsdp)
    wrapped.to_empty(device=plan.device)
    fill_from_rank0(wrapped, full, ctx)
    return wrapped, model, decayed


def fill_from_rank0(model: torch.nn.Module, full: torch.nn.Module | None, ctx: DistContext) -> None:
    """Every rank's (sharded, allocated) model gets rank 0's full model's weights and buffers, and every rank's
    random generator the state rank 0's has after building it: as if every rank had built the full model."""
    full_state = full.state_dict() if ctx.is_main else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)
    # Buffers a state dict leaves out (non-persistent: rotary frequencies) are garbage after to_empty.
    full_buffers = dict(full.named_buffers()) if ctx.is_main else {}
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if ctx.is_main:
                buffer.copy_(full_buffers[name])
            dist.broadcast(buffer, src=0)
    torch.set_rng_state(broadcast_object(torch.get_rng_state(), ctx))
