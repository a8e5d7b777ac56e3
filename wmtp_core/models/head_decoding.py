"""The built-in model's heads as one batched block when decoding: their weights stacked once per cache, so a step
through k heads is about one block's worth of operations instead of k. A small model's decoding step is bound by
how many operations it launches, not by their size, and speculative decoding runs up to every head at each step.

Computes what Block.forward computes (eval mode: no dropout), per head, with batched matrix products.
Shapes: B batch, T time, N = B*T, K heads, D model width, F = 4D, H attention heads, d head width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from wmtp_core.models.kv_cache import LayerKVCache, attend_cached


@dataclass(frozen=True)
class StackedHeads:
    norm_attn_w_K1D: torch.Tensor
    norm_attn_b_K1D: torch.Tensor
    qkv_KD3D: torch.Tensor
    proj_KDD: torch.Tensor
    norm_mlp_w_K1D: torch.Tensor
    norm_mlp_b_K1D: torch.Tensor
    up_KDF: torch.Tensor
    down_KFD: torch.Tensor
    attention_heads: int
    eps: float

    @property
    def num_heads(self) -> int:
        return self.qkv_KD3D.shape[0]


def stack_heads(heads: Sequence[nn.Module]) -> StackedHeads:
    """The heads' (Blocks') weights, stacked along a new first dimension; linear weights transposed for bmm."""

    def stacked(weight_of) -> torch.Tensor:
        return torch.stack([weight_of(head).detach() for head in heads])

    first = heads[0]
    return StackedHeads(
        norm_attn_w_K1D=stacked(lambda h: h.norm_attn.weight[None]),
        norm_attn_b_K1D=stacked(lambda h: h.norm_attn.bias[None]),
        qkv_KD3D=stacked(lambda h: h.attn.qkv.weight.T),
        proj_KDD=stacked(lambda h: h.attn.proj.weight.T),
        norm_mlp_w_K1D=stacked(lambda h: h.norm_mlp.weight[None]),
        norm_mlp_b_K1D=stacked(lambda h: h.norm_mlp.bias[None]),
        up_KDF=stacked(lambda h: h.mlp.up.weight.T),
        down_KFD=stacked(lambda h: h.mlp.down.weight.T),
        attention_heads=first.attn.num_heads,
        eps=first.norm_attn.eps,
    )


def run_heads(x_BTD: torch.Tensor, heads: StackedHeads, cache: LayerKVCache, *, last_only: bool = False):
    """Every stacked head on the trunk's states x_BTD: h_BTKD. The cache holds the heads' keys and values side by
    side in its batch dimension (K*B rows).

    last_only: every position's keys and values join the cache, but attention and MLP run for the last position
    alone, and h_B1KD comes back. A prompt read needs the heads' outputs at its end only; the rest of its positions
    matter to later steps through the cache alone.
    """
    B, T, D = x_BTD.shape
    K, H = heads.num_heads, heads.attention_heads
    a_KND = F.layer_norm(x_BTD.reshape(1, B * T, D), (D,), eps=heads.eps) * heads.norm_attn_w_K1D
    q, k, v = torch.bmm(a_KND + heads.norm_attn_b_K1D, heads.qkv_KD3D).split(D, dim=2)
    q, k, v = (t.view(K * B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
    if last_only:
        x_BTD, q, T = x_BTD[:, -1:], q[:, :, -1:], 1
    y_KBHTd = attend_cached(q, k, v, cache)
    y_KND = y_KBHTd.transpose(1, 2).reshape(K, B * T, D)
    x_KND = x_BTD.reshape(1, B * T, D) + torch.bmm(y_KND, heads.proj_KDD)
    m_KND = F.layer_norm(x_KND, (D,), eps=heads.eps) * heads.norm_mlp_w_K1D + heads.norm_mlp_b_K1D
    x_KND = x_KND + torch.bmm(F.gelu(torch.bmm(m_KND, heads.up_KDF)), heads.down_KFD)
    return x_KND.view(K, B, T, D).permute(1, 2, 0, 3)
