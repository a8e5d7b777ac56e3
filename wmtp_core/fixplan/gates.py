"""The fix plan's three gates (recipe.phases), resolved once per run into the behaviours they switch.

- phases.checkpoint (Phase 1): on, state dicts that work for every model kind; off, FSDP full-state-dict calls on
  whatever model is given (KeyError(None) on a plain module).
- phases.mps (Phase 2): on, device-aware precision, DataLoader workers 0 and the mps_optimized profile on MPS; off,
  autocast with the configured dtype on any device, workers as configured.
- phases.api (Phase 3): on, torch.distributed.checkpoint state dicts, FSDP2 (built on the meta device), tracking
  that never stops training and explicit cleanup; off, FSDP.state_dict_type, FSDP1, tracking errors propagate, no
  explicit cleanup.

resolve_gates decides once per run, into ResolvedGates: plain values the run plan carries to every process (and
that Prefect tasks read without torch). behaviours() binds those values to the implementations a training process
calls; it decides nothing. The rest of the library is handed these and never reads a gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from wmtp_core.config import CheckpointConfig, PhaseGates

if TYPE_CHECKING:
    from wmtp_core.checkpoint.state_dicts import StateDictAPI
    from wmtp_core.runtime.devices import DevicePolicy, ProfilePolicy
    from wmtp_core.runtime.distributed import FsdpWrapper


class ResolvedGates(BaseModel):
    """What recipe.phases selects, as plain values: decided once per run, carried by the run plan."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    state_dicts: Literal["distributed-checkpoint", "fsdp-state-dict-type", "fsdp-calls-on-any-model"]
    """How full state is gathered and restored: torch.distributed.checkpoint (P1+P3), FSDP.state_dict_type on
    models of every kind (P1 only), or FSDP calls on whatever model is given (legacy: fails on a plain module)."""
    device_policy: Literal["device-aware", "as-configured"]
    """Device, precision and workers: chosen for the device with the MPS profile (P2), or as configured."""
    fsdp: Literal["fsdp2-from-meta", "fsdp1"]
    """devices.strategy=fsdp: FSDP2 built on the meta device and filled from rank 0 (P3), or FSDP1 on full models."""
    explicit_cleanup: bool
    """Release DataLoader workers and device caches on every exit, stop in order (with a checkpoint) on SIGTERM,
    and end a finished torchrun rank without the interpreter teardown that can abort it (P3)."""
    tracking_never_stops_training: bool
    """Metrics are buffered, sent in the background and kept on disk when MLflow is down, and a failed upload
    leaves the run pending (P3); off, each report is one request whose error stops training."""


def resolve_gates(phases: PhaseGates, checkpoint: CheckpointConfig) -> ResolvedGates:
    """The behaviours the gates select; ValueError, naming the keys, for a combination that cannot work."""
    if checkpoint.format == "sharded" and not phases.api:
        raise ValueError("checkpoint.format=sharded needs torch.distributed.checkpoint; set phases.api=true")
    if not phases.checkpoint:
        state_dicts = "fsdp-calls-on-any-model"
    else:
        state_dicts = "distributed-checkpoint" if phases.api else "fsdp-state-dict-type"
    return ResolvedGates(
        state_dicts=state_dicts,
        device_policy="device-aware" if phases.mps else "as-configured",
        fsdp="fsdp2-from-meta" if phases.api else "fsdp1",
        explicit_cleanup=phases.api,
        tracking_never_stops_training=phases.api,
    )


@dataclass(frozen=True)
class Behaviours:
    """The implementations a training process calls where the fix plan changed something."""

    state_dicts: StateDictAPI
    """How full model/optimizer state is gathered to save and restored on resume."""
    wrap_fsdp: FsdpWrapper
    """How devices.strategy=fsdp shards the model."""
    fsdp_from_meta: bool
    """FSDP builds the model on the meta device, shards it, then fills it from rank 0's full weights (FSDP2); off,
    every rank builds the full model first (FSDP1)."""
    explicit_cleanup: bool
    """See ResolvedGates.explicit_cleanup."""


def behaviours(gates: ResolvedGates) -> Behaviours:
    """The implementations of resolved gates (torch loads here)."""
    from wmtp_core.checkpoint import state_dicts
    from wmtp_core.fixplan import legacy
    from wmtp_core.runtime import distributed

    if gates.state_dicts == "distributed-checkpoint":
        api = state_dicts.StateDictAPI(
            state_dicts.gather_full_state, state_dicts.restore_full_state, reads_on_rank0_only=True
        )
    else:
        gather = (
            legacy.gather_with_state_dict_type
            if gates.state_dicts == "fsdp-state-dict-type"
            else legacy.gather_fsdp_state_on_any_model
        )
        api = state_dicts.StateDictAPI(gather, legacy.restore_with_state_dict_type, reads_on_rank0_only=False)
    fsdp2 = gates.fsdp == "fsdp2-from-meta"
    return Behaviours(
        state_dicts=api,
        wrap_fsdp=distributed.shard_fully if fsdp2 else legacy.wrap_fsdp1,
        fsdp_from_meta=fsdp2,
        explicit_cleanup=gates.explicit_cleanup,
    )


def device_policies(gates: ResolvedGates) -> tuple[DevicePolicy, ProfilePolicy]:
    """The device policy and the profile policy of resolved gates (the planner's; torch loads here)."""
    from wmtp_core.fixplan import legacy
    from wmtp_core.runtime import devices

    if gates.device_policy == "device-aware":
        return devices.plan_devices, devices.apply_device_profile
    return legacy.plan_devices_as_configured, legacy.recipe_as_configured
