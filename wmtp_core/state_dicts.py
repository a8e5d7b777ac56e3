"""Gathering and restoring full model/optimizer state, behind the fix plan's gates.

The on-disk optimizer format is always keyed by parameter name (as torch.distributed.checkpoint writes
it), so a checkpoint loads whichever gate saved it.

- phases.checkpoint off: the legacy code, FSDP full-state-dict calls on whatever model is given. On a plain
  module torch raises KeyError(None), the failure the fix plan reports; it is re-raised as CheckpointSaveError.
- phases.api on: torch.distributed.checkpoint.state_dict (get_state_dict / set_state_dict).
- phases.api off: an isinstance(model, FSDP) branch with the deprecated FSDP.state_dict_type, else state_dict().
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from wmtp_core.config import PhaseGates
from wmtp_core.distributed import SINGLE, DistContext, unwrap
from wmtp_core.manifest import CheckpointError

StateDict = dict[str, object]


class CheckpointSaveError(CheckpointError):
    """Saving a checkpoint failed; the message says which path failed and what to change."""


def gather_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, phases: PhaseGates, ctx: DistContext = SINGLE
) -> tuple[StateDict, StateDict]:
    """Full (unsharded, CPU) model and optimizer state dicts, the optimizer keyed by parameter name.

    A collective under torchrun: every rank calls it; rank 0 gets the dicts, the other ranks may get {}.
    """
    if not phases.checkpoint:
        return _legacy_gather(model, optimizer, ctx)
    if phases.api:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=options)
    if isinstance(model, FSDP):
        return _legacy_gather(model, optimizer, ctx)
    plain = unwrap(model)
    model_state = {name: tensor.detach().cpu().clone() for name, tensor in plain.state_dict().items()}
    return model_state, _optimizer_state_by_name(plain, optimizer)


def restore_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: StateDict, optim_state: StateDict,
    phases: PhaseGates, ctx: DistContext = SINGLE,
) -> None:
    """Load full state dicts written by gather_state into a freshly built (and wrapped) model and optimizer.

    Under torchrun with phases.api on, only rank 0's dicts are read and broadcast; model first, then optimizer,
    each on every rank (set_state_dict with {} on the other ranks skips the model broadcast and hangs).
    """
    if phases.api:
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=ctx.active)
        set_model_state_dict(model, model_state, options=options)
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)
        return
    if isinstance(model, FSDP):
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False),
                                  FullOptimStateDictConfig(rank0_only=False)):
            model.load_state_dict(model_state)
            optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, optim_state))
        return
    plain = unwrap(model)
    plain.load_state_dict(model_state)
    optimizer.load_state_dict(_optimizer_state_by_index(plain, optimizer, optim_state))


def gather_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, StateDict]:
    """Each rank's own shards (DTensors under FSDP2) for torch.distributed.checkpoint; nothing is gathered."""
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def restore_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loaded: dict[str, StateDict]) -> None:
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])


def _legacy_gather(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> tuple[StateDict, StateDict]:
    # FSDP1 with offload_to_cpu segfaults on CPU (torch 2.13-2.15), so the legacy path offloads on CUDA only.
    config = FullStateDictConfig(offload_to_cpu=ctx.device == "cuda", rank0_only=True)
    try:
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
            model_state = model.state_dict()
        optim_state = FSDP.optim_state_dict(model, optimizer) if isinstance(model, FSDP) else optimizer.state_dict()
    except KeyError as error:
        raise CheckpointSaveError(
            f"legacy checkpoint path (phases.checkpoint=off) failed on a {type(model).__name__}: "
            f"FSDP.state_dict_type raised KeyError({error.args[0]!r}); set phases.checkpoint=true"
        ) from error
    return {k: v.detach().cpu() for k, v in model_state.items()}, optim_state


def _optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> StateDict:
    names = _names_by_param_id(model)
    index_to_name = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            index_to_name[len(index_to_name)] = names[id(param)]
    raw = optimizer.state_dict()
    state = {index_to_name[i]: value for i, value in raw["state"].items()}
    groups = [{**group, "params": [index_to_name[i] for i in group["params"]]} for group in raw["param_groups"]]
    return {"state": state, "param_groups": groups}


def _optimizer_state_by_index(model: torch.nn.Module, optimizer: torch.optim.Optimizer, by_name: StateDict) -> StateDict:
    names = _names_by_param_id(model)
    name_to_index = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            name_to_index[names[id(param)]] = len(name_to_index)
    state = {name_to_index[name]: value for name, value in by_name["state"].items()}
    groups = [{**group, "params": [name_to_index[n] for n in group["params"]]} for group in by_name["param_groups"]]
    return {"state": state, "param_groups": groups}


def _names_by_param_id(model: torch.nn.Module) -> dict[int, str]:
    return {id(param): name for name, param in model.named_parameters()}
