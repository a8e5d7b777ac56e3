"""Tokens/s of self-speculative decoding (k = 2, 3, 4) against plain greedy decoding, with acceptance per head.

Two models of the default recipe, trained in-process (the core loop's train_step and evaluate, no Prefect, no
checkpoints):
  default  train.max_steps steps, as `wmtp train` trains it;
  plateau  the same recipe trained on, its eval loss measured every --eval-every steps, until it has not improved
           by --min-delta (relative) for --patience evaluations or --max-steps is reached; the best weights are kept.
Prompts: the held-out split's records up to their code (the problem and its tests), greedy, up to
--max-new-tokens new tokens (fewer where the prompt leaves less room in model.max_seq_len).
Each repeat decodes every prompt with plain greedy and with every k in turn (the order rotating from prompt to
prompt, so load from other processes falls on all alike); the figures are medians over --repeats of tokens/s and
of each k's ratio to greedy in the same repeat, prompt reads included. Every speculative output is checked against
greedy's, token for token. Decoding runs on --threads intra-op threads (default 1: a decoding step of a small model
is a string of small ops, which a second thread only slows). --weights DIR keeps the trained models for reruns.

Run: uv run python benchmarks/speculative.py [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from wmtp_core.data.records import Record, builtin_dataset_path, load_records, split_records
from wmtp_core.generation import SamplingSettings, generate, head_accuracy
from wmtp_core.models.build import build_model
from wmtp_core.models.tokenizer import ByteTokenizer
from wmtp_core.recipes import TINY_MODEL, load_recipe
from wmtp_core.run.plan import plan_devices
from wmtp_core.runtime.devices import probe_environment
from wmtp_core.training.loop import evaluate, train_step
from wmtp_core.training.parts import TrainState, batch_stream, build_run_parts

HEADS = (1, 2, 3, 4)


def prompt_of(record: Record) -> str:
    """The training text (format_example) up to the solution: what the model is asked to continue."""
    tests = "\n".join(record.test_list)
    return f'"""{record.text}\n{tests}\n"""\n'


def trained_model(name: str, recipe, plan, *, weights_dir: Path | None, **how) -> dict:
    """train_model's result, or the one saved under weights_dir by an earlier run with the same recipe."""
    if weights_dir is None:
        return train_model(recipe, plan, **how)
    weights, info = weights_dir / f"{name}.safetensors", weights_dir / f"{name}.json"
    key = {"recipe": recipe.model_dump(mode="json"), "how": how}
    if info.is_file() and json.loads(info.read_text())["key"] == key:
        model = build_model(recipe.model, ByteTokenizer(), with_value_head=False)
        model.load_state_dict(load_file(weights))
        print(f"  {name}: weights from {weights}", flush=True)
        return {"model": model.eval(), **json.loads(info.read_text())["training"]}
    trained = train_model(recipe, plan, **how)
    weights_dir.mkdir(parents=True, exist_ok=True)
    save_file(trained["model"].state_dict(), weights)
    training = {key: value for key, value in trained.items() if key != "model"}
    info.write_text(json.dumps({"key": key, "training": training}))
    return trained


def train_model(recipe, plan, *, steps: int, eval_every: int, patience: int, min_delta: float) -> dict:
    """Train up to `steps`; with patience, stop once the eval loss stalls and keep the best weights."""
    torch.manual_seed(recipe.seed)
    parts = build_run_parts(recipe, plan)
    state = TrainState()
    best = {"eval_loss": evaluate(parts, plan), "step": 0, "weights": None}
    curve, stalls, started = [(0, round(best["eval_loss"], 4))], 0, time.perf_counter()
    batches = batch_stream(parts, state)
    try:
        while state.step < steps and (patience == 0 or stalls < patience):
            for _ in range(min(eval_every, steps - state.step)):
                train_step(parts, batches, state=state, recipe=recipe, plan=plan)
            loss = evaluate(parts, plan)
            curve.append((state.step, round(loss, 4)))
            print(f"  step {state.step}: eval loss {loss:.4f}", flush=True)
            improved = loss < best["eval_loss"] * (1 - min_delta)
            stalls = 0 if improved else stalls + 1
            if loss < best["eval_loss"]:
                best = {"eval_loss": loss, "step": state.step, "weights": copy.deepcopy(parts.model.state_dict())}
    finally:
        batches.close()
    if best["weights"] is not None:
        parts.model.load_state_dict(best["weights"])
    return {
        "model": parts.model.eval(),
        "best_step": best["step"],
        "steps_trained": state.step,
        "eval_loss": round(best["eval_loss"], 4),
        "curve": curve,
        "train_seconds": round(time.perf_counter() - started, 1),
    }


