"""Meta's multi-token-prediction checkpoints (Gloeckle et al. 2024; e.g. the 7B models with n_future_tokens 4) in
the form model.source=hf reads: a transformers Llama directory plus mtp_heads.safetensors.

Meta's format is `consolidated*.pth` + `params.json`: `layers.0..L-1` where the last layer is the next-token head
(the trunk is the layers before it), `extra_heads.0..n-2` the other heads, one shared `norm` and `output`. That is
the layout of wmtp_core.models.hf (a Llama with L layers, then the extra heads as mtp_heads.safetensors), so the
weights carry over one to one, except that Meta's rotary embedding pairs neighbouring dimensions of q and k and
transformers' pairs the two halves: their rows are permuted.

    uv run wmtp convert-meta MODEL_DIR OUT_DIR --tokenizer LLAMA2_TOKENIZER_DIR_OR_HUB_ID

The tokenizer comes from a transformers copy of the same tokenizer (Meta ships a sentencepiece tokenizer.model;
the 7B models use Llama 2's 32000-token vocabulary); its size is checked against the embedding.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from wmtp_core.models.hf import MTP_HEADS_FILE
from wmtp_core.models.hf_tokenizer import import_transformers
from wmtp_core.progress import CountProgress, DescribedProgress

_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def convert_meta_mtp(
    model_dir: Path, out_dir: Path, *, tokenizer: str, on_progress: DescribedProgress | None = None
) -> Path:
    """Write out_dir (config, weights, tokenizer, mtp_heads.safetensors) from Meta's model_dir; returns out_dir.
    on_progress(stage, done_bytes, total_bytes): the tensors converted, then each file written."""
    report = on_progress or (lambda stage, done, total: None)
    transformers = import_transformers()
    params = json.loads((Path(model_dir) / "params.json").read_text())
    meta_state = _load_consolidated(Path(model_dir))
    config = llama_config(params, meta_state)
    lm_state, heads_state = convert_state(
        meta_state, config, on_tensor=lambda done, total: report("converting", done, total)
    )
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer)
    if len(hf_tokenizer) > config.vocab_size:
        raise ValueError(
            f"--tokenizer {tokenizer} has {len(hf_tokenizer)} tokens but the model embeds {config.vocab_size}; "
            "use the tokenizer the model was trained with (Llama 2's for Meta's 7B multi-token models)"
        )
    with torch.device("meta"):
        lm = transformers.LlamaForCausalLM(config)
    # save_pretrained reports nothing while it writes (the mmap'd weights are read from disk then): a bar per file.
    _written("writing the trunk", lm_state, report, lambda: lm.save_pretrained(out_dir, state_dict=lm_state))
    if heads_state:
        _written(
            "writing the heads", heads_state, report, lambda: save_file(heads_state, Path(out_dir) / MTP_HEADS_FILE)
        )
    hf_tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def _written(stage: str, state: dict, report: DescribedProgress, write: Callable[[], object]) -> None:
    size = _bytes(state.values())
    report(stage, 0, size)
    write()
    report(stage, size, size)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def llama_config(params: dict, meta_state: dict[str, torch.Tensor]):
    """The transformers LlamaConfig of a Meta checkpoint: sizes from params.json and the tensors themselves."""
    transformers = import_transformers()
    dim, num_heads = params["dim"], params["n_heads"]
    num_kv_heads = params.get("n_kv_heads") or num_heads
    return transformers.LlamaConfig(
        vocab_size=meta_state["tok_embeddings.weight"].shape[0],
        hidden_size=dim,
        intermediate_size=meta_state["layers.0.feed_forward.w1.weight"].shape[0],
        num_hidden_layers=len({name.split(".")[1] for name in meta_state if name.startswith("layers.")}),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        rms_norm_eps=params.get("norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": params.get("rope_theta", 10000.0)},
        max_position_embeddings=params.get("max_seq_len", 4096),
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def convert_state(
    meta_state: dict[str, torch.Tensor], config, *, on_tensor: CountProgress | None = None
) -> tuple[dict, dict]:
    """(the LlamaForCausalLM state dict, the extra heads' state dict keyed like HFMTPModel.extra_heads);
    on_tensor(done_bytes, total_bytes) after each tensor of meta_state."""
    total, done = _bytes(meta_state.values()), 0
    lm_state = {
        "model.embed_tokens.weight": meta_state["tok_embeddings.weight"],
        "model.norm.weight": meta_state["norm.weight"],
        "lm_head.weight": meta_state["output.weight"],
    }
    heads_state = {}
    for name, tensor in meta_state.items():
        done += _bytes([tensor])
        group, index, rest = (name.split(".", 2) + ["", ""])[:3]
        if group in ("layers", "extra_heads") and rest in _LAYER_NAMES:
            converted = _rotary_rows(tensor, rest, config)
            if group == "layers":
                lm_state[f"model.layers.{index}.{_LAYER_NAMES[rest]}"] = converted
            else:
                heads_state[f"{index}.{_LAYER_NAMES[rest]}"] = converted.contiguous()
        if on_tensor is not None:
            on_tensor(done, total)
    return lm_state, heads_state


def _rotary_rows(weight: torch.Tensor, name: str, config) -> torch.Tensor:
    """Meta rotates dimension pairs (2i, 2i+1) of each head, transformers (i, i + head_dim/2): reorder q/k rows."""
    heads = {"attention.wq.weight": config.num_attention_heads, "attention.wk.weight": config.num_key_value_heads}.get(
        name
    )
    if heads is None:
        return weight
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _load_consolidated(model_dir: Path) -> dict[str, torch.Tensor]:
    shards = sorted(model_dir.glob("consolidated*.pth"))
    if len(shards) != 1:
        raise ValueError(
            f"{model_dir}: expected one consolidated*.pth, found {len(shards)}; merge model-parallel "
            "shards first (the 7B models ship as one)"
        )
    return torch.load(shards[0], map_location="cpu", weights_only=True, mmap=True)
