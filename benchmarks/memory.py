"""Peak resident memory of one training step, side by side: sequential vs joint heads (horizon 4, a 32k vocabulary)
and activation checkpointing on vs off (2048-token sequences), with each contender's step time.

Each contender runs in a fresh process (this script with --child NAME). It builds the built-in model as the recipe
says (wmtp_core.training.parallelize applies the features), AdamW, and one full-length micro-batch of random
tokens, then takes two untimed steps (AdamW's state exists after the first). It hands freed memory back to the OS
(malloc_trim), resets the kernel's peak-RSS counter (VmHWM, through /proc/self/clear_refs) and takes --steps timed
steps (wmtp_core.algorithms.objective.algorithm_loss, backward, optimizer step). The step's peak is VmHWM minus
the RSS just before them: what a step adds on top of weights and optimizer state (activations, logits, gradients).
glibc serves every allocation above 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves RSS at
once and the figure is live memory, not the allocator's cache. The pairs run interleaved --repeats times (order
reversed every other repeat); figures are medians. Linux only (procfs).

Targets: sequential/joint step peak <= 0.5x; checkpointed/full <= 0.6x.
Run: uv run python benchmarks/memory.py [--repeats 3 --steps 3]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

WIDE_VOCAB = ["model.horizon=4", "model.d_model=256", "model.num_heads=4", "model.num_layers=2"]
LONG_SEQUENCE = ["model.horizon=2", "model.d_model=256", "model.num_heads=4", "model.num_layers=8"]
CONTENDERS = {
    # name: (recipe overrides, vocabulary, batch, sequence length)
    "joint heads": ([*WIDE_VOCAB, "loss.sequential_heads=off"], 32000, 2, 256),
    "sequential heads": ([*WIDE_VOCAB, "loss.sequential_heads=on"], 32000, 2, 256),
    "all activations": ([*LONG_SEQUENCE, "train.activation_checkpointing=none"], 260, 2, 2048),
    "checkpointed blocks": ([*LONG_SEQUENCE, "train.activation_checkpointing=blocks"], 260, 2, 2048),
}
PAIRS = [("joint heads", "sequential heads", 0.5), ("all activations", "checkpointed blocks", 0.6)]
"""(baseline, contender, target of contender/baseline step peak)."""


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure(name: str, steps: int) -> dict:
    """In the child: the step peak over the RSS before the timed steps, and the median step time."""
    import torch

    from wmtp_core.algorithms.objective import MicroBatch, Objective, algorithm_loss, sequential_heads
    from wmtp_core.data.sequences import MTPCollator
    from wmtp_core.models.transformer import MTPTransformer
    from wmtp_core.recipes import load_recipe
    from wmtp_core.run.plan import plan_devices
    from wmtp_core.runtime.devices import probe_environment
    from wmtp_core.runtime.distributed import SINGLE
    from wmtp_core.training.optim import build_optimizer
    from wmtp_core.training.parallelize import parallelize

    overrides, vocab, batch, length = CONTENDERS[name]
    recipe = load_recipe(None, [*overrides, f"model.max_seq_len={length}", "devices.backend=cpu"])
    plan = plan_devices(recipe, probe_environment())[2]
    torch.manual_seed(0)
    sequential = sequential_heads(recipe.loss, plan, horizon=recipe.model.horizon)
    model = MTPTransformer(recipe.model, vocab_size=vocab)
    model = parallelize(model, recipe.train, plan, SINGLE, strategy=recipe.devices.strategy, sequential=sequential)
    optimizer = build_optimizer(model, recipe.train)
    tokens = [{"tokens": torch.randint(3, vocab, (length,)), "reward": 1.0} for _ in range(batch)]
    mb = MicroBatch.from_batch(MTPCollator(recipe.model.horizon, pad_id=0)(tokens), device="cpu", pad_id=0)

    def step() -> None:
        loss, _ = algorithm_loss(model, mb, Objective.of(recipe), plan=plan, reference=None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(), step()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM")
    return {
        "rss_before_mib": before / 1024,
        "step_peak_mib": (peak - before) / 1024,
        "step_s": statistics.median(times),
    }


def run_child(name: str, steps: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, __file__, "--child", name, "--steps", str(steps)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps)))
        return
    samples: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    for repeat in range(args.repeats):
        for baseline, contender, _ in PAIRS:
            for name in (baseline, contender) if repeat % 2 == 0 else (contender, baseline):
                samples[name].append(run_child(name, args.steps))
    report(samples, args)


def report(samples: dict[str, list[dict]], args) -> None:
    median = {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]} for name, runs in samples.items()}
    print(f"{'contender':22} {'step peak MiB':>14} {'RSS before MiB':>15} {'step s':>8}")
    for name, m in median.items():
        print(f"{name:22} {m['step_peak_mib']:14.1f} {m['rss_before_mib']:15.1f} {m['step_s']:8.3f}")
    figures = {}
    for baseline, contender, target in PAIRS:
        memory = median[contender]["step_peak_mib"] / median[baseline]["step_peak_mib"]
        time_ratio = median[contender]["step_s"] / median[baseline]["step_s"]
        verdict = "meets" if memory <= target else "MISSES"
        print(
            f"{contender} / {baseline}: step peak {memory:.2f}x ({verdict} <= {target}x), step time {time_ratio:.2f}x"
        )
        figures[f"{contender} memory"], figures[f"{contender} time"] = round(memory, 3), round(time_ratio, 3)
    print(json.dumps(figures | {"repeats": args.repeats, "steps": args.steps}))


if __name__ == "__main__":
    main()
