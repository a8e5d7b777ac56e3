"""wmtp_core.algorithms.objective.algorithm_loss given the recipe sections it reads, as the training loop gives them."""

from __future__ import annotations

import torch

from wmtp_core.algorithms.objective import Metrics, MicroBatch, algorithm_loss
from wmtp_core.config import Recipe
from wmtp_core.runtime.devices import DevicePlan


def recipe_loss(
    model: torch.nn.Module,
    mb: MicroBatch,
    recipe: Recipe,
    *,
    plan: DevicePlan,
    reference: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """algorithm_loss with train.algorithm, loss, rho1, critic and model.horizon taken from recipe."""
    return algorithm_loss(
        model,
        mb,
        algorithm=recipe.train.algorithm,
        loss=recipe.loss,
        rho1=recipe.rho1,
        critic=recipe.critic,
        horizon=recipe.model.horizon,
        plan=plan,
        reference=reference,
    )
