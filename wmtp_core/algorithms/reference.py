"""The rho1-wmtp reference model, loaded frozen: a checkpoint of this project (builtin or hf trunk), a Hugging Face
causal LM (rho1.reference_hf_model), or the brief reference trained before the run
(wmtp_core.algorithms.brief_reference).

The reference runs under no_grad in eval mode; only its next-token head (head 0) is used, and its tokenizer must
be the trunk's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from wmtp_core.checkpoint.manifest import MANIFEST_FILE, CheckpointError, verify_checkpoint
from wmtp_core.checkpoint.storage import MODEL_FILE, check_shapes_match
from wmtp_core.config import ModelConfig, Rho1Config
from wmtp_core.data.tokens import Tokenizer
from wmtp_core.models.hf import HF_EXPORT_DIR, load_hf_mtp_model
from wmtp_core.models.hf_tokenizer import load_hf_tokenizer
from wmtp_core.models.tokenizer import ByteTokenizer, check_tokenizers_agree
from wmtp_core.models.transformer import MTPTransformer
from wmtp_core.runtime.devices import DevicePlan

log = logging.getLogger(__name__)


def load_reference(
    rho1: Rho1Config,
    checkpoint: Path | None,
    plan: DevicePlan,
    *,
    algorithm: str,
    model_cfg: ModelConfig,
    trunk_tokenizer: Tokenizer,
) -> torch.nn.Module | None:
    """The frozen reference of a rho1-wmtp run (None for other algorithms: algorithm is train.algorithm), after
    checking that its tokenizer is the trunk's (vocabulary and special ids); the error names both models.
    model_cfg: the trunk's model section (the source it names, and the sequence length the reference reads)."""
    hf_reference = rho1.reference_hf_model
    if algorithm != "rho1-wmtp" or (checkpoint is None and hf_reference is None):
        return None
    if hf_reference is not None:
        tokenizer, source = load_hf_tokenizer(hf_reference), f"rho1.reference_hf_model={hf_reference}"
    else:
        tokenizer, source = checkpoint_tokenizer(checkpoint), f"rho1 reference checkpoint {checkpoint}"
    trunk_source = f"model.path={model_cfg.path}" if model_cfg.source == "hf" else "the built-in byte tokenizer"
    check_tokenizers_agree(trunk_tokenizer, tokenizer, trunk_source=trunk_source, reference_source=source)
    if checkpoint is not None:
        return load_reference_model(checkpoint, plan, max_seq_len=model_cfg.max_seq_len)
    model = load_hf_mtp_model(hf_reference, horizon=1, max_seq_len=model_cfg.max_seq_len, dtype=_frozen_dtype(plan))
    return model.requires_grad_(False).to(plan.device).eval()


def load_reference_model(path: Path, plan: DevicePlan, *, max_seq_len: int | None = None) -> torch.nn.Module:
    """A frozen model in eval mode on the plan's device from a checkpoint of this project: the built-in model
    shaped by the checkpoint's own recipe, or an hf trunk (its next-token head) from the checkpoint's hf/ export."""
    saved_model = verify_checkpoint(path)["recipe"]["model"]
    if saved_model.get("source", "builtin") == "hf":
        model = load_hf_mtp_model(
            str(_hf_export(path)),
            horizon=1,
            dtype=_frozen_dtype(plan),
            max_seq_len=max_seq_len or saved_model["max_seq_len"],
        )
    else:
        model = MTPTransformer(ModelConfig(**saved_model), vocab_size=ByteTokenizer().vocab_size)
        model_state = {
            name: t for name, t in load_file(path / MODEL_FILE).items() if not name.startswith("value_head.")
        }
        check_shapes_match(model_state, model.state_dict(), source=path)
        model.load_state_dict(model_state)
    model.requires_grad_(False)
    return model.to(plan.device).eval()


def checkpoint_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer a checkpoint of this project was trained with."""
    saved_model = json.loads((path / MANIFEST_FILE).read_text())["recipe"]["model"]
    return load_hf_tokenizer(str(_hf_export(path))) if saved_model.get("source", "builtin") == "hf" else ByteTokenizer()


def _hf_export(path: Path) -> Path:
    export = path / HF_EXPORT_DIR
    if not export.is_dir():
        raise CheckpointError(
            f"{path} has no {HF_EXPORT_DIR}/ export of its trunk (a sharded checkpoint?); "
            "use a full-format checkpoint of that run as rho1.reference_checkpoint"
        )
    return export


def _frozen_dtype(plan: DevicePlan) -> torch.dtype:
    """A frozen reference is never updated, so it can hold its weights in the compute dtype (half the memory)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.autocast_dtype, torch.float32)
