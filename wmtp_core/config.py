"""The recipe: one pydantic tree that describes a WMTP run (wmtp_core.recipes reads, overrides and writes it).

This module imports no torch, so flows can use it as a Prefect parameter type and the UI form
can be built from source.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class RecipeError(ValueError):
    """A recipe, override or run name the user must change; the message names the field or file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class RunConfig(_Section):
    name: str | None = Field(default=None, pattern=RUN_NAME_PATTERN)
    """Run name: the directory under $WMTP_HOME/runs and the MLflow run name; null generates one."""
    tags: list[str] = []
    """Free-form tags recorded on the MLflow run."""


class ModelConfig(_Section):
    horizon: int = Field(default=4, ge=1, le=16)
    """Number of MTP heads; head k predicts the token k+1 positions ahead."""
    num_layers: PositiveInt = 2
    """Transformer blocks in the shared trunk (each head adds one more block)."""
    d_model: PositiveInt = 64
    """Width of the residual stream; must be divisible by model.num_heads."""
    num_heads: PositiveInt = 4
    """Attention heads per block."""
    max_seq_len: int = Field(default=256, ge=8)
    """Longest sequence in tokens; longer examples are truncated."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout probability inside the blocks."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.d_model % self.num_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.num_heads ({self.num_heads})")
        return self


class DataConfig(_Section):
    path: Path | None = None
    """JSONL file in the MBPP schema (text, code, test_list); null uses the built-in dataset."""
    batch_size: PositiveInt = 16
    """Sequences per micro-batch."""
    num_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes (0 loads in the training process)."""
    eval_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    """Share of records held out for the eval loss."""


class TrainConfig(_Section):
    algorithm: Literal["baseline-mtp"] = "baseline-mtp"
    """Token-weighting algorithm; baseline-mtp weights every (token, head) equally."""
    max_steps: PositiveInt = 150
    """Optimizer steps to train for (each step is train.grad_accumulation_steps micro-batches)."""
    lr: float = Field(default=3e-3, gt=0.0)
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Final learning rate as a fraction of train.lr for the cosine and linear schedules."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup, counted in optimizer steps."""
    warmup_steps: int = Field(default=10, ge=0)
    """Optimizer steps of linear warmup from 0 to train.lr."""
    lr_decay_steps: PositiveInt | None = None
    """Optimizer steps over which the schedule decays; null means train.max_steps."""
    weight_decay: float = Field(default=0.1, ge=0.0)
    """AdamW weight decay (matrices only; biases, norms and embeddings are not decayed)."""
    grad_clip: float = Field(default=1.0, ge=0.0)
    """Clip the global gradient norm to this value; 0 disables clipping."""
    grad_accumulation_steps: PositiveInt = 1
    """Micro-batches whose gradients are summed before one optimizer step."""
    save_every: PositiveInt = 50
    """Write a checkpoint every this many optimizer steps (and always at the end)."""
    keep_last: int = Field(default=3, ge=2)
    """Checkpoints kept on disk; at least 2, because the newest may be mid-write when a run dies."""
    log_every: PositiveInt = 10
    """Report training metrics every this many optimizer steps."""
    eval_every: PositiveInt = 50
    """Compute the eval loss every this many optimizer steps (and at the start and end)."""
    eval_batches: PositiveInt = 8
    """Eval micro-batches per evaluation: the first ones of the held-out split, the same every time."""


class LossConfig(_Section):
    scale: float = Field(default=1.0, gt=0.0)
    """Multiplier on the weighted MTP loss (the original code's loss.lambda)."""


class DevicesConfig(_Section):
    backend: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    """Compute device; auto picks CUDA, then MPS, then CPU."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision; auto is bf16 on CUDA where supported and fp32 elsewhere."""


class TrackingConfig(_Section):
    experiment: str = "wmtp"
    """MLflow experiment that holds the run."""
    enabled: bool = True
    """Log params, metrics and checkpoints to MLflow."""


class PhaseGates(_Section):
    checkpoint: bool = True
    """Phase 1: checkpoint saving that works for every model kind (off: legacy FSDP-only calls, fail on plain modules)."""
    mps: bool = True
    """Phase 2: device-aware precision and DataLoader workers (off: autocast with the configured dtype everywhere)."""
    api: bool = True
    """Phase 3: torch.distributed.checkpoint state dicts (off: the deprecated FSDP.state_dict_type path)."""


class Recipe(_Section):
    run: RunConfig = RunConfig()
    """Run identity."""
    seed: int = Field(default=1337, ge=0)
    """Seed for model init, data order and every RNG the run uses."""
    model: ModelConfig = ModelConfig()
    """Model size and MTP horizon."""
    data: DataConfig = DataConfig()
    """Training data and loading."""
    train: TrainConfig = TrainConfig()
    """Optimisation, schedule, checkpoint and eval cadence."""
    loss: LossConfig = LossConfig()
    """Weighted MTP loss settings."""
    devices: DevicesConfig = DevicesConfig()
    """Device and precision."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking."""
    phases: PhaseGates = PhaseGates()
    """Fix-plan gates: on is the fixed path, off the legacy one."""

    @model_validator(mode="after")
    def _cadences_fit(self) -> Recipe:
        if self.train.warmup_steps > self.train.max_steps:
            raise ValueError(
                f"train.warmup_steps ({self.train.warmup_steps}) exceeds train.max_steps ({self.train.max_steps})"
            )
        return self


def check_run_name(name: str) -> str:
    """Return name if it is a safe directory name, else raise RecipeError saying what is allowed."""
    if not re.match(RUN_NAME_PATTERN, name):
        raise RecipeError(
            f"run name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def generate_run_name(recipe: Recipe) -> str:
    """A unique, readable default run name: <algorithm>-<UTC timestamp>."""
    return f"{recipe.train.algorithm}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S-%f}"


def with_run_name(recipe: Recipe, name: str) -> Recipe:
    """A copy of the recipe with run.name set (validated)."""
    return recipe.model_copy(update={"run": recipe.run.model_copy(update={"name": check_run_name(name)})})
