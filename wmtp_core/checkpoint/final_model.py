"""The trained model a run hands over (its MLflow run's `final_model/` artifact): weights and a small config, no
pickle, written from the run's newest checkpoint of either format and either model source.

- builtin model: model.safetensors (the MTPTransformer's state dict, the value head of a critic run included)
  + model_config.json.
- hf model: the trunk as save_pretrained writes it (AutoModelForCausalLM.from_pretrained loads it, and
  model.path=<that directory> trains on), its tokenizer, the extra heads in mtp_heads.safetensors
  + model_config.json. A critic run's value head is training-only and is not exported.

A sharded checkpoint has neither file: its model shards (not the optimizer's) are gathered into a scratch file mapped
into memory and written from there, so no copy of the weights is held in memory.

tracking.mlflow_model adds MLflow's files beside these (MLmodel, data/, the environment files); they read nothing
of them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from wmtp_core.checkpoint.conversion import gather_mapped
from wmtp_core.checkpoint.hashed_files import save_safetensors_hashed
from wmtp_core.checkpoint.manifest import FINAL_MODEL_CONFIG
from wmtp_core.checkpoint.storage import MODEL_FILE, SHARDED_DIR, read_checkpoint_manifest
from wmtp_core.config import ModelConfig
from wmtp_core.data.tokens import Tokenizer
from wmtp_core.models.build import build_model_skeleton, build_tokenizer
from wmtp_core.models.hf import HF_EXPORT_DIR, load_hf_mtp_model, save_mtp_pretrained
from wmtp_core.models.hf_tokenizer import load_hf_tokenizer
from wmtp_core.models.tokenizer import ByteTokenizer
from wmtp_core.models.transformer import MTPTransformer


def write_final_model(checkpoint: Path, out: Path, *, verified: bool = False) -> None:
    """Fill the empty directory out with the final model of a checkpoint directory (layout above), verifying it
    first unless verified (the caller holds its verdict)."""
    manifest = read_checkpoint_manifest(checkpoint, verified=verified)
    recipe = manifest["recipe"]
    model_cfg = ModelConfig(**recipe["model"])
    config = {"model": recipe["model"], "step": manifest["step"], "algorithm": recipe["train"]["algorithm"]}
    if model_cfg.source == "builtin":
        config["vocab_size"] = ByteTokenizer().vocab_size
    if manifest.get("format", "full") == "sharded":
        _write_from_shards(checkpoint, out, model_cfg, with_value_head=config["algorithm"] == "critic-wmtp")
    elif model_cfg.source == "hf":
        shutil.copytree(checkpoint / HF_EXPORT_DIR, out, dirs_exist_ok=True)
    else:
        shutil.copy2(checkpoint / MODEL_FILE, out / MODEL_FILE)
    (out / FINAL_MODEL_CONFIG).write_text(json.dumps(config, indent=2))


def load_final_model(directory: Path) -> torch.nn.Module:
    """The model in a directory written by write_final_model, in eval mode: an MTPTransformer, or an HFMTPModel
    with every head for an hf trunk."""
    directory = Path(directory)
    config = json.loads((directory / FINAL_MODEL_CONFIG).read_text())
    model_cfg = ModelConfig(**config["model"])
    if model_cfg.source == "hf":
        return load_hf_mtp_model(str(directory), horizon=model_cfg.horizon, max_seq_len=model_cfg.max_seq_len).eval()
    return _builtin_model(model_cfg, load_file(directory / MODEL_FILE))


def load_final_model_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer of a directory written by write_final_model: the trunk's for an hf model, else bytes."""
    config = json.loads((Path(directory) / FINAL_MODEL_CONFIG).read_text())
    return _final_model_tokenizer(Path(directory), ModelConfig(**config["model"]))


def load_checkpoint_model(checkpoint: Path, *, verified: bool = False) -> tuple[torch.nn.Module, Tokenizer]:
    """The model of a checkpoint directory (either format, either source) in eval mode on the CPU, and its
    tokenizer: what generation and evaluation run. Verified first unless verified (the caller holds its verdict);
    a sharded checkpoint is gathered through a temporary final model."""
    manifest = read_checkpoint_manifest(checkpoint, verified=verified)
    model_cfg = ModelConfig(**manifest["recipe"]["model"])
    if manifest.get("format", "full") == "sharded":
        with tempfile.TemporaryDirectory() as scratch:
            write_final_model(checkpoint, Path(scratch), verified=True)
            return load_final_model(Path(scratch)), _final_model_tokenizer(Path(scratch), model_cfg)
    if model_cfg.source == "hf":
        exported = checkpoint / HF_EXPORT_DIR
        model = load_hf_mtp_model(str(exported), horizon=model_cfg.horizon, max_seq_len=model_cfg.max_seq_len)
        return model.eval(), load_hf_tokenizer(str(exported))
    return _builtin_model(model_cfg, load_file(checkpoint / MODEL_FILE)), ByteTokenizer()


def _final_model_tokenizer(directory: Path, model_cfg: ModelConfig) -> Tokenizer:
    return load_hf_tokenizer(str(directory)) if model_cfg.source == "hf" else ByteTokenizer()


def _builtin_model(model_cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> MTPTransformer:
    with_value_head = any(name.startswith("value_head.") for name in weights)
    model = MTPTransformer(model_cfg, vocab_size=ByteTokenizer().vocab_size, with_value_head=with_value_head)
    model.load_state_dict(weights)
    return model.eval()


def _write_from_shards(checkpoint: Path, out: Path, model_cfg: ModelConfig, *, with_value_head: bool) -> None:
    """The model shards (not the optimizer's) gathered into a scratch file mapped into memory, next to the
    checkpoint (out is uploaded whole), and written from there: no copy of the weights is held in memory."""
    with tempfile.TemporaryDirectory(dir=checkpoint.parent, prefix=".tmp-export-") as scratch:
        model_state = gather_mapped(checkpoint / SHARDED_DIR, Path(scratch) / "model", only="model")["model"]
        if model_cfg.source == "hf":
            tokenizer = build_tokenizer(model_cfg)
            # save_pretrained takes its config from the model and its tensors from model_state: no weights needed
            skeleton = build_model_skeleton(model_cfg, tokenizer, with_value_head=with_value_head)
            save_mtp_pretrained(skeleton, tokenizer, out, model_state)
        else:
            save_safetensors_hashed(model_state, out / MODEL_FILE)  # streamed from the map, tied tensors written twice
