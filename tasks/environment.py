"""Task: probe the machine (torch, CUDA, MPS, CPU) once per flow run."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE


@task(name="probe_environment", cache_policy=NO_CACHE)
def probe_environment() -> dict:
    """What torch sees on this machine, as plain values (the device policy's input)."""
    from wmtp_core.runtime.devices import probe_environment as probe  # torch loads here, not when flows are imported

    found = probe().to_dict()
    get_run_logger().info("environment: %s", found)
    return found
