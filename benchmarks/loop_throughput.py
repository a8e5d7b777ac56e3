"""Tokens/s of the core training loop versus the minimal bare PyTorch loop a user would write.

Contenders, each with a fresh model built after torch.manual_seed(recipe.seed) (identical initial weights):
  core   wmtp_core.training.loop.train_step over build_run_parts(recipe, plan), driven as train() drives it
         (state, log_every metrics with tokens/s and log_progress, the no-op on_metrics callback), fed the
         pre-collated batches;
  bare   MTPTransformer + AdamW + head_cross_entropy/weighted_mtp_loss (uniform weights) + backward +
         clip_grad_norm_ + step + zero_grad, fed the same pre-collated batches;
  loader (info, --with-loader) train_step fed by wmtp_core.training.parts.batch_stream (the DataLoader) exactly
         as train() feeds it; the same batches in the same order, collated on the fly.
The batches are the ones batch_stream yields (same dataset, collator and epoch order), collated once up front
and moved to the device inside each step with .to(device, non_blocking=True), the same way for all.
Only the per-step loop is timed: the initial/periodic eval and checkpoint saving that train() also does are
not per-step work and are left out of the timed window.
Contenders are interleaved: each measurement is --steps steps after --warmup untimed steps, timed in
slices of --chunk steps that alternate between contenders (order reversed every other slice), so load
from other processes hits all contenders alike; the figure is the median over --repeats of core tokens/s
divided by bare tokens/s (every contender gets the same batches in each repeat).

Run: uv run python benchmarks/loop_throughput.py [--repeats 5 --steps 40 --chunk 10]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from wmtp_core.algorithms.losses import head_cross_entropy, uniform_weights, valid_mask, weighted_mtp_loss
from wmtp_core.models.tokenizer import ByteTokenizer
from wmtp_core.models.transformer import MTPTransformer
from wmtp_core.recipes import load_recipe
from wmtp_core.run.plan import plan_devices
from wmtp_core.runtime.devices import probe_environment
from wmtp_core.training.loop import log_progress, train_step
from wmtp_core.training.parts import TrainState, batch_stream, build_run_parts


def precollate(parts, recipe, count: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` batches batch_stream would yield, collated once (epochs roll over as in train())."""
    stream = batch_stream(parts, TrainState())
    try:
        return [{k: v.clone() for k, v in batch.items()} for batch in itertools.islice(stream, count)]
    finally:
        stream.close()


class Core:
    """train_step driven as the loop in train() drives it, minus eval and checkpoint saving."""

    def __init__(self, recipe, plan, batches=None):
        torch.manual_seed(recipe.seed)
        self.recipe, self.plan = recipe, plan
        self.parts = build_run_parts(recipe, plan)
        self.state = TrainState()
        self.batches = iter(batches) if batches is not None else batch_stream(self.parts, self.state)
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def run(self, steps: int) -> None:
        recipe, state = self.recipe, self.state
        for _ in range(steps):
            metrics = train_step(self.parts, self.batches, state=state, recipe=recipe, plan=self.plan)
            if state.step % recipe.train.log_every == 0:
                now = time.perf_counter()
                metrics["tokens_per_s"] = (state.tokens_seen - self.window_tokens) / max(now - self.window_start, 1e-9)
                self.window_start, self.window_tokens = now, state.tokens_seen
                log_progress(state.step, metrics, recipe)