def measure(model, prompts: list[str], *, repeats: int, max_new_tokens: int) -> dict:
    """Per repeat, every prompt decoded by greedy and each k in turn (the order rotating prompt by prompt), so load
    from other processes falls on all alike; a repeat's figure per k is its tokens over its seconds."""
    tokenizer, settings = ByteTokenizer(), SamplingSettings(max_new_tokens=max_new_tokens)
    generate(model, tokenizer, prompts[:2], settings, heads=max(HEADS))  # warm-up: first calls allocate
    tokens_per_s, ms_per_forward = {k: [] for k in HEADS}, {k: [] for k in HEADS}
    decode_tokens_per_s = {k: [] for k in HEADS}
    for r in range(repeats):
        totals = {k: {"tokens": 0, "seconds": 0.0, "forwards": 0, "prompts": 0, "prompt_seconds": 0.0} for k in HEADS}
        proposed, accepted = {k: [0] * (k - 1) for k in HEADS}, {k: [0] * (k - 1) for k in HEADS}
        outputs: dict[int, list] = {}
        for i, prompt in enumerate(prompts):
            for k in HEADS[i % len(HEADS) :] + HEADS[: i % len(HEADS)]:
                (generation,), stats = generate(model, tokenizer, [prompt], settings, heads=k)
                outputs.setdefault(k, []).append(generation.token_ids)
                totals[k]["tokens"] += stats.tokens
                totals[k]["seconds"] += stats.seconds
                totals[k]["forwards"] += stats.forward_passes
                totals[k]["prompts"] += stats.prompts
                totals[k]["prompt_seconds"] += stats.prompt_seconds
                proposed[k] = [a + b for a, b in zip(proposed[k], stats.drafts_proposed)]
                accepted[k] = [a + b for a, b in zip(accepted[k], stats.drafts_accepted)]
        for k in HEADS:
            tokens_per_s[k].append(totals[k]["tokens"] / totals[k]["seconds"])
            ms_per_forward[k].append(1000 * totals[k]["seconds"] / totals[k]["forwards"])
            t = totals[k]
            decode_tokens_per_s[k].append((t["tokens"] - t["prompts"]) / (t["seconds"] - t["prompt_seconds"]))
        print("  repeat", r, " ".join(f"k={k} {tokens_per_s[k][-1]:.0f} tok/s" for k in HEADS), flush=True)
    ratios = {k: [a / b for a, b in zip(tokens_per_s[k], tokens_per_s[1])] for k in HEADS}
    forward_costs = {k: [a / b for a, b in zip(ms_per_forward[k], ms_per_forward[1])] for k in HEADS}
    decode_ratios = {k: [a / b for a, b in zip(decode_tokens_per_s[k], decode_tokens_per_s[1])] for k in HEADS}
    return {
        str(k): {
            "tokens_per_s": round(statistics.median(tokens_per_s[k]), 1),
            "ratio_vs_greedy": round(statistics.median(ratios[k]), 3),
            "ratios": [round(x, 3) for x in ratios[k]],
            "decode_tokens_per_s": round(statistics.median(decode_tokens_per_s[k]), 1),
            "decode_ratio_vs_greedy": round(statistics.median(decode_ratios[k]), 3),
            "prompt_share_of_time": round(totals[k]["prompt_seconds"] / totals[k]["seconds"], 3),
            "acceptance_per_head": [round(a / p, 3) for a, p in zip(accepted[k], proposed[k])],
            "tokens_per_forward": round(totals[k]["tokens"] / totals[k]["forwards"], 3),
            "ms_per_forward": round(statistics.median(ms_per_forward[k]), 3),
            "forward_cost_vs_greedy": round(statistics.median(forward_costs[k]), 3),
            "tokens": totals[k]["tokens"],
            "equals_greedy": outputs[k] == outputs[1],
        }
        for k in HEADS
    }


def held_out_prompts(recipe, limit: int | None) -> tuple[list[Record], list[str]]:
    records = load_records(recipe.data.path or builtin_dataset_path())
    _, held_out = split_records(records, eval_fraction=recipe.data.eval_fraction, seed=recipe.seed)
    held_out = held_out[:limit] if limit else held_out
    return held_out, [prompt_of(r) for r in held_out]


