"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule counted in optimizer steps."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from wmtp_core.config import TrainConfig


def build_optimizer(
    model: torch.nn.Module,
    cfg: TrainConfig,
    *,
    value_lr: float | None = None,
    decayed: set[str] | None = None,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over the model's parameters; weight matrices decay, embeddings, norms and biases do not. fused (one
    kernel for every parameter) defaults to on when every parameter is on CUDA, torch's default elsewhere.

    Parameters under `value_head.` form their own group at value_lr (critic-wmtp's value head). For a wrapped
    model pass `decayed` = decayed_parameter_names(the model before wrapping): FSDP1 flattens parameters to 1-D,
    so shapes seen after wrapping no longer tell matrices from biases.
    """
    decayed = decayed_parameter_names(model) if decayed is None else decayed
    named = [(clean_parameter_name(name), p) for name, p in model.named_parameters() if p.requires_grad]
    policy = [(name, p) for name, p in named if not name.startswith("value_head.")]
    groups = [
        {"params": [p for name, p in policy if name in decayed], "weight_decay": cfg.weight_decay},
        {"params": [p for name, p in policy if name not in decayed], "weight_decay": 0.0},
    ]
    value = [p for name, p in named if name.startswith("value_head.")]
    if value:
        groups.append({"params": value, "weight_decay": 0.0, "lr": value_lr or cfg.lr})
    if fused is None:
        fused = True if named and all(p.device.type == "cuda" for _, p in named) else None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def decayed_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: matrices other than embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return {
        clean_parameter_name(name) for name, p in model.named_parameters() if p.dim() >= 2 and id(p) not in embeddings
    }


def clean_parameter_name(name: str) -> str:
    """The parameter's name in the unwrapped model (without DDP's `module.` or FSDP1's wrapper segments)."""
    name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
    return name.removeprefix("module.")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier on train.lr for the update after `step` completed optimizer steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """A LambdaLR over lr_factor; its state (the step count) travels in the checkpoint."""
    return LambdaLR(optimizer, partial(lr_factor, cfg=cfg))
