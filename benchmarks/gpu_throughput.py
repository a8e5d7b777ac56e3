"""Tokens/s and MFU of a Llama-shaped model of about 1B parameters trained with 4 MTP heads, with each speed and
memory feature on and off.

The model is TinyLlama's shape built from a config (nothing is downloaded): 22 decoder layers, width 2048, MLP 5632,
32 attention heads over 4 key-value heads, a 32000-token vocabulary, 1.1B parameters, plus 3 extra heads (copies of
the last layer) as `model.source=hf` builds them. One process, bf16 autocast over fp32 weights (the device plan of
`devices.precision=bf16`), baseline-mtp: a step is wmtp_core.algorithms.objective.algorithm_loss, backward, gradient
clipping and AdamW, as the training loop takes it. Configurations: everything off, each feature alone, everything
on. FSDP2's mixed precision needs a process group: the script makes a one-process one (a sharded world of one).

MFU is model FLOPs per second over the device's dense bf16 peak (a table of GPUs, or --peak-tflops). Model FLOPs
per token: 6 x the parameters a token's computation passes through (trunk layers, every head's layer, and the
unembedding once per head; not the embedding lookup) + 12 x layers passed x width x sequence length (attention,
PaLM's formula). Recomputation (sequential heads' second forward, checkpointed blocks) is not counted, as MFU
conventionally does not count it.

--tiny runs a 2-layer width-32 Llama on whatever device there is, so a test can run the whole script on a CPU.
Run: uv run python benchmarks/gpu_throughput.py [--steps 10 --warmup 3 --batch 2 --seq 2048] (one GPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.distributed as dist

from wmtp_core.algorithms.objective import MicroBatch, Objective, algorithm_loss, sequential_heads
from wmtp_core.data.sequences import MTPCollator
from wmtp_core.models.hf import HFMTPModel
from wmtp_core.recipes import load_recipe
from wmtp_core.run.plan import plan_devices
from wmtp_core.runtime.devices import probe_environment
from wmtp_core.runtime.distributed import SINGLE, shard_fully
from wmtp_core.training.optim import build_optimizer
from wmtp_core.training.parallelize import parallelize, sharded_param_dtype

HORIZON = 4
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32)
LLAMA_1B |= dict(num_key_value_heads=4, vocab_size=32000)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY |= dict(num_key_value_heads=2, vocab_size=320)
FEATURES = ("sequential_heads", "checkpointing", "compile", "fsdp_bf16", "fused_adamw")
CONFIGS = {"plain": (), **{name: (name,) for name in FEATURES}, "all": FEATURES}
BF16_PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "H800": 989, "GH200": 989, "B200": 2250}
BF16_PEAK_TFLOPS |= {"A100": 312, "A800": 312, "L40S": 362, "L4": 121, "A10G": 125}
"""Dense bf16 tensor-core peaks from the vendors' data sheets (SXM unless named); the first name found wins."""


def build_model(shape: dict, seq: int, device: str) -> HFMTPModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=seq, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        lm = LlamaForCausalLM(config)
    last = lm.model.layers[-1]
    heads = torch.nn.ModuleList(copy.deepcopy(last) for _ in range(HORIZON - 1))
    return HFMTPModel(lm, extra_heads=heads, with_value_head=False, max_seq_len=seq)


def model_flops_per_token(shape: dict, seq: int) -> float:
    """6 x parameters passed + 12 x layers passed x width x sequence length (see the module docstring)."""
    d, mlp, heads, kv = (
        shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    )
    layer = 2 * d * d + 2 * d * (d * kv // heads) + 3 * d * mlp  # q, o; k, v (grouped); gate, up, down
    layers_passed = shape["num_hidden_layers"] - 1 + HORIZON  # the trunk, then each head's own layer
    return 6 * (layers_passed * layer + HORIZON * d * shape["vocab_size"]) + 12 * layers_passed * d * seq


def recipe_for(features: tuple[str, ...], device: str):
    overrides = [f"devices.backend={device}", "devices.precision=bf16", f"model.horizon={HORIZON}"]
    overrides += [f"loss.sequential_heads={'on' if 'sequential_heads' in features else 'off'}"]
    overrides += [f"train.activation_checkpointing={'blocks' if 'checkpointing' in features else 'none'}"]
    overrides += [f"train.compile={'compile' in features}", "train.lr=1e-4", "train.warmup_steps=0"]
    overrides += ["devices.strategy=fsdp" if "fsdp_bf16" in features else "devices.strategy=single"]
    return load_recipe(None, overrides)


def measure(features: tuple[str, ...], args, device: str) -> dict:
    """Tokens/s (median over timed steps), MFU and peak memory of one configuration, on a fresh model."""
    recipe = recipe_for(features, device)
    plan = plan_devices(recipe, probe_environment())[2]
    strategy = recipe.devices.strategy
    sequential = sequential_heads(recipe.loss, plan, horizon=recipe.model.horizon)
    model = build_model(args.shape, args.seq, device)
    model = parallelize(model, recipe.train, plan, SINGLE, strategy=strategy, sequential=sequential)
    if "fsdp_bf16" in features:  # parallelize shards only under torchrun; a world of one here
        model = shard_fully(
            model, model.transformer_blocks(), SINGLE, device, param_dtype=sharded_param_dtype(strategy, plan)
        )
    optimizer = build_optimizer(model, recipe.train, fused="fused_adamw" in features)
    torch.manual_seed(1)
    items = [
        {"tokens": torch.randint(3, args.shape["vocab_size"], (args.seq,)), "reward": 1.0} for _ in range(args.batch)
    ]
    mb = MicroBatch.from_batch(MTPCollator(HORIZON, pad_id=0)(items), device=device, pad_id=0)
    times = [_timed_step(model, optimizer, mb, recipe, plan) for _ in range(args.warmup + args.steps)][args.warmup :]
    tokens_per_s = args.batch * args.seq / statistics.median(times)
    peak = args.peak_tflops or _device_peak_tflops(device)
    mfu = tokens_per_s * model_flops_per_token(args.shape, args.seq) / (peak * 1e12) if peak else None
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"tokens_per_s": tokens_per_s, "mfu": mfu, "peak_memory_gib": memory, "step_s": statistics.median(times)}


def _timed_step(model, optimizer, mb, recipe, plan) -> float:
    _synchronize(plan.device)
    start = time.perf_counter()
    loss, _ = algorithm_loss(model, mb, Objective.of(recipe), plan=plan, reference=None)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _synchronize(plan.device)
    return time.perf_counter() - start


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _device_peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer width-32 Llama (CPU tests)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    args = parser.parse_args()
    args.shape = TINY if args.tiny else LLAMA_1B
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(0)
    # FSDP2 needs a process group and its device mesh: one process, an in-memory store.
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    results = {}
    for name in args.configs:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        torch._dynamo.reset()
        results[name] = measure(CONFIGS[name], args, device)
        print(f"{name:18} {_row(results[name])}", flush=True)
    dist.destroy_process_group()
    print(
        json.dumps(
            {
                "device": _device_name(device),
                "shape": "tiny" if args.tiny else "llama-1b",
                **vars_of(args),
                "results": results,
            }
        )
    )


def _row(result: dict) -> str:
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
    memory = f"{result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] is not None else "n/a"
    return f"{result['tokens_per_s']:10.0f} tokens/s  MFU {mfu:>6}  peak {memory}"


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def vars_of(args) -> dict:
    return {key: value for key, value in vars(args).items() if key in ("steps", "warmup", "batch", "seq")}


if __name__ == "__main__":
    main()
