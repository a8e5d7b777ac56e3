"""An hf trunk (tiny GPT-2 with tied embedding and unembedding, built locally) sharded by FSDP2 per GPT2Block on two
CPU processes: it trains, its full checkpoint's hf/ export loads with transformers, and it resumes on one process
to the same weights as a one-process run with the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.hf_models import HF_OVERRIDES
from support.torchrun import torchrun_worker
from support.training import plan_and_train
from transformers import AutoModelForCausalLM

from wmtp_core.models.hf import HF_EXPORT_DIR, load_hf_mtp_model
from wmtp_core.recipes import load_recipe

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # every torchrun job takes 5-30 s here


def test_fsdp_hf_trunk_exports_and_resumes_on_one_process_to_the_same_weights(tmp_path, hf_model_dirs):
    gpt2 = hf_model_dirs["gpt2"]
    common = [*HF_OVERRIDES, f"model.path={gpt2}", "train.max_steps=6", "train.keep_last=10", "train.lr_decay_steps=6"]
    two_processes = load_recipe(
        None,
        [
            *common,
            "train.max_steps=4",
            "devices.strategy=fsdp",
            "devices.nproc_per_node=2",
            "devices.timeout_s=60",
            "data.batch_size=2",
        ],
    )
    out, outcome = torchrun_worker(two_processes, tmp_path / "fsdp")
    assert "Warning" not in out.stderr, out.stderr[-3000:]
    result = outcome["result"]
    checkpoint = Path(result["latest_checkpoint"])
    trained = load_hf_mtp_model(str(gpt2), horizon=3, max_seq_len=64).eval()
    trained.load_state_dict(load_file(checkpoint / "model.safetensors"))
    tokens_BT = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported_BTV = (
            AutoModelForCausalLM.from_pretrained(checkpoint / HF_EXPORT_DIR).eval()(input_ids=tokens_BT).logits
        )
        torch.testing.assert_close(exported_BTV, trained(tokens_BT)[:, :, 0])

    one_process = load_recipe(None, [*common, "data.batch_size=2", "train.grad_accumulation_steps=2"])
    resumed = plan_and_train(one_process, tmp_path / "fsdp", resume_from=checkpoint)
    straight = plan_and_train(one_process, tmp_path / "straight")
    assert resumed.resumed_from_step == 4 and resumed.steps == straight.steps == 6
    expected = load_file(Path(straight.latest_checkpoint) / "model.safetensors")
    actual = load_file(Path(resumed.latest_checkpoint) / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5)
