"""The training loop: free functions over RunParts and a TrainState (no trainer class).

One optimizer step = train.grad_accumulation_steps micro-batches. Progress leaves through the `on_metrics`
callback and the `wmtp_core` logger; checkpoints go through wmtp_core.checkpoint only.
Shapes: B batch, T time, K horizon (heads), V vocabulary.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wmtp_core.checkpoint import check_shapes_match, load_checkpoint, save_checkpoint
from wmtp_core.manifest import prune_checkpoints
from wmtp_core.config import Recipe
from wmtp_core.device import DevicePlan, autocast_context
from wmtp_core.algorithms import MicroBatch, algorithm_loss
from wmtp_core.critic import pretrain_value_head
from wmtp_core.losses import head_cross_entropy, uniform_weights, valid_mask, weighted_mtp_loss
from wmtp_core.reference import prepare_reference
from wmtp_core.run_parts import RunParts, TrainState, batch_stream, build_run_parts
from wmtp_core.state_dicts import gather_state, restore_state

log = logging.getLogger(__name__)
MetricsCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainResult:
    steps: int
    initial_eval_loss: float
    final_eval_loss: float
    latest_checkpoint: str
    tokens_per_s: float
    skipped_steps: int
    resumed_from_step: int | None


def train(
    recipe: Recipe,
    run_dir: Path,
    *,
    plan: DevicePlan,
    resume_from: Path | None = None,
    on_metrics: MetricsCallback | None = None,
    manifest_extra: dict | None = None,
) -> TrainResult:
    """Train to recipe.train.max_steps, resuming from a checkpoint directory if given; saves along the way."""
    reference = prepare_reference(recipe, run_dir, plan=plan) if recipe.train.algorithm == "rho1-wmtp" else None
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    parts = build_run_parts(recipe, plan, reference_checkpoint=reference)
    state = restore_checkpoint(parts, resume_from, recipe) if resume_from else TrainState()
    resumed_from = state.step if resume_from else None
    report = on_metrics or (lambda step, metrics: None)
    extra = manifest_extra or {}
    latest = resume_from
    if state.initial_eval_loss is None:
        state.initial_eval_loss = evaluate(parts, plan)
        report(0, {"eval_loss": state.initial_eval_loss})
    if recipe.train.algorithm == "critic-wmtp" and not state.value_head_pretrained:
        report(state.step, pretrain_value_head(parts, recipe=recipe, plan=plan))
        state.value_head_pretrained = True
        # Saved at once, so a resumed critic run never redoes Stage 1.
        latest = save_run_checkpoint(parts, state, run_dir, recipe=recipe, manifest_extra=extra)
    batches = batch_stream(parts, state)
    started, start_tokens = time.perf_counter(), state.tokens_seen
    try:
        window_start, window_tokens = time.perf_counter(), state.tokens_seen
        while state.step < recipe.train.max_steps:
            metrics = train_step(parts, batches, state=state, recipe=recipe, plan=plan)
            step = state.step
            if step % recipe.train.log_every == 0:
                now = time.perf_counter()
                metrics["tokens_per_s"] = (state.tokens_seen - window_tokens) / max(now - window_start, 1e-9)
                window_start, window_tokens = now, state.tokens_seen
                log_progress(step, metrics, recipe)
                report(step, metrics)
            if step % recipe.train.eval_every == 0 or step == recipe.train.max_steps:
                report(step, {"eval_loss": evaluate(parts, plan)})
            if step % recipe.train.save_every == 0 or step == recipe.train.max_steps:
                latest = save_run_checkpoint(parts, state, run_dir, recipe=recipe, manifest_extra=extra)
    finally:
        batches.close()
    elapsed = time.perf_counter() - started
    final_eval = evaluate(parts, plan)
    return TrainResult(
        steps=state.step,
        initial_eval_loss=state.initial_eval_loss,
        final_eval_loss=final_eval,
        latest_checkpoint=str(latest),
        tokens_per_s=(state.tokens_seen - start_tokens) / max(elapsed, 1e-9),
        skipped_steps=state.skipped_steps,
        resumed_from_step=resumed_from,
    )


def train_step(
    parts: RunParts, batches: Iterator[dict], *, state: TrainState, recipe: Recipe, plan: DevicePlan
) -> dict[str, float]:
    """One optimizer step over grad_accumulation_steps micro-batches; a non-finite loss or grad skips the update."""
    parts.model.train()
    accumulation = recipe.train.grad_accumulation_steps
    totals: dict[str, torch.Tensor] = {}
    for _ in range(accumulation):
        batch = next(batches)
        mb = MicroBatch.from_batch(batch, device=plan.device, pad_id=parts.pad_id)
        loss, metrics = algorithm_loss(parts.model, mb, recipe=recipe, plan=plan, reference=parts.reference)
        parts.scaler.scale(loss / accumulation).backward()
        for name, value in {"loss": loss.detach(), **metrics}.items():
            totals[name] = totals.get(name, 0.0) + value.float() / accumulation
        state.tokens_seen += int(mb.valid_BT.sum())
    # One host sync for every metric; the loss is needed on the host anyway to decide whether to update.
    values = dict(zip(totals, torch.stack(list(totals.values())).tolist()))
    grad_norm = apply_update(parts, recipe=recipe, loss_ok=math.isfinite(values["loss"]))
    if grad_norm is None:
        state.skipped_steps += 1
        log.warning("step %d: non-finite loss or gradient, update skipped (%d so far)", state.step + 1, state.skipped_steps)
    state.step += 1
    values.update(lr=parts.scheduler.get_last_lr()[0], skipped_steps=float(state.skipped_steps))
    values["grad_norm"] = grad_norm if grad_norm is not None else float("nan")
    return values


def apply_update(parts: RunParts, *, recipe: Recipe, loss_ok: bool) -> float | None:
    """Clip and step when the loss and gradient are finite; returns the grad norm, or None when skipped."""
    grad_norm = None
    if loss_ok:
        parts.scaler.unscale_(parts.optimizer)
        max_norm = recipe.train.grad_clip or float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(parts.model.parameters(), max_norm))
        if math.isfinite(norm):
            parts.scaler.step(parts.optimizer)
            grad_norm = norm
        parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        # A skipped update still advances the schedule, so lr stays a function of the step count; torch warns
        # about scheduler.step() without optimizer.step(), which is exactly what is meant here.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler", category=UserWarning)
        parts.scheduler.step()
    return grad_norm


@torch.no_grad()
def evaluate(parts: RunParts, plan: DevicePlan) -> float:
    """Mean uniform-weight MTP loss over the fixed eval batches (the same batches every time)."""
    parts.model.eval()
    total = 0.0
    for batch in parts.eval_batches:
        labels_BTK = batch["labels"].to(plan.device)
        with autocast_context(plan):
            logits_BTKV = parts.model(batch["tokens"].to(plan.device))
        ce_BTK = head_cross_entropy(logits_BTKV, labels_BTK)
        total += float(weighted_mtp_loss(ce_BTK, uniform_weights(labels_BTK), valid_mask(labels_BTK)))
    parts.model.train()
    return total / len(parts.eval_batches)


def save_run_checkpoint(parts: RunParts, state: TrainState, run_dir: Path, *, recipe: Recipe, manifest_extra: dict) -> Path:
    """Gather full state through the phase gates, write it atomically, prune to train.keep_last."""
    model_state, optim_state = gather_state(parts.model, parts.optimizer, recipe.phases)
    train_state = {
        "optimizer": optim_state,
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "rng": capture_rng(),
        "progress": asdict(state),
    }
    manifest = {"recipe": recipe.model_dump(mode="json"), "torch_version": torch.__version__, "world_size": 1, **manifest_extra}
    path = save_checkpoint(run_dir, step=state.step, model_state=model_state, train_state=train_state, manifest_extra=manifest)
    prune_checkpoints(run_dir, keep_last=recipe.train.keep_last)
    log.info("saved checkpoint %s", path)
    return path


def restore_checkpoint(parts: RunParts, path: Path, recipe: Recipe) -> TrainState:
    """Load model, optimizer, scheduler, scaler, RNG and data position from a checkpoint directory."""
    model_state, train_state, _ = load_checkpoint(path)
    check_shapes_match(model_state, parts.model.state_dict(), source=path)
    restore_state(parts.model, parts.optimizer, model_state, train_state["optimizer"], recipe.phases)
    parts.scheduler.load_state_dict(train_state["scheduler"])
    if train_state["scaler"]:
        parts.scaler.load_state_dict(train_state["scaler"])
    restore_rng(train_state["rng"])
    state = TrainState(**train_state["progress"])
    log.info("resumed from %s at step %d", path, state.step)
    return state


def capture_rng() -> dict:
    """Every RNG the run uses, as values torch.load(weights_only=True) accepts."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def log_progress(step: int, metrics: dict[str, float], recipe: Recipe) -> None:
    log.info(
        "step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f",
        step, recipe.train.max_steps, metrics["loss"], metrics["lr"], metrics["grad_norm"], metrics["tokens_per_s"],
    )
