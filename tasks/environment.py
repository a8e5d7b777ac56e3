"""Task: probe the machine the run trains on (torch, CUDA, MPS, CPU) once per flow run."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from wmtp_core.config import Recipe


@task(name="probe_environment", cache_policy=NO_CACHE)
def probe_environment(recipe: Recipe) -> dict:
    """What torch sees where recipe's run trains, as plain values (the device policy's input): this machine, or for
    devices.launcher=ray a machine of the Ray cluster's workers, once the cluster is found able to hold them."""
    from wmtp_core.run.plan import probe_where_it_trains  # torch loads here, not when flows are imported

    found = probe_where_it_trains(recipe).to_dict()
    where = "a Ray worker's machine" if recipe.devices.launcher == "ray" else "this machine"
    get_run_logger().info("environment (%s): %s", where, found)
    return found
