"""Step time of each WMTP algorithm relative to baseline-mtp on the same batches, and what the extra cost is made of.

Measured side by side in one process on the default recipe (CPU here): for each algorithm a full optimizer step
(`wmtp_core.training.loop.train_step`) over the same pre-collated batches; the weight computation alone (the
`wmtp_core.algorithms.weights` calls of each algorithm on tensors of a real step); and one reference
forward (rho1's extra model call). Contenders are interleaved, each figure is the median over --repeats of
--steps steps.
Targets: weight computation <= 10% of a baseline step; rho1's extra cost close to one reference forward.

Run: uv run python benchmarks/algorithm_step_time.py [--repeats 5 --steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from wmtp_core.algorithms.losses import head_cross_entropy
from wmtp_core.algorithms.objective import MicroBatch
from wmtp_core.algorithms.weights import (
    critic_head_scores,
    gae_returns,
    normalize_weights,
    reference_next_token_ce,
    rho1_excess,
    spread_rewards,
)
from wmtp_core.models.tokenizer import ByteTokenizer
from wmtp_core.models.transformer import MTPTransformer
from wmtp_core.recipes import load_recipe
from wmtp_core.run.plan import plan_devices
from wmtp_core.runtime.devices import probe_environment
from wmtp_core.training.loop import train_step
from wmtp_core.training.parts import TrainState, batch_stream, build_run_parts

ALGORITHMS = ("baseline-mtp", "critic-wmtp", "rho1-wmtp")


def build(algorithm: str, steps: int):
    recipe = load_recipe(None, [f"train.algorithm={algorithm}"])
    plan = plan_devices(recipe, probe_environment())[2]
    parts = build_run_parts(recipe, plan)
    if algorithm == "rho1-wmtp":
        # Timing only: an untrained reference of the same shape costs the same forward as a trained one.
        reference = MTPTransformer(recipe.model, vocab_size=ByteTokenizer().vocab_size).eval().requires_grad_(False)
        parts.reference = reference
    stream = batch_stream(parts, TrainState())
    batches = [next(stream) for _ in range(steps)]
    stream.close()
    return recipe, plan, parts, batches


def time_steps(recipe, plan, parts, batches) -> float:
    """Seconds per optimizer step over the given batches."""
    state = TrainState()
    iterator = iter(batches)
    start = time.perf_counter()
    for _ in batches:
        train_step(parts, iterator, state=state, recipe=recipe, plan=plan)
    return (time.perf_counter() - start) / len(batches)


def time_weights(recipe, parts, batches) -> dict[str, float]:
    """Seconds per micro-batch of each algorithm's weight computation alone, on tensors from a real forward."""
    mb = MicroBatch.from_batch(batches[0], device="cpu", pad_id=parts.pad_id)
    with torch.no_grad():
        h_BTD = parts.model.trunk_hidden(mb.tokens_BT)
        ce_BTK = head_cross_entropy(parts.model.heads_logits(h_BTD), mb.labels_BTK)
        ref_logits_BTV = parts.model(mb.tokens_BT)[:, :, 0]
        values_BT = torch.randn(mb.valid_BT.shape)
    loss, critic = recipe.loss, recipe.critic
    norm = dict(mode=loss.weight_norm, temperature=loss.weight_temperature, max_weight=loss.max_weight)

    def rho1():
        excess = rho1_excess(
            ce_BTK, reference_next_token_ce(ref_logits_BTV, mb.labels_BTK), mb.mask_BTK, min_ce_diff=0.01
        )
        normalize_weights(excess, mb.mask_BTK, **norm)

    def critic_weights():
        scores = critic_head_scores(
            values_BT, mb.valid_BT, discount_lambda=critic.discount_lambda, horizon=ce_BTK.shape[-1]
        )
        gae_returns(values_BT, spread_rewards(mb.rewards_B, mb.valid_BT), mb.valid_BT, gamma=0.99, gae_lambda=0.95)
        normalize_weights(scores, mb.mask_BTK, **norm)

    def reference_forward():
        with torch.no_grad():
            parts.model.eval()(mb.tokens_BT)
        parts.model.train()

    return {
        name: _per_call(fn)
        for name, fn in {
            "rho1_weights": rho1,
            "critic_weights": critic_weights,
            "reference_forward": reference_forward,
        }.items()
    }


def _per_call(fn, calls: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    setups = {algorithm: build(algorithm, args.steps) for algorithm in ALGORITHMS}
    for setup in setups.values():
        time_steps(*setup[:3], setup[3][:2])  # warm-up
    step_times = {algorithm: [] for algorithm in ALGORITHMS}
    for repeat in range(args.repeats):
        order = ALGORITHMS if repeat % 2 == 0 else tuple(reversed(ALGORITHMS))
        for algorithm in order:
            step_times[algorithm].append(time_steps(*setups[algorithm]))
    median = {algorithm: statistics.median(times) for algorithm, times in step_times.items()}
    recipe, _, parts, batches = setups["baseline-mtp"]
    parts_times = {
        name: statistics.median(_samples)
        for name, _samples in _repeat(lambda: time_weights(recipe, parts, batches), args.repeats).items()
    }
    report(median, parts_times, args)


def _repeat(measure, repeats: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}
    for result in (measure() for _ in range(repeats)):
        for name, value in result.items():
            samples.setdefault(name, []).append(value)
    return samples


def report(median: dict[str, float], parts_times: dict[str, float], args) -> None:
    base = median["baseline-mtp"]
    figures = {f"{a}_step_vs_baseline": median[a] / base for a in ALGORITHMS}
    figures["rho1_weights_share_of_baseline_step"] = parts_times["rho1_weights"] / base
    figures["critic_weights_share_of_baseline_step"] = parts_times["critic_weights"] / base
    figures["rho1_extra_vs_reference_forward"] = (median["rho1-wmtp"] - base) / parts_times["reference_forward"]
    print(f"{'figure':45} value   (median of {args.repeats} repeats x {args.steps} steps)")
    for name, value in figures.items():
        print(f"{name:45} {value:.3f}")
    print(json.dumps({k: round(v, 4) for k, v in figures.items()} | {"repeats": args.repeats, "steps": args.steps}))


if __name__ == "__main__":
    main()
