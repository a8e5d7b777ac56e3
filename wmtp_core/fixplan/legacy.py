"""The legacy implementations the fix plan replaces, side by side, kept for rollback and comparison.

Each is what the research code did before its phase, reproduced on the torch in use; wmtp_core.fixplan.gates picks
them when a gate is off. Nothing else in the library imports this module.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from wmtp_core.checkpoint.state_dicts import CheckpointSaveError, StateDict
from wmtp_core.config import DataConfig, DevicesConfig, Recipe
from wmtp_core.runtime.devices import DevicePlan, EnvironmentProbe, choose_backend
from wmtp_core.runtime.distributed import DistContext, unwrap

# Phase 1 off: the FSDP full-state-dict calls on whatever model is given.


def gather_fsdp_state_on_any_model(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext
) -> tuple[StateDict, StateDict]:
    """On a plain module torch raises KeyError(None), the failure the fix plan reports, re-raised as
    CheckpointSaveError."""
    # FSDP1 with offload_to_cpu segfaults on CPU (torch 2.13-2.15), so this offloads on CUDA only.
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


# Phase 3 off: an isinstance(model, FSDP) branch with the deprecated FSDP.state_dict_type, else state_dict().


def gather_with_state_dict_type(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext
) -> tuple[StateDict, StateDict]:
    if isinstance(model, FSDP):
        return gather_fsdp_state_on_any_model(model, optimizer, ctx)
    plain = unwrap(model)
    model_state = {name: tensor.detach().cpu().clone() for name, tensor in plain.state_dict().items()}
    return model_state, _optimizer_state_by_name(plain, optimizer)


def restore_with_state_dict_type(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: StateDict,
    optim_state: StateDict,
    ctx: DistContext,
) -> None:
    """Every rank reads the whole checkpoint and loads it (no broadcast)."""
    if isinstance(model, FSDP):
        configs = FullStateDictConfig(rank0_only=False), FullOptimStateDictConfig(rank0_only=False)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, *configs):
            model.load_state_dict(model_state)
            optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, optim_state))
        return
    plain = unwrap(model)
    plain.load_state_dict(model_state)
    optimizer.load_state_dict(_optimizer_state_by_index(plain, optimizer, optim_state))


def wrap_fsdp1(
    model: torch.nn.Module,
    blocks: list[torch.nn.Module],
    ctx: DistContext,
    device: str,
    *,
    param_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """The deprecated FullyShardedDataParallel wrapper, one unit per block class; param_dtype is not used (the legacy
    path computes with autocast's per-op weight casts)."""
    policy = ModuleWrapPolicy({type(b) for b in blocks})
    # FSDP1 on CPU must be told so (device_id cpu), else it looks for an accelerator and refuses.
    device_id = torch.device(device, ctx.local_rank) if device == "cuda" else torch.device("cpu")
    return FSDP(model, auto_wrap_policy=policy, device_id=device_id, use_orig_params=True)


# Phase 2 off: autocast with the configured dtype on any device, DataLoader workers as configured, no MPS profile.


def plan_devices_as_configured(devices: DevicesConfig, data: DataConfig, probe: EnvironmentProbe) -> DevicePlan:
    device, reasons = choose_backend(devices.backend, probe)
    autocast = "fp32" if devices.precision == "auto" else devices.precision
    why = f"phases.mps off: legacy autocast with {autocast} on {device}"
    scaler = device == "cuda" and autocast == "fp16"
    return DevicePlan(
        device=device,
        autocast_dtype=autocast,
        use_grad_scaler=scaler,
        num_workers=data.num_workers,
        reasons=reasons + (why,),
    )


def recipe_as_configured(recipe: Recipe, plan: DevicePlan) -> tuple[Recipe, tuple[str, ...]]:
    return recipe, ()


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


def _optimizer_state_by_index(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, by_name: StateDict
) -> StateDict:
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
