"""The final model a run hands over (MLflow's final_model/): written from the newest checkpoint of either format
and either model source, it loads back as the trained model, every head included; so does a checkpoint itself
(load_checkpoint_model, what generation and evaluation read)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.checkpoints import full_model_state
from support.hf_models import HF_OVERRIDES
from support.recipes import TINY_OVERRIDES
from support.training import plan_and_train
from transformers import AutoModelForCausalLM

from wmtp_core.checkpoint.final_model import load_checkpoint_model, load_final_model, write_final_model
from wmtp_core.checkpoint.manifest import FINAL_MODEL_CONFIG
from wmtp_core.checkpoint.storage import MODEL_FILE
from wmtp_core.models.hf import load_hf_mtp_model
from wmtp_core.models.transformer import MTPTransformer
from wmtp_core.recipes import load_recipe


def _train(overrides: list[str], run_dir: Path) -> Path:
    recipe = load_recipe(None, [*overrides, "train.max_steps=2"])
    return Path(plan_and_train(recipe, run_dir).latest_checkpoint)


def _written(checkpoint: Path, out: Path) -> Path:
    out.mkdir()
    write_final_model(checkpoint, out)
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        ["checkpoint.format=full", "train.algorithm=critic-wmtp", "critic.pretrain_steps=1"],
        ["checkpoint.format=sharded", "train.algorithm=baseline-mtp"],
    ],
    ids=["full-critic", "sharded"],
)
def test_builtin_final_model_loads_with_the_trained_weights(tmp_path, overrides):
    checkpoint = _train([*TINY_OVERRIDES, *overrides], tmp_path / "run")
    out = _written(checkpoint, tmp_path / "final")
    assert sorted(p.name for p in out.iterdir()) == sorted([FINAL_MODEL_CONFIG, MODEL_FILE])
    model = load_final_model(out)
    assert isinstance(model, MTPTransformer) and not model.training
    trained = full_model_state(checkpoint)
    assert model.state_dict().keys() == trained.keys()
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in trained.items())
    assert any(name.startswith("value_head.") for name in trained) == ("train.algorithm=critic-wmtp" in overrides)
    from_checkpoint, tokenizer = load_checkpoint_model(checkpoint)
    assert not from_checkpoint.training and tokenizer.vocab_size == from_checkpoint.unembedding.out_features
    assert all(torch.equal(from_checkpoint.state_dict()[name], tensor) for name, tensor in trained.items())


@pytest.mark.parametrize(("kind", "checkpoint_format"), [("gpt2", "full"), ("llama", "sharded")])
def test_hf_final_model_is_a_pretrained_directory_that_predicts_as_the_trained_model(
    tmp_path, hf_model_dirs, kind, checkpoint_format
):
    original = hf_model_dirs[kind]
    checkpoint = _train(
        [*HF_OVERRIDES, f"model.path={original}", f"checkpoint.format={checkpoint_format}"], tmp_path / "run"
    )
    out = _written(checkpoint, tmp_path / "final")
    trained = load_hf_mtp_model(str(original), horizon=3, max_seq_len=64).eval()
    trained.load_state_dict(full_model_state(checkpoint))
    tokens_BT = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_BTKV = trained(tokens_BT)
        torch.testing.assert_close(load_final_model(out)(tokens_BT), expected_BTKV)
        from_checkpoint, tokenizer = load_checkpoint_model(checkpoint)
        torch.testing.assert_close(from_checkpoint(tokens_BT), expected_BTKV)
        assert tokenizer.vocab_size == expected_BTKV.shape[-1]
        next_token = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(next_token(input_ids=tokens_BT).logits, expected_BTKV[:, :, 0])
        untrained = AutoModelForCausalLM.from_pretrained(original).eval()
        assert not torch.allclose(untrained(input_ids=tokens_BT).logits, expected_BTKV[:, :, 0])


def test_a_checkpoint_that_fails_verification_writes_no_final_model(tmp_path):
    checkpoint = _train(TINY_OVERRIDES, tmp_path / "run")
    (checkpoint / MODEL_FILE).write_bytes(b"torn")
    with pytest.raises(Exception, match="does not match its manifest|size"):
        _written(checkpoint, tmp_path / "final")
    assert list((tmp_path / "final").iterdir()) == []
