"""Gathering and restoring full or sharded model/optimizer state with torch.distributed.checkpoint.state_dict.

The on-disk optimizer format is always keyed by parameter name (as torch.distributed.checkpoint writes it), so a
checkpoint loads whichever StateDictAPI saved it. The legacy APIs the fix plan replaces live in
wmtp_core.fixplan.legacy; wmtp_core.fixplan.gates picks one per run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from wmtp_core.checkpoint.manifest import CheckpointError
from wmtp_core.runtime.distributed import DistContext

StateDict = dict[str, object]
Gather = Callable[[torch.nn.Module, torch.optim.Optimizer, DistContext], tuple[StateDict, StateDict]]
Restore = Callable[[torch.nn.Module, torch.optim.Optimizer, StateDict, StateDict, DistContext], None]


class CheckpointSaveError(CheckpointError):
    """Saving a checkpoint failed; the message says which path failed and what to change."""


@dataclass(frozen=True)
class StateDictAPI:
    """How a run gathers full (unsharded, CPU) state to save and restores it on resume."""

    gather: Gather
    """(model, optimizer, ctx) -> (model_state, optimizer_state keyed by parameter name); a collective: every rank
    calls it, rank 0 gets the dicts, the other ranks may get {}."""
    restore: Restore
    """(model, optimizer, model_state, optimizer_state, ctx): load gathered dicts into a freshly built model."""
    reads_on_rank0_only: bool
    """restore broadcasts rank 0's dicts, so the other ranks pass {} and need not read the checkpoint's state."""


def gather_full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext
) -> tuple[StateDict, StateDict]:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)


def restore_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: StateDict,
    optim_state: StateDict,
    ctx: DistContext,
) -> None:
    """Under torchrun only rank 0's dicts are read and broadcast: model first, then optimizer, each on every rank
    (set_state_dict with {} on the other ranks skips the model broadcast and hangs)."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=ctx.active)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)


DISTRIBUTED_CHECKPOINT = StateDictAPI(gather_full_state, restore_full_state, reads_on_rank0_only=True)
"""torch.distributed.checkpoint.state_dict (get_state_dict / set_state_dict): any model kind, one code path."""


def gather_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, StateDict]:
    """Each rank's own shards (DTensors under FSDP2) for torch.distributed.checkpoint; nothing is gathered."""
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def zero_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh Adam or AdamW its per-parameter state (zeros), as its first step would, without that step.

    torch's state-dict API gives an optimizer without state one by taking a step with a zero gradient for every
    parameter: on every rank a gradient-sized shard (a third of the rank's training state) allocated just before a
    restore overwrites the state anyway. Other optimizers are left to torch."""
    if optimizer.state or not isinstance(optimizer, torch.optim.Adam):
        return
    for group in optimizer.param_groups:
        step_dtype = (
            torch.float64 if torch.get_default_dtype() == torch.float64 and not group["fused"] else torch.float32
        )
        on_device = group["capturable"] or group["fused"]
        moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")
        for param in (p for p in group["params"] if p.requires_grad):
            state = optimizer.state[param]
            state["step"] = torch.zeros((), dtype=step_dtype, device=param.device if on_device else "cpu")
            for name in moments:
                state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)


def restore_sharded_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loaded: dict[str, StateDict]
) -> None:
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
