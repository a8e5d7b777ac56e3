"""The fix plan's three gates (recipe.phases), resolved once per run into the behaviours they switch.

- phases.checkpoint (Phase 1): on, state dicts that work for every model kind; off, FSDP full-state-dict calls on
  whatever model is given (KeyError(None) on a plain module).
- phases.mps (Phase 2): on, device-aware precision, DataLoader workers 0 and the mps_optimized profile on MPS; off,
  autocast with the configured dtype on any device, workers as configured.
- phases.api (Phase 3): on, torch.distributed.checkpoint state dicts, FSDP2 (built on the meta device), tracking
  that never stops training and explicit cleanup; off, FSDP.state_dict_type, FSDP1, tracking errors propagate, no
  explicit cleanup.

The rest of the library is handed these behaviours and never reads a gate. This module loads no torch until
resolve_gates is called, so Prefect tasks and flows can read the tracking policy cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from wmtp_core.config import PhaseGates, Recipe

if TYPE_CHECKING:
    from wmtp_core.checkpoint.state_dicts import StateDictAPI
    from wmtp_core.runtime.devices import DevicePlan, DevicePolicy, EnvironmentProbe, ProfilePolicy
    from wmtp_core.runtime.distributed import FsdpWrapper


@dataclass(frozen=True)
class TrackingPolicy:
    """What a tracking failure may do to a run."""

    never_stops_training: bool
    """True: metrics are buffered, sent in the background and kept on disk when MLflow is down, and a failed upload
    leaves the run pending (`wmtp upload` finishes it). False: each report is one request whose error stops
    training, and a failed upload fails the flow run."""


@dataclass(frozen=True)
class Behaviours:
    """What a run does where the fix plan changed something."""

    state_dicts: StateDictAPI
    """How full model/optimizer state is gathered to save and restored on resume."""
    plan_devices: DevicePolicy
    """Device, autocast dtype and DataLoader workers for a recipe on a machine."""
    apply_device_profile: ProfilePolicy
    """Recipe keys the chosen device changes (the MPS profile)."""
    wrap_fsdp: FsdpWrapper
    """How devices.strategy=fsdp shards the model."""
    fsdp_from_meta: bool
    """FSDP builds the model on the meta device, shards it, then fills it from rank 0's full weights (FSDP2); off,
    every rank builds the full model first (FSDP1)."""
    explicit_cleanup: bool
    """Release DataLoader workers and device caches on every exit, stop in order (with a checkpoint) on SIGTERM,
    and end a finished torchrun rank without the interpreter teardown that can abort it."""
    tracking: TrackingPolicy
    """What a tracking failure may do."""


def tracking_policy(phases: PhaseGates) -> TrackingPolicy:
    return TrackingPolicy(never_stops_training=phases.api)


def resolve_gates(recipe: Recipe) -> Behaviours:
    """The behaviours recipe.phases selects; raises ValueError, naming the keys, for a combination that cannot work."""
    from wmtp_core.checkpoint import state_dicts
    from wmtp_core.fixplan import legacy
    from wmtp_core.runtime import devices, distributed

    phases = recipe.phases
    if recipe.checkpoint.format == "sharded" and not phases.api:
        raise ValueError("checkpoint.format=sharded needs torch.distributed.checkpoint; set phases.api=true")
    if not phases.checkpoint:
        gather = legacy.gather_fsdp_state_on_any_model
    else:
        gather = state_dicts.gather_full_state if phases.api else legacy.gather_with_state_dict_type
    if phases.api:
        api = state_dicts.StateDictAPI(gather, state_dicts.restore_full_state, reads_on_rank0_only=True)
    else:
        api = state_dicts.StateDictAPI(gather, legacy.restore_with_state_dict_type, reads_on_rank0_only=False)
    return Behaviours(
        state_dicts=api,
        plan_devices=devices.plan_devices if phases.mps else legacy.plan_devices_as_configured,
        apply_device_profile=devices.apply_device_profile if phases.mps else legacy.recipe_as_configured,
        wrap_fsdp=distributed.shard_fully if phases.api else legacy.wrap_fsdp1,
        fsdp_from_meta=phases.api,
        explicit_cleanup=phases.api,
        tracking=tracking_policy(phases),
    )


def plan_run_devices(recipe: Recipe, probe: EnvironmentProbe) -> DevicePlan:
    """The device plan of a recipe on the probed machine, under its gates."""
    return resolve_gates(recipe).plan_devices(recipe.devices, recipe.data, probe)
