"""The initial model a run starts training from, as train() builds it (seeded, gates resolved, wrapped), written
by rank 0 as full tensors: weights (a full state dict, gathered), every rank's buffers and every rank's random
generator state after building.

    python tests/support/initial_weights.py RECIPE OUT [RECIPE OUT ...]                  # one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/support/initial_weights.py RECIPE OUT [...]

Several (RECIPE, OUT) pairs are built one after the other in the same processes (one start-up for all; each build
seeds its own generators first, as train() does). The process group is joined once, with the first recipe's
devices.timeout_s.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from wmtp_core.data.records import builtin_dataset_path
from wmtp_core.fixplan.gates import behaviours
from wmtp_core.recipes import load_recipe
from wmtp_core.run.plan import plan_devices
from wmtp_core.runtime.devices import probe_environment
from wmtp_core.runtime.distributed import gather_objects, init_distributed, shutdown_distributed
from wmtp_core.training.parts import build_run_parts


def initial_model(recipe, ctx) -> dict:
    """{"weights": full state dict, "buffers": every named buffer, "rng": the torch generator state} after building
    the run's parts the way train() does (on this rank)."""
    recipe, resolved, plan = plan_devices(recipe, probe_environment())
    gates = behaviours(resolved)
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    data = recipe.data.path or builtin_dataset_path()
    parts = build_run_parts(
        recipe, plan, data_file=data, ctx=ctx, wrap_fsdp=gates.wrap_fsdp, from_meta=gates.fsdp_from_meta
    )
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "weights": get_model_state_dict(parts.model, options=options),
        "buffers": {name: b.detach().cpu().clone() for name, b in parts.model.named_buffers()},
        "rng": torch.get_rng_state(),
    }


def main(*recipes_and_outs: str) -> None:
    assert recipes_and_outs and len(recipes_and_outs) % 2 == 0, "usage: initial_weights.py RECIPE OUT [RECIPE OUT ...]"
    pairs = [(load_recipe(Path(r)), out) for r, out in zip(recipes_and_outs[::2], recipes_and_outs[1::2], strict=True)]
    ctx = init_distributed("cpu", timeout_s=pairs[0][0].devices.timeout_s)
    for recipe, out in pairs:
        built = initial_model(recipe, ctx)
        per_rank = gather_objects({"buffers": built["buffers"], "rng": built["rng"]}, ctx)
        if ctx.is_main:
            torch.save({"weights": built["weights"], "per_rank": per_rank}, out)
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