def benchmark_model(name: str, trained: dict, prompts, held_out, recipe, args) -> dict:
    model = trained.pop("model")
    heads = head_accuracy(model, ByteTokenizer(), held_out, max_len=recipe.model.max_seq_len)
    print(
        f"{name}: best eval loss {trained['eval_loss']} at step {trained['best_step']}; head top-1 accuracy "
        + ", ".join(f"{h['top1_accuracy']:.3f}" for h in heads),
        flush=True,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        figures = measure(model, prompts, repeats=args.repeats, max_new_tokens=args.max_new_tokens)
    finally:
        torch.set_num_threads(threads)
    for k, f in figures.items():
        print(
            f"  k={k}: {f['tokens_per_s']:.0f} tok/s, x{f['ratio_vs_greedy']:.2f} vs greedy "
            f"(after the prompt read x{f['decode_ratio_vs_greedy']:.2f}; prompt reads {f['prompt_share_of_time']:.0%} "
            "of the time), "
            f"{f['tokens_per_forward']:.2f} tokens/forward, forward x{f['forward_cost_vs_greedy']:.2f}, "
            f"acceptance {f['acceptance_per_head']}, "
            f"equals greedy {f['equals_greedy']}",
            flush=True,
        )
    head_figures = [{key: round(v, 4) if isinstance(v, float) else v for key, v in h.items()} for h in heads]
    return {**trained, "head_accuracy": head_figures, "decoding": figures}


def run(args) -> dict:
    overrides = [*TINY_MODEL, "model.horizon=4", "train.max_steps=20", "train.warmup_steps=2"] if args.quick else []
    recipe = load_recipe(None, ["devices.backend=cpu", *overrides, *args.overrides])
    plan = plan_devices(recipe, probe_environment())[2]
    held_out, prompts = held_out_prompts(recipe, args.prompts)
    if args.quick:
        prompts = [p[-40:] for p in prompts]  # the tiny model's 64 positions
    steps = recipe.train.max_steps
    print(f"default: {steps} steps", flush=True)
    default = trained_model(
        "default", recipe, plan, weights_dir=args.weights, steps=steps, eval_every=steps, patience=0, min_delta=0.0
    )
    plateau_recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_steps": args.max_steps})})
    print(f"plateau: up to {args.max_steps} steps, eval every {args.eval_every}, patience {args.patience}", flush=True)
    plateau = trained_model(
        "plateau",
        plateau_recipe,
        plan,
        weights_dir=args.weights,
        steps=args.max_steps,
        eval_every=args.eval_every,
        patience=args.patience,
        min_delta=args.min_delta,
    )
    results = {"default": benchmark_model("default", default, prompts, held_out, recipe, args)}
    results["plateau"] = benchmark_model("plateau", plateau, prompts, held_out, recipe, args)
    plateau_decoding = results["plateau"]["decoding"]
    best = max((k for k in HEADS if k > 1), key=lambda k: plateau_decoding[str(k)]["ratio_vs_greedy"])
    best_ratio = plateau_decoding[str(best)]["ratio_vs_greedy"]
    best_decode = max((k for k in HEADS if k > 1), key=lambda k: plateau_decoding[str(k)]["decode_ratio_vs_greedy"])
    best_decode_ratio = plateau_decoding[str(best_decode)]["decode_ratio_vs_greedy"]
    for what, k, ratio in (
        ("whole calls", best, best_ratio),
        ("after the prompt reads", best_decode, best_decode_ratio),
    ):
        verdict = "OK" if ratio >= 1.5 else "BELOW TARGET"
        print(f"plateau model, {what}: best k={k}, x{ratio:.2f} vs greedy (target >= 1.5): {verdict}")
    return {
        "benchmark": "speculative",
        "quick": args.quick,
        "threads": args.threads,
        "prompts": len(prompts),
        "repeats": args.repeats,
        "best_k": best,
        "best_ratio": best_ratio,
        "best_decode_k": best_decode,
        "best_decode_ratio": best_decode_ratio,
        **results,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved measurements per decoding mode")
    parser.add_argument("--max-steps", type=int, default=4000, help="plateau model: train.max_steps (its schedule)")
    parser.add_argument("--eval-every", type=int, default=200, help="plateau model: steps between eval losses")
    parser.add_argument("--patience", type=int, default=3, help="plateau model: evals without improvement to stop")
    parser.add_argument("--min-delta", type=float, default=0.005, help="relative eval-loss drop that counts")
    parser.add_argument("--prompts", type=int, default=None, help="held-out prompts to decode (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads while decoding")
    parser.add_argument("--weights", type=Path, default=None, help="keep trained weights here and reuse them")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps and prompts: a smoke run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.max_steps, args.eval_every, args.patience = 1, 30, 10, 2
        args.prompts, args.max_new_tokens = args.prompts or 4, 16
    return args


def main(argv: list[str] | None = None) -> dict:
    summary = run(parse_args(argv))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
