"""Meta's multi-token-prediction checkpoint format converts to what model.source=hf trains: every head of the
converted model predicts as Meta's own forward pass does (written out below after Meta's llama code: complex
rotary embedding over neighbouring dimension pairs, trunk = layers[:-1], heads = [layers[-1], *extra_heads])."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.hf_models import build_tokenizer

from wmtp_core.models.hf import MTP_HEADS_FILE, load_hf_mtp_model
from wmtp_core.models.meta_mtp import convert_meta_mtp

PARAMS = {
    "dim": 32,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 2,
    "norm_eps": 1e-5,
    "n_future_tokens": 3,
    "rope_theta": 10000.0,
    "max_seq_len": 128,
}


def meta_checkpoint(directory: Path, *, vocab: int, trunk_and_head0_layers: int = 3, extra_heads: int = 2) -> dict:
    """Random weights named as Meta's consolidated.pth names them."""
    generator = torch.Generator().manual_seed(0)
    dim, kv_dim, ffn = PARAMS["dim"], PARAMS["dim"] // PARAMS["n_heads"] * PARAMS["n_kv_heads"], 64

    def normal(*shape):
        return 0.1 * torch.randn(*shape, generator=generator)

    def block(prefix: str) -> dict:
        shapes = {
            "attention.wq.weight": (dim, dim),
            "attention.wk.weight": (kv_dim, dim),
            "attention.wv.weight": (kv_dim, dim),
            "attention.wo.weight": (dim, dim),
            "feed_forward.w1.weight": (ffn, dim),
            "feed_forward.w2.weight": (dim, ffn),
            "feed_forward.w3.weight": (ffn, dim),
        }
        weights = {f"{prefix}{name}": normal(*shape) for name, shape in shapes.items()}
        norms = {f"{prefix}{name}": 1 + normal(dim) for name in ("attention_norm.weight", "ffn_norm.weight")}
        return weights | norms

    state = {
        "tok_embeddings.weight": normal(vocab, dim),
        "norm.weight": 1 + normal(dim),
        "output.weight": normal(vocab, dim),
    }
    for i in range(trunk_and_head0_layers):
        state |= block(f"layers.{i}.")
    for j in range(extra_heads):
        state |= block(f"extra_heads.{j}.")
    directory.mkdir()
    torch.save(state, directory / "consolidated.00.pth")
    (directory / "params.json").write_text(json.dumps({**PARAMS, "vocab_size": vocab}))
    return state


def meta_forward(state: dict, tokens_BT: torch.Tensor, *, extra_heads: int) -> torch.Tensor:
    """logits_BTKV of Meta's Transformer.forward(return_all_heads=True)."""
    B, T = tokens_BT.shape
    H, KV, eps = PARAMS["n_heads"], PARAMS["n_kv_heads"], PARAMS["norm_eps"]
    head_dim = PARAMS["dim"] // H
    freqs = 1.0 / (PARAMS["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs_cis_TF = torch.polar(torch.ones(T, head_dim // 2), torch.outer(torch.arange(T).float(), freqs))

    def rope(x_BTHE):
        pairs = torch.view_as_complex(x_BTHE.reshape(*x_BTHE.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs_cis_TF[None, :, None, :]).flatten(3)

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def block(prefix, x_BTD):
        w = {name.removeprefix(prefix): t for name, t in state.items() if name.startswith(prefix)}
        h = rms_norm(x_BTD, w["attention_norm.weight"])
        q = rope((h @ w["attention.wq.weight"].T).view(B, T, H, head_dim))
        k = rope((h @ w["attention.wk.weight"].T).view(B, T, KV, head_dim)).repeat_interleave(H // KV, dim=2)
        v = (h @ w["attention.wv.weight"].T).view(B, T, KV, head_dim).repeat_interleave(H // KV, dim=2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x_BTD = x_BTD + att.transpose(1, 2).reshape(B, T, -1) @ w["attention.wo.weight"].T
        h = rms_norm(x_BTD, w["ffn_norm.weight"])
        return (
            x_BTD
            + (F.silu(h @ w["feed_forward.w1.weight"].T) * (h @ w["feed_forward.w3.weight"].T))
            @ w["feed_forward.w2.weight"].T
        )

    layers = len({name.split(".")[1] for name in state if name.startswith("layers.")})
    h_BTD = state["tok_embeddings.weight"][tokens_BT]
    for i in range(layers - 1):
        h_BTD = block(f"layers.{i}.", h_BTD)
    latents = [block(f"layers.{layers - 1}.", h_BTD)] + [block(f"extra_heads.{j}.", h_BTD) for j in range(extra_heads)]
    return rms_norm(torch.stack(latents, dim=2), state["norm.weight"]) @ state["output.weight"].T


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(directory)
    return directory


def test_converted_meta_checkpoint_predicts_every_head_as_meta_does(tmp_path, tokenizer_dir):
    state = meta_checkpoint(tmp_path / "meta", vocab=320)
    reports: list[tuple[str, int, int]] = []
    convert_meta_mtp(
        tmp_path / "meta", tmp_path / "hf", tokenizer=str(tokenizer_dir), on_progress=lambda *r: reports.append(r)
    )
    finished = {stage: (done, total) for stage, done, total in reports}
    assert list(finished) == ["converting", "writing the trunk", "writing the heads"]
    assert all(done == total > 0 for done, total in finished.values())  # every bar ends full
    assert (tmp_path / "hf" / MTP_HEADS_FILE).is_file()
    model = load_hf_mtp_model(str(tmp_path / "hf"), horizon=3, max_seq_len=64).eval()
    assert model.lm.config.num_hidden_layers == 3 and len(model.extra_heads) == 2
    tokens_BT = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens_BT), meta_forward(state, tokens_BT, extra_heads=2), rtol=1e-4, atol=1e-4
        )


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, tokenizer_dir):
    meta_checkpoint(tmp_path / "meta", vocab=300)
    with pytest.raises(ValueError, match="has 320 tokens but the model embeds 300"):
        convert_meta_mtp(tmp_path / "meta", tmp_path / "hf", tokenizer=str(tokenizer_dir))