class Bare:
    """The minimal loop: forward, loss, backward, clip, step, zero_grad."""

    def __init__(self, recipe, plan, batches):
        torch.manual_seed(recipe.seed)
        self.device, self.clip = plan.device, recipe.train.grad_clip
        self.model = MTPTransformer(recipe.model, vocab_size=ByteTokenizer().vocab_size).to(plan.device)
        cfg = recipe.train
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
        )
        self.batches = iter(batches)

    def run(self, steps: int) -> None:
        self.model.train()
        for _ in range(steps):
            batch = next(self.batches)
            tokens = batch["tokens"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            ce = head_cross_entropy(self.model(tokens), labels)
            loss = weighted_mtp_loss(ce, uniform_weights(labels), valid_mask(labels))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def count_tokens(batches, pad_id: int) -> int:
    return sum(int((b["tokens"] != pad_id).sum()) for b in batches)


def measure(recipe, plan, *, repeats: int, steps: int, chunk: int, warmup: int, with_loader: bool) -> dict:
    total = warmup + repeats * steps
    probe_parts = build_run_parts(recipe, plan)
    batches = precollate(probe_parts, recipe, total)
    contenders = {"core": Core(recipe, plan, batches), "bare": Bare(recipe, plan, batches)}
    if with_loader:
        contenders["loader"] = Core(recipe, plan)
    first = dict(contenders["bare"].model.named_parameters())
    same_init = all(torch.equal(p, first[n]) for n, p in contenders["core"].parts.model.named_parameters())
    for contender in contenders.values():
        contender.run(warmup)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    tokens: list[int] = []
    names = list(contenders)
    for r in range(repeats):
        window = batches[warmup + r * steps : warmup + (r + 1) * steps]
        tokens.append(count_tokens(window, probe_parts.pad_id))
        spent = dict.fromkeys(names, 0.0)
        for done in range(0, steps, chunk):  # each measurement is steps steps, timed in interleaved slices
            for name in names if (r + done // chunk) % 2 == 0 else names[::-1]:
                started = time.perf_counter()
                contenders[name].run(min(chunk, steps - done))
                spent[name] += time.perf_counter() - started
        for name in names:
            times[name].append(spent[name])
        print(
            f"repeat {r}: " + ", ".join(f"{n}/bare {spent['bare'] / spent[n]:.3f}" for n in names if n != "bare"),
            flush=True,
        )
    return {"times": times, "tokens": tokens, "same_init": same_init}


def summarise(result: dict, args, plan) -> dict:
    times, tokens = result["times"], result["tokens"]
    tps = {name: [tok / t for tok, t in zip(tokens, ts)] for name, ts in times.items()}
    ratios = {name: [a / b for a, b in zip(tps[name], tps["bare"])] for name in tps if name != "bare"}
    print(
        f"device {plan.device}, {args.repeats} repeats x {args.steps} steps in slices of {args.chunk} "
        f"(warmup {args.warmup}), "
        f"{statistics.median(tokens)} tokens/measurement, identical init: {result['same_init']}"
    )
    print(f"{'contender':<9} {'median tok/s':>13} {'median ms/step':>15} {'ratio vs bare (median)':>23}")
    for name in tps:
        ratio = statistics.median(ratios[name]) if name in ratios else 1.0
        ms = 1000 * statistics.median(times[name]) / args.steps
        print(f"{name:<9} {statistics.median(tps[name]):>13.0f} {ms:>15.2f} {ratio:>23.3f}")
    core_ratio = statistics.median(ratios["core"])
    print(
        f"core/bare tokens/s ratio {core_ratio:.3f} (target >= 0.95): {'OK' if core_ratio >= 0.95 else 'BELOW TARGET'}"
    )
    return {
        "benchmark": "loop_throughput",
        "device": plan.device,
        "repeats": args.repeats,
        "steps": args.steps,
        "chunk": args.chunk,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "identical_init": result["same_init"],
        "median_tokens_per_s": {n: round(statistics.median(v), 1) for n, v in tps.items()},
        "ratio_core_over_bare": round(core_ratio, 4),
        "ratios_core_over_bare": [round(x, 4) for x in ratios["core"]],
        **({"ratio_loader_over_bare": round(statistics.median(ratios["loader"]), 4)} if "loader" in ratios else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved measurements per contender")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per measurement")
    parser.add_argument("--chunk", type=int, default=10, help="steps per timed slice; contenders alternate slices")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per contender first")
    parser.add_argument("--backend", default="cpu", help="devices.backend of the recipe (default cpu)")
    parser.add_argument(
        "--with-loader",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time train_step fed by the DataLoader (batch_stream), for information",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override key=value")
    args = parser.parse_args()
    recipe = load_recipe(None, [f"devices.backend={args.backend}", *args.overrides])
    plan = plan_devices(recipe, probe_environment())[2]
    result = measure(
        recipe,
        plan,
        repeats=args.repeats,
        steps=args.steps,
        chunk=args.chunk,
        warmup=args.warmup,
        with_loader=args.with_loader,
    )
    print(json.dumps(summarise(result, args, plan)))


if __name__ == "__main__":
    main()
