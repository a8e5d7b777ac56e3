"""benchmarks/gpu_throughput.py runs on a CPU with its tiny config, every configuration but compile (whose CPU
compilation alone takes 35-70 s here; tests/unit/test_block_features.py compiles the blocks), so it cannot rot;
and its FLOP count matches the Llama it builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from support import ROOT

from benchmarks.gpu_throughput import CONFIGS, HORIZON, TINY, build_model, model_flops_per_token


def test_the_benchmark_runs_every_configuration_on_a_tiny_model():
    configs = [name for name in CONFIGS if name not in ("compile", "all")]
    command = [sys.executable, "benchmarks/gpu_throughput.py", "--tiny", "--seq", "32", "--steps", "2"]
    command += ["--warmup", "1", "--peak-tflops", "1", "--configs", *configs]
    # One thread: a width-32 model gains nothing from two, and loses much when the cores are shared.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.splitlines()[-1])
    assert list(summary["results"]) == configs
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in summary["results"].values())


def test_model_flops_count_every_parameter_a_token_passes_through():
    model = build_model(TINY, 16, "cpu")
    layer = model.decoder_layers()[0]
    matrices = sum(p.numel() for p in layer.parameters() if p.dim() == 2)
    passed = (TINY["num_hidden_layers"] - 1 + HORIZON) * matrices + HORIZON * model.lm.lm_head.weight.numel()
    attention = 12 * (TINY["num_hidden_layers"] - 1 + HORIZON) * TINY["hidden_size"] * 16
    assert model_flops_per_token(TINY, 16) == 6 * passed + attention
    assert torch.is_tensor(model(torch.ones(1, 16, dtype=torch.long)))
