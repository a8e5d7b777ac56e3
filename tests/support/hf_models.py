"""Tiny Hugging Face causal LMs built locally (nothing is downloaded): a byte-level BPE tokenizer trained on the
built-in dataset's text, and 2-layer Llama and GPT-2 models from a config, saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

from support.recipes import TINY_RUN
from wmtp_core.data.records import builtin_dataset_path, format_example, load_records

VOCAB_SIZE = 320
MAX_POSITIONS = 128


def build_tokenizer(*, with_pad: bool = True):
    """A byte-level BPE tokenizer: Llama-like (<pad>, <s>, </s>) with_pad, else GPT-2-like (one <|endoftext|>
    serving as bos, eos and unk, no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"] if with_pad else ["<|endoftext|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([format_example(r) for r in load_records(builtin_dataset_path())], trainer)
    if with_pad:
        return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    end = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=end, eos_token=end, unk_token=end)


def save_llama(directory: Path, tokenizer, *, seed: int = 0) -> Path:
    """A 2-layer Llama (width 32, grouped-query attention, rotary positions) and its tokenizer in directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(AutoModelForCausalLM, config, tokenizer, directory, seed)


def save_gpt2(directory: Path, tokenizer, *, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (width 32, learned positions, unembedding tied to the embedding) and its tokenizer.

    Dropout is off (GPT-2's default is 0.1): runs on different numbers of processes draw different random masks.
    """
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=MAX_POSITIONS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(AutoModelForCausalLM, config, tokenizer, directory, seed)


def _save(auto_class, config, tokenizer, directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = auto_class.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


HF_OVERRIDES = ["model.source=hf", "model.horizon=3", "model.max_seq_len=64", "data.batch_size=4", *TINY_RUN]
"""A tiny hf recipe (model.path still to be set): 3 heads, 64 tokens, 4 steps."""
