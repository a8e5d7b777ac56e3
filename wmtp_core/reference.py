"""The rho1-wmtp reference model: a checkpoint of this project, or the built-in model trained briefly.

The reference runs under no_grad in eval mode; only its next-token head (head 0) is used.
"""

from __future__ import annotations

import logging
from pathlib import Path


from wmtp_core.checkpoint import check_shapes_match, load_checkpoint
from wmtp_core.config import ModelConfig, Recipe
from wmtp_core.device import DevicePlan
from wmtp_core.manifest import latest_valid_checkpoint
from wmtp_core.model import MTPTransformer
from wmtp_core.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)


def prepare_reference(recipe: Recipe, run_dir: Path, *, plan: DevicePlan) -> Path:
    """The reference checkpoint directory: rho1.reference_checkpoint, else a built-in one trained under run_dir."""
    if recipe.rho1.reference_checkpoint is not None:
        log.info("rho1-wmtp: reference model from %s", recipe.rho1.reference_checkpoint)
        return Path(recipe.rho1.reference_checkpoint)
    reference_dir = run_dir / "reference"
    done = latest_valid_checkpoint(reference_dir)
    if done is not None and done.step >= recipe.rho1.reference_steps:
        log.info("rho1-wmtp: reusing the built-in reference trained earlier at %s", done.path)
        return done.path
    log.warning(
        "rho1-wmtp: no rho1.reference_checkpoint given, so the built-in model is trained for %d baseline steps "
        "as the reference (in %s); set rho1.reference_checkpoint to use a real one", recipe.rho1.reference_steps, reference_dir,
    )
    from wmtp_core.training import train  # the reference is trained by the same loop; imported here to avoid a cycle

    result = train(_reference_recipe(recipe), reference_dir, plan=plan, resume_from=done.path if done else None)
    return Path(result.latest_checkpoint)


def load_reference_model(path: Path, plan: DevicePlan) -> MTPTransformer:
    """A frozen MTPTransformer in eval mode on the plan's device, shaped by the checkpoint's own recipe."""
    model_state, _, manifest = load_checkpoint(path)
    model = MTPTransformer(ModelConfig(**manifest["recipe"]["model"]), vocab_size=ByteTokenizer().vocab_size)
    model_state = {name: t for name, t in model_state.items() if not name.startswith("value_head.")}
    check_shapes_match(model_state, model.state_dict(), source=path)
    model.load_state_dict(model_state)
    model.requires_grad_(False)
    return model.to(plan.device).eval()


def _reference_recipe(recipe: Recipe) -> Recipe:
    steps = recipe.rho1.reference_steps
    train = recipe.train.model_copy(update={
        "algorithm": "baseline-mtp", "max_steps": steps, "save_every": steps, "eval_every": steps,
        "warmup_steps": min(recipe.train.warmup_steps, steps), "lr_decay_steps": None,
    })
    return recipe.model_copy(update={"train": train})
