"""Hugging Face causal LMs as the trunk (tiny Llama and GPT-2 built locally from a config): Meta-style heads,
the tokenizer adapter, the reference's tokenizer check, FSDP units and the save_pretrained export."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from support.hf_models import HF_OVERRIDES, MAX_POSITIONS
from support.training import device_plan, plan_and_train
from transformers import AutoModelForCausalLM

from wmtp_core.algorithms.reference import load_reference
from wmtp_core.checkpoint.manifest import CheckpointError, verify_checkpoint
from wmtp_core.data.records import builtin_dataset_path, load_records
from wmtp_core.data.sequences import MTPCollator, TokenSequences
from wmtp_core.models.hf import (
    HF_EXPORT_DIR,
    MTP_HEADS_FILE,
    export_pretrained,
    load_hf_mtp_model,
)
from wmtp_core.models.hf_tokenizer import load_hf_tokenizer
from wmtp_core.models.tokenizer import ByteTokenizer, check_tokenizers_agree
from wmtp_core.recipes import load_recipe


def _tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_head_0_is_the_causal_lm_own_next_token_prediction(hf_model_dirs, kind):
    model = load_hf_mtp_model(str(hf_model_dirs[kind]), horizon=3, max_seq_len=64).eval()
    lm = AutoModelForCausalLM.from_pretrained(hf_model_dirs[kind]).eval()
    with torch.no_grad():
        logits_BTKV = model(_tokens())
        expected_BTV = lm(input_ids=_tokens()).logits
    assert logits_BTKV.shape == (2, 12, 3, lm.config.vocab_size)
    torch.testing.assert_close(logits_BTKV[:, :, 0], expected_BTV)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_extra_heads_start_as_copies_of_the_last_layer_and_then_predict_on_their_own(hf_model_dirs, kind):
    model = load_hf_mtp_model(str(hf_model_dirs[kind]), horizon=2, max_seq_len=64).eval()
    with torch.no_grad():
        before_BTKV = model(_tokens())
        torch.testing.assert_close(before_BTKV[:, :, 1], before_BTKV[:, :, 0])
        for param in model.extra_heads.parameters():
            param.add_(0.05 * torch.randn_like(param))
        after_BTKV = model(_tokens())
    torch.testing.assert_close(after_BTKV[:, :, 0], before_BTKV[:, :, 0])  # head 0 does not use extra heads
    assert not torch.allclose(after_BTKV[:, :, 1], before_BTKV[:, :, 1])


def test_values_read_the_trunk_output_and_gradients_reach_all_parts(hf_model_dirs):
    model = load_hf_mtp_model(str(hf_model_dirs["llama"]), horizon=3, max_seq_len=64, with_value_head=True)
    logits_BTKV, values_BT = model(_tokens(), return_values=True)
    torch.testing.assert_close(model.value_head(model.trunk_hidden(_tokens())), values_BT)
    torch.testing.assert_close(model(_tokens(), values_only=True), values_BT)
    (logits_BTKV.logsumexp(-1).mean() + values_BT.mean()).backward()
    for part in (model.lm.model.layers[0], model.lm.model.layers[-1], *model.extra_heads, model.value_head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_fsdp_shards_the_model_decoder_layers_and_extra_heads(hf_model_dirs):
    llama = load_hf_mtp_model(str(hf_model_dirs["llama"]), horizon=2, max_seq_len=64, with_value_head=True)
    gpt2 = load_hf_mtp_model(str(hf_model_dirs["gpt2"]), horizon=2, max_seq_len=64)
    assert {type(block).__name__ for block in llama.transformer_blocks()} == {"LlamaDecoderLayer"}
    assert {type(block).__name__ for block in gpt2.transformer_blocks()} == {"GPT2Block"}
    assert gpt2.transformer_blocks() == [*gpt2.lm.transformer.h, *gpt2.extra_heads]
    assert llama.full_precision_modules() == [llama.value_head] and gpt2.full_precision_modules() == []


def test_a_sequence_longer_than_the_model_positions_is_refused(hf_model_dirs):
    with pytest.raises(
        ValueError, match=f"model.max_seq_len={MAX_POSITIONS + 1} exceeds the {MAX_POSITIONS} positions"
    ):
        load_hf_mtp_model(str(hf_model_dirs["gpt2"]), horizon=2, max_seq_len=MAX_POSITIONS + 1)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_export_reloads_with_transformers_and_as_an_mtp_model_with_every_head(hf_model_dirs, tmp_path, kind):
    model = load_hf_mtp_model(str(hf_model_dirs[kind]), horizon=3, max_seq_len=64).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))  # "trained": no longer the weights it was loaded from
        expected_BTKV = model(_tokens())
    export_pretrained(model, load_hf_tokenizer(str(hf_model_dirs[kind])), tmp_path, model.state_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / HF_EXPORT_DIR).eval()
    again = load_hf_mtp_model(str(tmp_path / HF_EXPORT_DIR), horizon=3, max_seq_len=64).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=_tokens()).logits, expected_BTKV[:, :, 0])
        torch.testing.assert_close(again(_tokens()), expected_BTKV)
    with pytest.raises(ValueError, match=f"{MTP_HEADS_FILE} holds 2 extra heads, so model.horizon can be at most 3"):
        load_hf_mtp_model(str(tmp_path / HF_EXPORT_DIR), horizon=4, max_seq_len=64)


def test_tokenizer_adapter_wraps_text_in_bos_eos_and_feeds_the_collator(hf_model_dirs):
    tokenizer = load_hf_tokenizer(str(hf_model_dirs["llama"]))
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    text = "def add(a, b):\n    return a + b\n"
    ids = tokenizer.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) - 2 < len(text)  # BPE merges: fewer ids than bytes
    assert tokenizer.encode(text, add_special=False) == ids[1:-1] and tokenizer.decode(ids) == text
    sequences = TokenSequences(load_records(builtin_dataset_path())[:4], tokenizer, max_len=64)
    batch = MTPCollator(horizon=3, pad_id=tokenizer.pad_id)([sequences[i] for i in range(4)])
    assert batch["tokens"].max() < tokenizer.vocab_size and batch["labels"].shape[-1] == 3


def test_a_tokenizer_without_pad_token_pads_with_eos_and_says_so(hf_model_dirs, caplog):
    with caplog.at_level(logging.WARNING, logger="wmtp_core.models.hf_tokenizer"):
        tokenizer = load_hf_tokenizer(str(hf_model_dirs["gpt2"]))
    assert tokenizer.pad_id == tokenizer.eos_id == tokenizer.bos_id
    assert "no pad token: padding with eos" in caplog.text


def test_tokenizers_that_differ_are_refused_naming_both(hf_model_dirs):
    llama, gpt2 = load_hf_tokenizer(str(hf_model_dirs["llama"])), load_hf_tokenizer(str(hf_model_dirs["gpt2"]))
    check_tokenizers_agree(
        llama, load_hf_tokenizer(str(hf_model_dirs["llama-seed-1"])), trunk_source="a", reference_source="b"
    )
    with pytest.raises(
        ValueError, match=r"reference's tokenizer \(ref-gpt2\) does not match the trunk's \(trunk-llama\)"
    ):
        check_tokenizers_agree(llama, gpt2, trunk_source="trunk-llama", reference_source="ref-gpt2")
    with pytest.raises(ValueError, match="vocab_size 320 vs 259"):
        check_tokenizers_agree(llama, ByteTokenizer(), trunk_source="trunk", reference_source="builtin")


def _load_reference(recipe, trunk_tokenizer):
    return load_reference(
        recipe.rho1,
        None,
        device_plan(recipe),
        algorithm=recipe.train.algorithm,
        model_cfg=recipe.model,
        trunk_tokenizer=trunk_tokenizer,
    )


def test_an_hf_reference_with_another_tokenizer_is_refused_before_training(hf_model_dirs):
    recipe = load_recipe(
        None,
        [
            *HF_OVERRIDES,
            f"model.path={hf_model_dirs['llama']}",
            "train.algorithm=rho1-wmtp",
            f"rho1.reference_hf_model={hf_model_dirs['gpt2']}",
        ],
    )
    trunk_tokenizer = load_hf_tokenizer(str(hf_model_dirs["llama"]))
    with pytest.raises(
        ValueError, match=f"rho1.reference_hf_model={hf_model_dirs['gpt2']}.*model.path={hf_model_dirs['llama']}"
    ):
        _load_reference(recipe, trunk_tokenizer)
    matching = recipe.model_copy(
        update={"rho1": recipe.rho1.model_copy(update={"reference_hf_model": str(hf_model_dirs["llama-seed-1"])})}
    )
    reference = _load_reference(matching, trunk_tokenizer)
    assert reference.horizon == 1 and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.source=hf"], "model.source=hf needs model.path"),
        (["model.path=/models/llama"], "model.path='/models/llama' is only read with model.source=hf"),
        (
            ["rho1.reference_checkpoint=/c", "rho1.reference_hf_model=/m"],
            "either rho1.reference_checkpoint or rho1.reference_hf_model",
        ),
    ],
)
def test_recipe_refuses_inconsistent_model_and_reference_keys(overrides, message):
    with pytest.raises((ValidationError, ValueError), match=message):
        load_recipe(None, overrides)


def test_hf_checkpoint_holds_a_verified_export_that_transformers_loads(hf_model_dirs, tmp_path):
    recipe = load_recipe(None, [*HF_OVERRIDES, f"model.path={hf_model_dirs['gpt2']}", "train.max_steps=2"])
    checkpoint = Path(plan_and_train(recipe, tmp_path / "run").latest_checkpoint)
    listed = verify_checkpoint(checkpoint)["files"]
    assert {
        f"{HF_EXPORT_DIR}/model.safetensors",
        f"{HF_EXPORT_DIR}/{MTP_HEADS_FILE}",
        f"{HF_EXPORT_DIR}/tokenizer.json",
    } <= set(listed)
    assert AutoModelForCausalLM.from_pretrained(checkpoint / HF_EXPORT_DIR).config.n_layer == 2
    with (checkpoint / HF_EXPORT_DIR / MTP_HEADS_FILE).open("r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    with pytest.raises(CheckpointError, match="does not match its manifest checksum"):
        verify_checkpoint(checkpoint)
