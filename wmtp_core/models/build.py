"""The model and tokenizer a recipe's model section describes: the built-in MTPTransformer with the byte tokenizer,
or a Hugging Face causal LM with MTP heads and its own tokenizer."""

from __future__ import annotations

import torch

from wmtp_core.config import ModelConfig
from wmtp_core.data.tokens import Tokenizer
from wmtp_core.models.hf import hf_mtp_skeleton, load_hf_mtp_model
from wmtp_core.models.hf_tokenizer import load_hf_tokenizer
from wmtp_core.models.tokenizer import ByteTokenizer
from wmtp_core.models.transformer import MTPTransformer


def build_tokenizer(cfg: ModelConfig) -> Tokenizer:
    """The byte tokenizer, or the hf model's own tokenizer from model.path."""
    return load_hf_tokenizer(cfg.path) if cfg.source == "hf" else ByteTokenizer()


def build_model(cfg: ModelConfig, tokenizer: Tokenizer, *, with_value_head: bool) -> torch.nn.Module:
    """The built-in MTPTransformer, or the hf causal LM with MTP heads (fp32 master weights; autocast computes)."""
    if cfg.source == "hf":
        return load_hf_mtp_model(
            cfg.path, horizon=cfg.horizon, max_seq_len=cfg.max_seq_len, with_value_head=with_value_head
        )
    return MTPTransformer(cfg, vocab_size=tokenizer.vocab_size, with_value_head=with_value_head)


def build_model_skeleton(cfg: ModelConfig, tokenizer: Tokenizer, *, with_value_head: bool) -> torch.nn.Module:
    """build_model's module tree on the meta device: shapes without weights, built in no time and no memory, and
    drawing nothing from the random generator."""
    if cfg.source == "hf":
        return hf_mtp_skeleton(
            cfg.path, horizon=cfg.horizon, max_seq_len=cfg.max_seq_len, with_value_head=with_value_head
        )
    with torch.device("meta"):
        return MTPTransformer(cfg, vocab_size=tokenizer.vocab_size, with_value_head=with_value_head)
