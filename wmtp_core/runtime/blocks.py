"""Transformer blocks as units of work: the modules FSDP shards one by one, and per-block activation checkpointing
and torch.compile, applied before sharding.

Both features replace a block's `forward` (an instance attribute), never the module tree: parameter names,
state-dict keys and FSDP's hooks (which run around forward) stay as they are, so a checkpoint of a run with them
loads in a run without, and the other way round.
"""

from __future__ import annotations

import types
from typing import Protocol

import torch
from torch.utils.checkpoint import checkpoint


class BlockModel(Protocol):
    """What the runtime asks of a model it shards, checkpoints or compiles (MTPTransformer and HFMTPModel meet it);
    the runtime knows no model class."""

    def transformer_blocks(self) -> list[torch.nn.Module]:
        """Every transformer block, in forward order (trunk, then heads): FSDP's units, and what checkpointing and
        compile wrap."""
        ...

    def full_precision_modules(self) -> list[torch.nn.Module]:
        """The modules that compute in fp32 under any mixed precision (critic-wmtp's value head); may be empty."""
        ...


def wrap_block_forwards(blocks: list[torch.nn.Module], *, checkpointed: bool, compiled: bool) -> None:
    """Make each block recompute its activations in backward (checkpointed) and/or run compiled.

    One compiled function serves every block: its code is the class's forward, and the block comes in as an
    argument, so torch.compile traces each block class once rather than once per block.
    """
    if not (checkpointed or compiled):
        return
    forward = _checkpointed_forward if checkpointed else _class_forward
    if compiled:
        forward = torch.compile(forward)
    for block in blocks:
        block.forward = types.MethodType(forward, block)


def _class_forward(block: torch.nn.Module, *args, **kwargs):
    return type(block).forward(block, *args, **kwargs)


def _checkpointed_forward(block: torch.nn.Module, *args, **kwargs):
    # Non-reentrant: passes keyword arguments (hf layers take most of theirs that way), nests inside the heads' own
    # checkpoint, and keeps FSDP's hooks outside the recomputation (they run around forward, not inside it).
    return checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)
