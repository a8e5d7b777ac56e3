"""The heads one at a time: each head's logits reduced to a (B, T) value (its per-token loss) as soon as they exist,
so only one head's logits are ever alive (Gloeckle et al. 2024, "Better & Faster LLMs via Multi-token Prediction",
the memory-efficient implementation).

With gradients on, a head's logits are not kept for backward either: its computation is checkpointed, so backward
recomputes it (one forward of the head and the unembedding), head after head, and its gradient flows into the
trunk's output there. Forward, backward, DDP and FSDP all see one ordinary forward and backward of the model, so
gradient accumulation and the wrappers' hooks work as usual. Nothing here knows which loss it computes.
Shapes: B batch, T time, D width, K heads, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

HeadLoss = Callable[[torch.Tensor, int], torch.Tensor]
"""(logits_BTV of head k, k) -> loss_BT: what forward(head_loss=...) computes of each head's logits."""

HeadLogits = Callable[[torch.Tensor], torch.Tensor]
"""x_BTD -> logits_BTV of one head (its block, the final norm and the unembedding, or the part of them the trunk has
not run)."""


def reduce_heads_one_at_a_time(heads: list[tuple[HeadLogits, torch.Tensor]], head_loss: HeadLoss) -> torch.Tensor:
    """loss_BTK[..., k] = head_loss(logits_k(x_k), k) for heads [(logits_k, x_k)], never holding two heads' logits."""
    losses = []
    for k, (logits_of, x_BTD) in enumerate(heads):

        def head_k(x_BTD: torch.Tensor, k: int = k, logits_of: HeadLogits = logits_of) -> torch.Tensor:
            return head_loss(logits_of(x_BTD), k)

        if torch.is_grad_enabled():
            # Non-reentrant: the gradient reaches x_BTD (the trunk) through autograd as usual, kwargs and FSDP's
            # hooks work inside, and a block's own activation checkpoint may nest in it.
            losses.append(checkpoint(head_k, x_BTD, use_reentrant=False))
        else:
            losses.append(head_k(x_BTD))
    return torch.stack(losses, dim=2)
