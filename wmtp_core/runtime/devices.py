"""The one place that decides device, precision and DataLoader workers, from an environment probe and the recipe.

The policy takes the probe as an argument, so backends this machine lacks (MPS, CUDA) can be tested with a
probe built by hand. This is the fix plan's device-aware policy (Phase 2); the legacy one it replaces lives in
wmtp_core.fixplan.legacy. The MPS profile ships inside the package (wmtp_core/runtime/profiles/).
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable
from importlib import resources

import torch
import yaml

from wmtp_core.config import DataConfig, DevicesConfig, Recipe
from wmtp_core.runtime.device_plan import DevicePlan, EnvironmentProbe, Precision

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MPS_PROFILE = "mps_optimized.yaml"  # in wmtp_core/runtime/profiles/, read with importlib.resources


def probe_environment() -> EnvironmentProbe:
    """Inspect torch's view of this machine (no side effects beyond CUDA initialisation when present)."""
    cuda = torch.cuda.is_available()
    return EnvironmentProbe(
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count() or 1,
        cuda_available=cuda,
        cuda_device_count=torch.cuda.device_count() if cuda else 0,
        cuda_device_name=torch.cuda.get_device_name(0) if cuda else None,
        cuda_bf16_supported=cuda and torch.cuda.is_bf16_supported(),
        mps_available=torch.backends.mps.is_available(),
    )


DevicePolicy = Callable[[DevicesConfig, DataConfig, "EnvironmentProbe"], DevicePlan]
ProfilePolicy = Callable[[Recipe, DevicePlan], tuple[Recipe, tuple[str, ...]]]


def plan_devices(devices: DevicesConfig, data: DataConfig, probe: EnvironmentProbe) -> DevicePlan:
    """Choose device, autocast dtype and workers; raises ValueError when the recipe asks for a missing backend."""
    device, reasons = choose_backend(devices.backend, probe)
    autocast, why = _supported_precision(device, devices.precision, probe)
    workers = data.num_workers
    if device == "mps":
        reasons += _mps_reasons(devices, workers)
        workers = 0
    scaler = device == "cuda" and autocast == "fp16"
    return DevicePlan(
        device=device, autocast_dtype=autocast, use_grad_scaler=scaler, num_workers=workers, reasons=reasons + (why,)
    )


def _mps_reasons(devices: DevicesConfig, workers: int) -> tuple[str, ...]:
    """What the MPS profile changes besides precision, each with its reason (apply_device_profile does it)."""
    reasons = [f"the {MPS_PROFILE} profile is applied to the recipe on MPS (the log names each key it changes)"]
    if workers:
        reasons.append(f"DataLoader workers 0 on MPS ({workers} configured; worker processes leak semaphores there)")
    if devices.strategy != "single" or devices.nproc_per_node != 1:
        reasons.append(
            f"devices.strategy={devices.strategy} (nproc_per_node {devices.nproc_per_node}) falls back to "
            "single on MPS: one MPS device per machine and torch.distributed has no MPS backend"
        )
    return tuple(reasons)


def apply_device_profile(recipe: Recipe, plan: DevicePlan) -> tuple[Recipe, tuple[str, ...]]:
    """The recipe adjusted to the plan: on MPS the mps_optimized profile is applied (fp32, no FSDP, no workers,
    gradient accumulation 4). Returns the recipe and one reason per changed key."""
    if plan.device != "mps":
        return recipe, ()
    profile = yaml.safe_load(resources.files("wmtp_core.runtime.profiles").joinpath(MPS_PROFILE).read_text())
    adjusted = recipe.model_copy(
        update={section: getattr(recipe, section).model_copy(update=values) for section, values in profile.items()}
    )
    reasons = tuple(
        f"MPS profile: {section}.{key} {getattr(getattr(recipe, section), key)!r} -> {value!r}"
        for section, values in profile.items()
        for key, value in values.items()
        if getattr(getattr(recipe, section), key) != value
    )
    return type(recipe).model_validate(adjusted.model_dump()), reasons


def choose_backend(backend: str, probe: EnvironmentProbe) -> tuple[str, tuple[str, ...]]:
    available = {"cuda": probe.cuda_available, "mps": probe.mps_available, "cpu": True}
    if backend == "auto":
        device = next(name for name in ("cuda", "mps", "cpu") if available[name])
        return device, (f"devices.backend=auto picked {device}",)
    if not available[backend]:
        raise ValueError(
            f"devices.backend={backend} but this machine has no {backend}; use devices.backend=auto or cpu"
        )
    return backend, (f"devices.backend={backend} as configured",)


def _supported_precision(device: str, precision: str, probe: EnvironmentProbe) -> tuple[Precision | None, str]:
    """Mixed precision only where the device supports it; None means plain fp32, no autocast."""
    if device == "mps":
        return None, "fp32 without autocast on MPS (autocast there is unsupported)"
    if device == "cuda":
        if precision in ("auto", "bf16") and probe.cuda_bf16_supported:
            return "bf16", "bf16 autocast on CUDA"
        if precision == "fp32":
            return None, "fp32 on CUDA as configured"
        return "fp16", "fp16 autocast with a grad scaler on CUDA (bf16 unsupported or fp16 asked for)"
    if precision == "bf16":
        return "bf16", "bf16 autocast on CPU as configured"
    return None, f"fp32 on CPU (devices.precision={precision})"


def autocast_context(plan: DevicePlan) -> contextlib.AbstractContextManager:
    """The forward-pass precision context of the plan."""
    if plan.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=plan.device, dtype=_DTYPES[plan.autocast_dtype])
