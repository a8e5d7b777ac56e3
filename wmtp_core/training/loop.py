"""The training loop: free functions over RunParts and a TrainState (no trainer class).

One optimizer step = train.grad_accumulation_steps micro-batches. Progress leaves through the `on_metrics`
callback and the `wmtp_core` logger; checkpoints go through wmtp_core.checkpoint.storage only.
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

import torch
from torch.distributed.tensor import DTensor

from wmtp_core.algorithms.losses import uniform_weights, valid_mask, weighted_mtp_loss
from wmtp_core.algorithms.objective import MicroBatch, algorithm_loss, head_losses
from wmtp_core.checkpoint.run_state import SaveSettings, restore_run_checkpoint, save_run_checkpoint
from wmtp_core.checkpoint.writer import CheckpointWriter
from wmtp_core.config import Recipe
from wmtp_core.fixplan.gates import behaviours
from wmtp_core.run.plan import RunPlan
from wmtp_core.runtime.devices import DevicePlan, autocast_context
from wmtp_core.runtime.distributed import (
    SINGLE,
    DistContext,
    all_reduce_mean,
    check_strategy,
    max_over_ranks,
    reshard_after_forward_only,
    sum_over_ranks,
)
from wmtp_core.runtime.resources import training_resources
from wmtp_core.runtime.stopping import STOP_REASONS, StopRequest, TrainingInterrupted
from wmtp_core.training.critic_stage1 import pretrain_value_head
from wmtp_core.training.parts import RunParts, TrainState, batch_stream, build_run_parts

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
    stop_reason: str | None = None
    """None when train.max_steps was reached; 'time budget' when time_budget_s ran out (a checkpoint was saved)."""
    saved_checkpoints: tuple[str, ...] = ()
    """The checkpoints this call saved (some may have been pruned since): valid by construction, so whoever gets
    this result need not hash them again."""
    checkpoints: tuple[dict, ...] = ()
    """The run's checkpoints after the last save ({step, path, valid, problem}), as its pruning listed them (rank 0),
    so a table of them needs no listing of its own."""


def train(
    run_plan: RunPlan,
    *,
    on_metrics: MetricsCallback | None = None,
    manifest_extra: dict | None = None,
    ctx: DistContext = SINGLE,
) -> TrainResult:
    """Train the planned run to recipe.train.max_steps from the plan's start point; saves along the way.

    Stops early with a checkpoint at the step reached when the plan's time budget runs out (returns, stop_reason
    set) or on SIGTERM (raises TrainingInterrupted). Under torchrun every rank calls this with the same plan and
    its own DistContext. The plan's start checkpoint was verified when it was chosen: it is not hashed again.
    """
    recipe, plan, start = run_plan.recipe, run_plan.devices, run_plan.start
    gates = behaviours(run_plan.gates)
    _seed_and_check(run_plan, ctx)
    parts = build_run_parts(
        recipe,
        plan,
        data_file=run_plan.data_file,
        reference_checkpoint=run_plan.reference,
        ctx=ctx,
        wrap_fsdp=gates.wrap_fsdp,
        from_meta=gates.fsdp_from_meta,
    )
    if recipe.data.ledger:
        parts.data_ledger = run_plan.layout.data_ledger(ctx.rank)
    state = TrainState()
    if not start.fresh:
        restored = restore_run_checkpoint(
            parts.pieces(), start.checkpoint, ctx=ctx, state_dicts=gates.state_dicts, verified=True
        )
        state = TrainState(**restored)
    resumed_from = state.step if not start.fresh else None
    report = (on_metrics or (lambda step, metrics: None)) if ctx.is_main else (lambda step, metrics: None)
    writer = CheckpointWriter(background=recipe.checkpoint.async_save)
    writer.guard(parts.optimizer)  # an async save's snapshot overlaps the next forward and backward, not the update
    writer.latest = start.checkpoint
    settings = SaveSettings(
        run_dir=run_plan.run_dir,
        checkpoint=recipe.checkpoint,
        keep_last=recipe.train.keep_last,
        timeout_s=recipe.devices.timeout_s,
        recipe=recipe.model_dump(mode="json"),
        ctx=ctx,
        state_dicts=gates.state_dicts,
        writer=writer,
        manifest_extra=manifest_extra or {},
    )

    def save() -> None:
        save_run_checkpoint(parts.pieces(), asdict(state), step=state.step, settings=settings)

    _before_the_first_step(parts, state, recipe=recipe, plan=plan, report=report, save=save)
    started, start_tokens = time.perf_counter(), state.tokens_seen
    stop_reason = None
    explicit = gates.explicit_cleanup
    try:
        with (
            StopRequest(run_plan.time_budget_s, handle_signals=explicit) as stop,
            training_resources(plan.device, explicit=explicit) as resources,
        ):
            batches = resources.track(batch_stream(parts, state))
            stop_reason = run_steps(
                parts, batches, state, recipe=recipe, plan=plan, report=report, save=save, stop=stop
            )
    finally:
        latest = writer.wait()  # never exit (or raise) with a checkpoint write still pending
    if stop_reason == "SIGTERM":
        raise TrainingInterrupted(f"SIGTERM at step {state.step}: checkpoint {latest} saved; resume continues from it")
    elapsed = time.perf_counter() - started
    return TrainResult(
        steps=state.step,
        initial_eval_loss=state.initial_eval_loss,
        final_eval_loss=evaluate(parts, plan),
        latest_checkpoint=str(latest),
        tokens_per_s=(state.tokens_seen - start_tokens) / max(elapsed, 1e-9),
        skipped_steps=state.skipped_steps,
        resumed_from_step=resumed_from,
        stop_reason=stop_reason,
        saved_checkpoints=tuple(str(path) for path in writer.saved),
        checkpoints=tuple({**asdict(info), "path": str(info.path)} for info in writer.settled or ()),
    )


def _before_the_first_step(
    parts: RunParts, state: TrainState, *, recipe: Recipe, plan: DevicePlan, report: MetricsCallback, save: Callable
) -> None:
    """The initial eval loss and critic Stage 1, each once per run (a resumed run has them in its checkpoint)."""
    if state.initial_eval_loss is None:
        state.initial_eval_loss = evaluate(parts, plan)
        report(0, {"eval_loss": state.initial_eval_loss})
    if recipe.train.algorithm == "critic-wmtp" and not state.value_head_pretrained:
        report(
            state.step,
            pretrain_value_head(
                parts, critic=recipe.critic, grad_accumulation_steps=recipe.train.grad_accumulation_steps, plan=plan
            ),
        )
        state.value_head_pretrained = True
        save()  # at once, so a resumed critic run never redoes Stage 1


def _seed_and_check(run_plan: RunPlan, ctx: DistContext) -> None:
    """Log the plan's device choices (rank 0), check the strategy against the job, and seed the run's RNGs."""
    if ctx.is_main:
        log.info("device plan: %s", "; ".join(run_plan.devices.reasons))
    check_strategy(run_plan.recipe.devices.strategy, ctx)
    torch.manual_seed(run_plan.recipe.seed)
    random.seed(run_plan.recipe.seed)


def run_steps(
    parts: RunParts,
    batches: Iterator[dict],
    state: TrainState,
    *,
    recipe: Recipe,
    plan: DevicePlan,
    report: MetricsCallback,
    save: Callable[[], None],
    stop: StopRequest,
) -> str | None:
    """Optimizer steps to max_steps with logging, eval and saves at their cadence; returns why it stopped early."""
    train_cfg = recipe.train
    window_start, window_tokens = time.perf_counter(), state.tokens_seen
    while state.step < train_cfg.max_steps:
        metrics = train_step(parts, batches, state=state, recipe=recipe, plan=plan)
        step = state.step
        if step % train_cfg.log_every == 0:
            now = time.perf_counter()
            metrics["tokens_per_s"] = (state.tokens_seen - window_tokens) / max(now - window_start, 1e-9)
            window_start, window_tokens = now, state.tokens_seen
            if parts.ctx.is_main:
                log_progress(step, metrics, recipe)
            report(step, metrics)
        if step % train_cfg.eval_every == 0 or step == train_cfg.max_steps:
            report(step, {"eval_loss": evaluate(parts, plan)})
        # Every rank stops at the same step (the save below is a collective), whichever rank was told to.
        reason = STOP_REASONS[max_over_ranks(stop.severity(), parts.ctx)]
        if step % train_cfg.save_every == 0 or step == train_cfg.max_steps or reason:
            save()
        if reason and step < train_cfg.max_steps:
            return reason
    return None


def train_step(
    parts: RunParts, batches: Iterator[dict], *, state: TrainState, recipe: Recipe, plan: DevicePlan
) -> dict[str, float]:
    """One optimizer step over grad_accumulation_steps micro-batches; a non-finite loss or grad skips the update."""
    parts.model.train()
    accumulation = recipe.train.grad_accumulation_steps
    totals: dict[str, torch.Tensor] = {}
    num_tokens = torch.zeros((), dtype=torch.int64, device=plan.device)
    for _ in range(accumulation):
        batch = next(batches)
        mb = MicroBatch.from_batch(batch, device=plan.device, pad_id=parts.pad_id)
        loss, metrics = algorithm_loss(parts.model, mb, parts.objective, plan=plan, reference=parts.reference)
        parts.scaler.scale(loss / accumulation).backward()
        for name, value in {"loss": loss.detach(), **metrics}.items():
            totals[name] = totals.get(name, 0.0) + value.float() / accumulation
        num_tokens += mb.valid_BT.count_nonzero()
    # One host sync for every metric; the loss is needed on the host anyway to decide whether to update. Under
    # torchrun the metrics are averaged over ranks first, so every rank takes the same skip decision. The token
    # count's sum is queued before that sync, which so completes it too: reading it after costs no second wait.
    tokens_over_ranks = sum_over_ranks(num_tokens, parts.ctx)
    values = dict(zip(totals, all_reduce_mean(torch.stack(list(totals.values())), parts.ctx).tolist()))
    state.tokens_seen += int(tokens_over_ranks)
    grad_norm = apply_update(parts, recipe=recipe, loss_ok=math.isfinite(values["loss"]))
    if grad_norm is None:
        state.skipped_steps += 1
        log.warning(
            "step %d: non-finite loss or gradient, update skipped (%d so far)", state.step + 1, state.skipped_steps
        )
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
        norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), max_norm)
        norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # FSDP2: a sharded norm
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
            # One head's logits at a time: without gradients that costs nothing, and eval never holds all of them.
            ce_BTK, _ = head_losses(
                parts.model, batch["tokens"].to(plan.device), labels_BTK, sequential=True, values=False
            )
        total += float(weighted_mtp_loss(ce_BTK, uniform_weights(labels_BTK), valid_mask(labels_BTK)))
    reshard_after_forward_only(parts.model)
    parts.model.train()
    return total / len(parts.eval_batches)


def log_progress(step: int, metrics: dict[str, float], recipe: Recipe) -> None:
    log.info(
        "step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f",
        step,
        recipe.train.max_steps,
        metrics["loss"],
        metrics["lr"],
        metrics["grad_norm"],
        metrics["tokens_per_s"],
    )
