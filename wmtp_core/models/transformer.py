"""A Meta-style multi-token-prediction transformer: a shared trunk, `horizon` parallel one-block heads,
one shared final norm and unembedding (Gloeckle et al. 2024, "Better & Faster LLMs via Multi-token Prediction").

Shapes: B batch, T time, D model width, K horizon (heads), V vocabulary.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from wmtp_core.config import ModelConfig
from wmtp_core.models.head_decoding import run_heads, stack_heads
from wmtp_core.models.heads import HeadLoss, reduce_heads_one_at_a_time
from wmtp_core.models.kv_cache import LayerKVCache, TransformerKVCache, attend_cached


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x_BTD: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        """With a cache, x_BTD continues the cached positions (decoding); without, it is the whole sequence."""
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split(D, dim=2)
        q, k, v = (t.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            # Padding sits at the end of each row, so the causal mask alone keeps real tokens from seeing it.
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            y = attend_cached(q, k, v, cache)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.down = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x_BTD))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x_BTD: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.norm_attn(x_BTD), cache)
        return x_BTD + self.mlp(self.norm_mlp(x_BTD))


class ValueHead(nn.Module):
    """critic-wmtp's value estimate V_t from the trunk's hidden state: D -> D/2 -> ReLU -> 1."""

    def __init__(self, d_model: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_model // 2), nn.ReLU(), nn.Linear(d_model // 2, 1))

    def forward(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """V_BT in fp32 under any autocast: TD weights and GAE targets are differences of values, which bf16 blurs."""
        with torch.autocast(h_BTD.device.type, enabled=False):
            return self.net(h_BTD.float()).squeeze(-1)


def frozen_trunk_values(model: nn.Module, tokens_BT: torch.Tensor) -> torch.Tensor:
    """values_BT from model.value_head with the trunk run without gradient (critic-wmtp's Stage 1)."""
    with torch.no_grad():
        h_BTD = model.trunk_hidden(tokens_BT)
    return model.value_head(h_BTD)


class MTPTransformer(nn.Module):
    """forward(tokens_BT) -> logits_BTKV, where head k at position t predicts token t + k + 1.

    With with_value_head, `value_head` maps the trunk's hidden state to V_BT (critic-wmtp); it is part of the
    state dict, so checkpoints carry it.
    """

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, with_value_head: bool = False):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.trunk = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.heads = nn.ModuleList(Block(cfg) for _ in range(cfg.horizon))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.unembedding = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.value_head = ValueHead(cfg.d_model) if with_value_head else None
        self.apply(_init_weights)
        # GPT-2's scaled init of residual projections keeps the residual stream's variance flat with depth.
        depth = cfg.num_layers + 1
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * depth))

    @property
    def horizon(self) -> int:
        return self.cfg.horizon

    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    def trunk_hidden(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """The shared trunk's last hidden state h_BTD (the input of every head)."""
        T = tokens_BT.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        positions_T = torch.arange(T, device=tokens_BT.device)
        x_BTD = self.token_embedding(tokens_BT) + self.position_embedding(positions_T)
        for block in self.trunk:
            x_BTD = block(x_BTD)
        return x_BTD

    def heads_logits(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """Every head's logits from the trunk's hidden state: logits_BTKV."""
        head_states_BTKD = torch.stack([head(h_BTD) for head in self.heads], dim=2)
        return self.unembedding(self.final_norm(head_states_BTKD))

    def head_blocks(self) -> list[nn.Module]:
        """The blocks only the heads run (forward(head_loss=...) recomputes them one head at a time)."""
        return list(self.heads)

    def transformer_blocks(self) -> list[nn.Module]:
        """Every block, trunk then heads (wmtp_core.runtime.blocks.BlockModel: FSDP's units, checkpointed, compiled)."""
        return [*self.trunk, *self.heads]

    def full_precision_modules(self) -> list[nn.Module]:
        """The value head, if any: it computes in fp32 under any mixed precision (BlockModel)."""
        return [self.value_head] if self.value_head is not None else []

    def forward(
        self,
        tokens_BT: torch.Tensor,
        *,
        return_values: bool = False,
        values_only: bool = False,
        head_loss: HeadLoss | None = None,
    ):
        """logits_BTKV; (logits_BTKV, values_BT) with return_values; values_only: values_BT alone, the trunk run
        without gradient (critic-wmtp's Stage 1 trains the value head by itself). With head_loss, loss_BTK in place
        of logits_BTKV, the heads computed one at a time (wmtp_core.models.heads).

        Training goes through forward (not trunk_hidden/heads_logits) because DDP and FSDP hook forward only.
        """
        if values_only:
            return frozen_trunk_values(self, tokens_BT)
        h_BTD = self.trunk_hidden(tokens_BT)
        if head_loss is None:
            out = self.heads_logits(h_BTD)
        else:
            out = reduce_heads_one_at_a_time(
                [(partial(self._head_logits, head), h_BTD) for head in self.heads], head_loss
            )
        return (out, self.value_head(h_BTD)) if return_values else out

    def _head_logits(self, head: Block, h_BTD: torch.Tensor) -> torch.Tensor:
        return self.unembedding(self.final_norm(head(h_BTD)))

    def new_cache(self) -> TransformerKVCache:
        """An empty cache for decode(), as long as model.max_seq_len."""
        return TransformerKVCache(num_layers=len(self.trunk), capacity=self.max_seq_len)

    @torch.no_grad()
    def decode(
        self, tokens_BT: torch.Tensor, cache: TransformerKVCache, *, num_heads: int, last_only: bool = False
    ) -> torch.Tensor:
        """logits_BTKV of heads 0..num_heads-1 for tokens_BT, which continue the cache's sequence (inference only:
        no dropout, no gradient); with last_only, logits_B1KV of the last position (every position is cached).

        Positions count from the cache's length, so position embeddings stay absolute. Only the heads asked for run
        and are cached (a cache serves one num_heads), as one batched block (wmtp_core.models.head_decoding).
        """
        start, T = cache.length, tokens_BT.shape[1]
        if start + T > self.max_seq_len:
            raise ValueError(f"decoding to {start + T} tokens exceeds model.max_seq_len={self.max_seq_len}")
        positions_T = torch.arange(start, start + T, device=tokens_BT.device)
        x_BTD = self.token_embedding(tokens_BT) + self.position_embedding(positions_T)
        for block, layer_cache in zip(self.trunk, cache.trunk):
            x_BTD = block(x_BTD, layer_cache)
        if cache.head_weights is None:
            cache.head_weights = stack_heads(self.heads[:num_heads])
        assert cache.head_weights.num_heads == num_heads, "a cache serves one num_heads"
        h_BTKD = run_heads(x_BTD, cache.head_weights, cache.heads, last_only=last_only)
        return self.unembedding(self.final_norm(h_BTKD))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
