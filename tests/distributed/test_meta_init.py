"""Meta-device initialisation (FSDP2 under torchrun): every rank builds the model on the meta device and shards it,
rank 0 builds the full initial weights and broadcasts them. The result is bitwise what every rank building the full
model (one process, as before) gives: weights, buffers (rotary frequencies included) and the random generator's
state after building, on every rank."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from support import ROOT
from support.hf_models import HF_OVERRIDES
from support.initial_weights import initial_model
from support.recipes import TINY_OVERRIDES

from wmtp_core.recipes import load_recipe, recipe_to_yaml
from wmtp_core.runtime.distributed import SINGLE

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # each torchrun job takes 10-20 s here
SCRIPT = ROOT / "tests" / "support" / "initial_weights.py"
TWO_FSDP = ["devices.strategy=fsdp", "devices.nproc_per_node=2", "devices.timeout_s=60"]


def _built_by(recipe, tmp_path, *, processes: int) -> dict:
    tmp_path.mkdir()
    (tmp_path / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = (launcher if processes > 1 else [sys.executable]) + [str(SCRIPT), str(tmp_path / "recipe.yaml")]
    out = subprocess.run([*command, str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return torch.load(tmp_path / "out.pt", weights_only=True)


def _assert_bitwise_equal(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert different == [], f"not bitwise equal: {different[:5]}"


def _models(hf_model_dirs):
    return {
        "builtin-critic": [*TINY_OVERRIDES, "train.algorithm=critic-wmtp"],  # a value head too
        "hf-llama": [*HF_OVERRIDES, f"model.path={hf_model_dirs['llama']}"],  # rotary buffers
        "hf-gpt2": [*HF_OVERRIDES, f"model.path={hf_model_dirs['gpt2']}"],  # tied embedding and unembedding
    }


@pytest.mark.parametrize("model", ["builtin-critic", "hf-llama", "hf-gpt2"])
def test_meta_initialisation_gives_bitwise_the_weights_every_rank_built_before(tmp_path, hf_model_dirs, model):
    overrides = _models(hf_model_dirs)[model]
    today = initial_model(load_recipe(None, overrides), SINGLE)  # the full model, built in this process
    one = _built_by(load_recipe(None, overrides), tmp_path / "one", processes=1)
    two = _built_by(load_recipe(None, [*overrides, *TWO_FSDP]), tmp_path / "two", processes=2)
    for built in (one, two):
        _assert_bitwise_equal(today["weights"], built["weights"])
        for rank in built["per_rank"]:
            _assert_bitwise_equal(today["buffers"], rank["buffers"])
            assert torch.equal(today["rng"], rank["rng"])
    assert len(two["per_rank"]) == 2
