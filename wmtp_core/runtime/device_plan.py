"""What the machine offers and where a run trains, as plain values: the run plan carries both to every process.

Imports no torch (the run plan is read by Prefect tasks and the CLI); the policy that fills a DevicePlan is
wmtp_core.runtime.devices.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Precision = Literal["fp32", "bf16", "fp16"]


class _Values(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class EnvironmentProbe(_Values):
    """What torch sees on the machine that planned the run."""

    torch_version: str
    python_version: str
    platform: str
    cpu_count: int
    cuda_available: bool
    cuda_device_count: int
    cuda_device_name: str | None
    cuda_bf16_supported: bool
    mps_available: bool

    def to_dict(self) -> dict:
        return self.model_dump()


class DevicePlan(_Values):
    """Where and how to train; `reasons` says why each choice was made, for the run log."""

    device: Literal["cpu", "cuda", "mps"]
    """The device type every process trains on (each rank finds its own index of it)."""
    autocast_dtype: Precision | None
    """The forward pass's autocast dtype; None is plain fp32 without autocast."""
    use_grad_scaler: bool
    """fp16 on CUDA: scale the loss so small gradients survive."""
    num_workers: int
    """DataLoader worker processes per training process."""
    reasons: tuple[str, ...]
    """One sentence per choice."""
