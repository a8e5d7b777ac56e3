"""The objects one run trains with (model, optimizer, schedule, data), built from a recipe and a device plan,
the TrainState that says where training stands, and the resumable stream of batches."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TextIO

import torch
from torch.utils.data import DataLoader

from wmtp_core.algorithms.objective import Objective
from wmtp_core.algorithms.reference import load_reference
from wmtp_core.checkpoint.run_state import RunPieces
from wmtp_core.config import Recipe
from wmtp_core.data.records import builtin_dataset_path, load_records, split_records
from wmtp_core.data.sequences import MTPCollator, TokenSequences, epoch_batches, make_loader
from wmtp_core.models.build import build_tokenizer
from wmtp_core.models.hf import HFMTPModel, export_pretrained
from wmtp_core.runtime.devices import DevicePlan
from wmtp_core.runtime.distributed import SINGLE, DistContext, FsdpWrapper, shard_fully
from wmtp_core.training.model_init import build_wrapped_model
from wmtp_core.training.optim import build_optimizer, build_scheduler
from wmtp_core.training.parallelize import shard_reference


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint as plain values."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    """Target tokens trained on by all ranks together, so it continues correctly at another number of ranks."""
    skipped_steps: int = 0
    initial_eval_loss: float | None = None
    value_head_pretrained: bool = False
    tokens_global: bool = True
    """tokens_seen counts every rank's tokens; absent from checkpoints that counted rank 0's only."""


@dataclass
class RunParts:
    """Everything a training run holds in memory; built once per run, never passed between Prefect tasks."""

    model: torch.nn.Module
    """The model as trained: the MTPTransformer or HFMTPModel itself, or wrapped by DDP/FSDP under torchrun."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    train_data: TokenSequences
    eval_batches: list[dict[str, torch.Tensor]]
    collator: MTPCollator
    pad_id: int
    batch_size: int
    num_workers: int
    worker_start: str
    seed: int
    objective: Objective
    """What each micro-batch's loss depends on (wmtp_core.algorithms.objective), taken from the recipe once."""
    reference: torch.nn.Module | None = None
    ctx: DistContext = SINGLE
    export: Callable[[Path, dict[str, torch.Tensor]], None] | None = None
    """Writes a transformers-loadable copy of the trunk into a checkpoint directory being built, from the full model
    state (hf models; wmtp_core.models.hf.export_pretrained)."""
    data_ledger: Path | None = None
    """data.ledger: the file this rank appends {"epoch", "position", "ids"} to for every micro-batch it takes."""

    def pieces(self) -> RunPieces:
        """What a checkpoint of this run saves."""
        return RunPieces(self.model, self.optimizer, self.scheduler, self.scaler, self.export)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(len(self.train_data), batch_size=self.batch_size, seed=self.seed, epoch=epoch)

    def loader(self, batches: list[list[int]]) -> DataLoader:
        return make_loader(
            self.train_data, batches, self.collator, num_workers=self.num_workers, worker_start=self.worker_start
        )


def build_run_parts(
    recipe: Recipe,
    plan: DevicePlan,
    *,
    data_file: Path | None = None,
    reference_checkpoint: Path | None = None,
    ctx: DistContext = SINGLE,
    wrap_fsdp: FsdpWrapper = shard_fully,
    from_meta: bool = False,
) -> RunParts:
    """Tokenize the data, build the model on the plan's device, wrap it for DDP/FSDP, then build the optimizer
    (after wrapping: FSDP replaces the parameters, an optimizer built earlier would update stale ones).
    data_file: the records to read: a run plan's (train() passes it: the planner's checked copy of a user file, or
    the built-in set); None reads the recipe's data.path (or the built-in set) directly, as benchmarks do.
    from_meta: FSDP2 builds on the meta device and fills the shards from rank 0 (wmtp_core.training.model_init)."""
    tokenizer = build_tokenizer(recipe.model)
    records = load_records(data_file or recipe.data.path or builtin_dataset_path())
    train_records, eval_records = split_records(records, eval_fraction=recipe.data.eval_fraction, seed=recipe.seed)
    max_len = recipe.model.max_seq_len
    collator = MTPCollator(horizon=recipe.model.horizon, pad_id=tokenizer.pad_id)
    critic = recipe.train.algorithm == "critic-wmtp"
    model, unwrapped, decayed = build_wrapped_model(
        recipe.model,
        tokenizer,
        train=recipe.train,
        loss=recipe.loss,
        strategy=recipe.devices.strategy,
        plan=plan,
        ctx=ctx,
        wrap_fsdp=wrap_fsdp,
        from_meta=from_meta,
        with_value_head=critic,
    )
    export = partial(export_pretrained, unwrapped, tokenizer) if isinstance(unwrapped, HFMTPModel) else None
    optimizer = build_optimizer(model, recipe.train, value_lr=recipe.critic.value_lr, decayed=decayed)
    reference = load_reference(
        recipe.rho1,
        reference_checkpoint,
        plan,
        algorithm=recipe.train.algorithm,
        model_cfg=recipe.model,
        trunk_tokenizer=tokenizer,
    )
    return RunParts(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, recipe.train),
        scaler=torch.amp.GradScaler(plan.device, enabled=plan.use_grad_scaler),
        train_data=TokenSequences(train_records, tokenizer, max_len=max_len),
        eval_batches=_fixed_eval_batches(TokenSequences(eval_records, tokenizer, max_len=max_len), collator, recipe),
        collator=collator,
        pad_id=tokenizer.pad_id,
        batch_size=recipe.data.batch_size,
        num_workers=plan.num_workers,
        worker_start=recipe.data.worker_start,
        seed=recipe.seed,
        objective=Objective.of(recipe),
        reference=shard_reference(reference, plan, ctx, strategy=recipe.devices.strategy, fsdp=wrap_fsdp),
        ctx=ctx,
        export=export,
    )


def _fixed_eval_batches(
    eval_data: TokenSequences, collator: MTPCollator, recipe: Recipe
) -> list[dict[str, torch.Tensor]]:
    size = recipe.data.batch_size
    starts = range(0, len(eval_data), size)
    return [collator([eval_data[i] for i in range(start, min(start + size, len(eval_data)))]) for start in starts][
        : recipe.train.eval_batches
    ]


def batch_stream(parts: RunParts, state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
    """Batches forever, epoch after epoch, starting at state's data position and advancing it as they are taken.

    The data position counts micro-batches of the whole job: with W processes, rank r takes every W-th batch
    from r on, so a checkpoint saved by W processes resumes at the same data on any other number.
    """
    rank, world = parts.ctx.rank, parts.ctx.world_size
    loader_iter = None
    ledger = _open_ledger(parts.data_ledger)
    try:
        while True:
            batches = parts.epoch_batches(state.epoch)
            rounds = (len(batches) - state.batch_in_epoch) // world  # a round gives every rank one batch
            mine = batches[state.batch_in_epoch + rank :: world][:rounds]
            loader_iter = iter(parts.loader(mine))
            for ids, batch in zip(mine, loader_iter):
                if ledger is not None:
                    entry = {"epoch": state.epoch, "position": state.batch_in_epoch + rank, "ids": ids}
                    ledger.write(json.dumps(entry) + "\n")
                    ledger.flush()
                state.batch_in_epoch += world
                yield batch
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    finally:
        del loader_iter  # drops the iterator so its worker processes shut down now, not at interpreter exit
        if ledger is not None:
            ledger.close()


def _open_ledger(path: Path | None) -> TextIO | None:
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a")
