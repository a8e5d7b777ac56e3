"""The tiny run every test shares: the one tiny model (wmtp_core.recipes.TINY_MODEL) with short step counts."""

from __future__ import annotations

from wmtp_core.recipes import TINY_MODEL

TINY_RUN = [
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.save_every=2",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_batches=2",
    "seed=7",
]
"""4 steps, saves and evals every 2."""
TINY_OVERRIDES = [*TINY_MODEL, *TINY_RUN]
"""The tiny model on the built-in data for 4 steps: `load_recipe(None, TINY_OVERRIDES)`."""


def with_sections(recipe, **sections):
    """recipe with some fields of its sections replaced: with_sections(r, train={"max_steps": 6})."""
    updates = {name: getattr(recipe, name).model_copy(update=values) for name, values in sections.items()}
    return recipe.model_copy(update=updates)
