"""rho1-wmtp's brief reference: when the recipe names no reference model, the run's own model trained for
rho1.reference_steps baseline steps, as a run of its own in <run_dir>/reference/ (its recipe, checkpoints, resume;
the run plan plans it: wmtp_core.run.plan).

It is trained as a step before the main training (the wmtp-train flow's train_reference task), by the same loop and
launcher as any run, so it works on any number of processes; the main training then loads it as a file.
Imports no torch.
"""

from __future__ import annotations

from wmtp_core.config import Recipe


def needs_brief_reference(recipe: Recipe) -> bool:
    rho1 = recipe.rho1
    return (
        recipe.train.algorithm == "rho1-wmtp" and rho1.reference_checkpoint is None and rho1.reference_hf_model is None
    )


def brief_reference_recipe(recipe: Recipe) -> Recipe:
    """The reference run's recipe: the run's model and data, baseline-mtp for rho1.reference_steps steps, saved in
    the full format (every rank of the main run loads the whole reference), no tracking of its own."""
    steps = recipe.rho1.reference_steps
    train = recipe.train.model_copy(
        update={
            "algorithm": "baseline-mtp",
            "max_steps": steps,
            "save_every": steps,
            "eval_every": steps,
            "warmup_steps": min(recipe.train.warmup_steps, steps),
            "lr_decay_steps": None,
        }
    )
    checkpoint = recipe.checkpoint.model_copy(update={"format": "full", "async_save": False})
    name = f"{recipe.run.name}-reference"[:64] if recipe.run.name else None
    run = recipe.run.model_copy(update={"name": name})
    tracking = recipe.tracking.model_copy(update={"enabled": False})
    updates = {"train": train, "checkpoint": checkpoint, "run": run, "tracking": tracking}
    return type(recipe).model_validate(recipe.model_copy(update=updates).model_dump())
