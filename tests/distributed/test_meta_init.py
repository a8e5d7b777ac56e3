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


def _build_all(recipes: dict[str, object], root, *, processes: int) -> dict[str, dict]:
    """Every recipe's initial model, built by one launch of the script (one process, or two under torchrun): the
    launch's start-up (torch, transformers, the process group) is paid once for all the models, not once each."""
    root.mkdir()
    arguments = []
    for name, recipe in recipes.items():
        (root / f"{name}.yaml").write_text(recipe_to_yaml(recipe))
        arguments += [str(root / f"{name}.yaml"), str(root / f"{name}.pt")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    launcher += ["--log-dir", str(root / "torchrun-logs")]  # not a torchelastic_* directory left in /tmp
    command = (launcher if processes > 1 else [sys.executable]) + [str(SCRIPT), *arguments]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return {name: torch.load(root / f"{name}.pt", weights_only=True) for name in recipes}


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


MODELS = ["builtin-critic", "hf-llama", "hf-gpt2"]


@pytest.fixture(scope="module")
def built_elsewhere(hf_model_dirs, tmp_path_factory) -> dict[str, dict[str, dict]]:
    """{"one": {model: built by a fresh process}, "two": {model: built by two processes under torchrun (FSDP2 on
    the meta device)}} for every model: each launch builds the models in turn, seeding first as train() does. Made on
    first use and shared by the module's tests (each checks its own model)."""
    models = _models(hf_model_dirs)
    root = tmp_path_factory.mktemp("meta-init")
    return {
        "one": _build_all({m: load_recipe(None, models[m]) for m in MODELS}, root / "one", processes=1),
        "two": _build_all({m: load_recipe(None, [*models[m], *TWO_FSDP]) for m in MODELS}, root / "two", processes=2),
    }


@pytest.mark.parametrize("model", MODELS)
def test_meta_initialisation_gives_bitwise_the_weights_every_rank_built_before(hf_model_dirs, built_elsewhere, model):
    overrides = _models(hf_model_dirs)[model]
    today = initial_model(load_recipe(None, overrides), SINGLE)  # the full model, built in this process
    one, two = built_elsewhere["one"][model], built_elsewhere["two"][model]
    for built in (one, two):
        _assert_bitwise_equal(today["weights"], built["weights"])
        for rank in built["per_rank"]:
            _assert_bitwise_equal(today["buffers"], rank["buffers"])
            assert torch.equal(today["rng"], rank["rng"])
    assert len(two["per_rank"]) == 2
