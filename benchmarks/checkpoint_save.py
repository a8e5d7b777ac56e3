"""Checkpoint costs, measured side by side in one process on the same model and optimizer state:

  bare      torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}) to one file, no fsync;
  full      save_run_checkpoint, synchronous: the time training is blocked (gather through the phase gates,
            model.safetensors + train_state.pt hashed while written, BLAKE3 manifest, atomic rename); the fsync and
            prune that follow in the background are timed as well, as full_durable (vs bare + its fsync);
  async     save_run_checkpoint with checkpoint.async_save, then one training step: the time training is blocked
            is the save call (the gather) plus what the step's optimizer update waited for the snapshot (the copy
            runs in the background during the step's forward and backward); the write then runs in the background
            and is waited for outside the timed window. async_step is that step, step a step without a save next
            to it: their difference is what the copy running beside the step cost it;
  resume    restore_checkpoint into freshly built parts + the first optimizer step, vs building fresh parts + the
            first step (what a resume adds before training continues).
Contenders alternate within each repeat and each one's files are deleted (outside the timed window) before the
next starts: on a virtual machine, memory the guest has not touched for a while is slow to fault in, and a
contender that follows another's leftovers pays for it. Figures are medians over --repeats of the ratios
(targets: full/bare <= 1.10, async/full <= 0.25), at the default size (18M parameters, a 215 MB state) and with
--large at a state of over 1 GB (106M parameters, 1.27 GB).

Run: uv run python benchmarks/checkpoint_save.py [--repeats 7] [--large]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from wmtp_core.checkpoint.run_state import SaveSettings, restore_run_checkpoint, save_run_checkpoint
from wmtp_core.checkpoint.state_dicts import DISTRIBUTED_CHECKPOINT
from wmtp_core.checkpoint.storage import fsync_file
from wmtp_core.checkpoint.writer import CheckpointWriter
from wmtp_core.recipes import load_recipe
from wmtp_core.run.plan import plan_devices
from wmtp_core.runtime.devices import probe_environment
from wmtp_core.runtime.distributed import SINGLE
from wmtp_core.training.loop import train_step
from wmtp_core.training.parts import TrainState, batch_stream, build_run_parts

MODEL = [
    "model.d_model=384",
    "model.num_layers=6",
    "model.num_heads=6",
    "model.horizon=4",
    "data.batch_size=4",
    "model.max_seq_len=128",
]
LARGE = ["model.d_model=768", "model.num_layers=11", "model.num_heads=12"]
"""With MODEL: 106M parameters, a 1.27 GB state (weights and AdamW's two moments)."""


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def one_repeat(recipe, plan, parts, state, scratch: Path, repeat: int, writers) -> dict[str, float]:
    run_dir = scratch / f"run-{repeat}"
    sync_writer, async_writer = writers
    async_recipe = recipe.model_copy(update={"checkpoint": recipe.checkpoint.model_copy(update={"async_save": True})})
    bare_file = scratch / f"bare-{repeat}.pt"
    contenders = {
        "bare": lambda: torch.save(
            {"model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict()}, bare_file
        ),
        "full": lambda: save(parts, state, save_settings(run_dir / "sync", recipe, sync_writer)),
        "async": lambda: save(parts, state, save_settings(run_dir / "async", async_recipe, async_writer)),
        "step": lambda: one_step(recipe, plan, parts, state),
    }
    order = list(contenders) if repeat % 2 == 0 else list(contenders)[::-1]
    seconds = {}
    for name in order:
        waited_before = async_writer.staging_wait_s
        seconds[name] = timed(contenders[name])
        if name == "async":
            seconds["async_step"] = timed(lambda: one_step(recipe, plan, parts, state))
            seconds["async"] += async_writer.staging_wait_s - waited_before
        if name == "bare":
            seconds["bare_durable"] = seconds["bare"] + timed(lambda: fsync_file(bare_file))
            bare_file.unlink()
        if name == "full":
            seconds["full_durable"] = seconds["full"] + timed(sync_writer.wait)
            seconds["resume"] = timed(lambda: first_step(recipe, plan, resume_from=sync_writer.latest))
            seconds["fresh"] = timed(lambda: first_step(recipe, plan, resume_from=None))
            shutil.rmtree(run_dir / "sync")
        async_writer.wait()  # outside the timed window: the next contender must not compete with a pending write
        if name == "async":
            shutil.rmtree(run_dir / "async")
    shutil.rmtree(run_dir)
    return seconds


def one_step(recipe, plan, parts, state) -> None:
    batches = batch_stream(parts, state)
    train_step(parts, batches, state=state, recipe=recipe, plan=plan)
    batches.close()


def save_settings(run_dir: Path, recipe, writer) -> SaveSettings:
    return SaveSettings(
        run_dir=run_dir,
        checkpoint=recipe.checkpoint,
        keep_last=recipe.train.keep_last,
        timeout_s=recipe.devices.timeout_s,
        recipe=recipe.model_dump(mode="json"),
        ctx=SINGLE,
        state_dicts=DISTRIBUTED_CHECKPOINT,
        writer=writer,
        manifest_extra={},
    )


def save(parts, state, settings: SaveSettings) -> None:
    save_run_checkpoint(parts.pieces(), asdict(state), step=state.step, settings=settings)


def first_step(recipe, plan, *, resume_from: Path | None) -> None:
    parts = build_run_parts(recipe, plan)
    state = TrainState()
    if resume_from:
        pieces = parts.pieces()
        state = TrainState(
            **restore_run_checkpoint(pieces, resume_from, ctx=SINGLE, state_dicts=DISTRIBUTED_CHECKPOINT)
        )
    batches = batch_stream(parts, state)
    train_step(parts, batches, state=state, recipe=recipe, plan=plan)
    batches.close()


def state_bytes(parts) -> int:
    """What a save writes, give or take headers: the weights and the optimizer's tensors."""
    optimizer = parts.optimizer.state_dict()["state"].values()
    tensors = [*parts.model.state_dict().values(), *(t for s in optimizer for t in s.values() if torch.is_tensor(t))]
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--large", action="store_true", help="a state of over 1 GB (106M parameters)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    args = parser.parse_args()
    recipe = load_recipe(None, [*MODEL, *(LARGE if args.large else []), *args.overrides])
    plan = plan_devices(recipe, probe_environment())[2]
    parts, state = build_run_parts(recipe, plan), TrainState()
    one_step(recipe, plan, parts, state)  # the optimizer state exists from here on
    params = sum(p.numel() for p in parts.model.parameters())
    writers = CheckpointWriter(background=False), CheckpointWriter(background=True)
    writers[1].guard(parts.optimizer)  # as the training loop does
    with tempfile.TemporaryDirectory(prefix="wmtp-save-bench-") as scratch:
        rows = [one_repeat(recipe, plan, parts, state, Path(scratch), r, writers) for r in range(args.repeats)]
    ratios = {
        "full_over_bare": statistics.median(r["full"] / r["bare"] for r in rows),
        "full_durable_over_bare_durable": statistics.median(r["full_durable"] / r["bare_durable"] for r in rows),
        "async_blocking_over_full": statistics.median(r["async"] / r["full"] for r in rows),
        "async_step_slowdown_over_full": statistics.median((r["async_step"] - r["step"]) / r["full"] for r in rows),
        "resume_first_step_over_fresh_first_step": statistics.median(r["resume"] / r["fresh"] for r in rows),
    }
    for r in rows:
        print("  ".join(f"{k} {v * 1000:7.1f} ms" for k, v in r.items()))
    print(
        json.dumps(
            {
                "benchmark": "checkpoint_save",
                "parameters": params,
                "state_bytes": state_bytes(parts),
                "repeats": args.repeats,
                "median_ms": {k: round(statistics.median(r[k] for r in rows) * 1000, 1) for k in rows[0]},
                **{k: round(v, 3) for k, v in ratios.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
