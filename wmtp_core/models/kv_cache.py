"""Key/value caches for decoding: one per attention layer of the trunk and one per head, all as long as the sequence
the model has read, and all cut back together when speculative decoding rejects drafted tokens.

Each head is an attention block of its own over every earlier position, so it needs its own keys and values: head
0's cannot serve head 2 (other projections), and recomputing a head over the whole prefix would cost O(T) a step.
Shapes: B batch, H attention heads, T time, d head width.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerKVCache:
    """One attention layer's keys and values in a buffer of `capacity` positions, written in place: cutting back is
    setting the length, and a step copies only its new positions (torch.cat would copy the whole prefix)."""

    def __init__(self, capacity: int, *, step_mask: StepMask):
        self.capacity = capacity
        self.length = 0
        self.k_BHTd: torch.Tensor | None = None
        self.v_BHTd: torch.Tensor | None = None
        self.step_mask = step_mask

    def append(self, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions; returns the keys and values of every position so far."""
        B, H, T, d = k_BHTd.shape
        if self.k_BHTd is None:
            self.k_BHTd = k_BHTd.new_empty(B, H, self.capacity, d)
            self.v_BHTd = v_BHTd.new_empty(B, H, self.capacity, d)
        end = self.length + T
        assert end <= self.capacity, f"cache of {self.capacity} positions cannot take {end}"
        self.k_BHTd[:, :, self.length : end] = k_BHTd
        self.v_BHTd[:, :, self.length : end] = v_BHTd
        self.length = end
        return self.k_BHTd[:, :, :end], self.v_BHTd[:, :, :end]


class StepMask:
    """The additive causal mask of T new positions after `past` cached ones, made once per step and shared by every
    layer of a cache: a layer that made its own would add a few small operations to each, which on a small model
    cost as much as the attention."""

    def __init__(self):
        self._key: tuple | None = None
        self._mask_TS: torch.Tensor | None = None

    def get(self, past: int, T: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (past, T, dtype, device)
        if key != self._key:
            # New position i (absolute past + i) sees keys 0..past + i: -inf strictly above that diagonal.
            self._mask_TS = torch.full((T, past + T), float("-inf"), dtype=dtype, device=device).triu_(past + 1)
            self._key = key
        return self._mask_TS


class TransformerKVCache:
    """The built-in MTPTransformer's cache: one LayerKVCache per trunk block, and one for the heads, which decode as
    one batched block (their keys and values side by side in its batch dimension)."""

    def __init__(self, *, num_layers: int, capacity: int):
        step_mask = StepMask()
        self.trunk = [LayerKVCache(capacity, step_mask=step_mask) for _ in range(num_layers)]
        self.heads = LayerKVCache(capacity, step_mask=step_mask)
        self.head_weights = None
        """The decoding heads' weights, stacked at the first decode (a cache serves one state of one model)."""

    @property
    def length(self) -> int:
        return self.trunk[0].length

    def crop(self, length: int) -> None:
        """Forget every position from `length` on (rejected drafts)."""
        for layer in (*self.trunk, self.heads):
            layer.length = min(layer.length, length)


def attend_cached(q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor, cache: LayerKVCache):
    """Causal attention of T new positions over the cached ones and themselves; the new keys join the cache.

    q_BHTd may also hold the last of the new positions alone (a prompt read that needs only its end): T = 1 then,
    and that query sees every key, cached and new."""
    past, T = cache.length, q_BHTd.shape[2]
    k_BHSd, v_BHSd = cache.append(k_BHTd, v_BHTd)
    if T == 1:  # one query, the last position: it sees every key, so no mask
        return F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd)
    if past == 0:
        return F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd, is_causal=True)
    # is_causal would align the mask top-left, as if the new positions came first.
    mask_TS = cache.step_mask.get(past, T, dtype=q_BHTd.dtype, device=q_BHTd.device)
    return F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd, attn_mask=mask_TS)


class HFKVCache:
    """A Hugging Face trunk's cache: the LM's own (its last layer is head 0) and one for each extra head.

    The extra heads are copies of the LM's last layer and keep its layer index, so each gets a cache of the LM's own
    kind (sliding-window layers stay sliding) in which only that index is used. `keyword` is the name the LM's
    forward takes its cache under, looked up once here rather than at every decoding step.
    """

    def __init__(self, lm: nn.Module, *, num_extra_heads: int):
        from transformers import DynamicCache

        self.keyword = cache_keyword(lm)
        self.trunk = DynamicCache(config=lm.config)
        self.heads = [DynamicCache(config=lm.config) for _ in range(num_extra_heads)]

    @property
    def length(self) -> int:
        return self.trunk.get_seq_length()

    def crop(self, length: int) -> None:
        """Forget every position from `length` on. crop(-n) removes n positions under both of transformers'
        meanings of crop's argument (early releases: the length to keep; later ones: minus the count to remove)."""
        excess = self.length - length
        if excess > 0:
            for cache in (self.trunk, *self.heads):
                cache.crop(-excess)


def cache_keyword(lm: nn.Module) -> str:
    """The name the LM's forward takes its cache under: `cache` in later transformers releases, else
    `past_key_values` (later releases still accept it, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
