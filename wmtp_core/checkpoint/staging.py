"""Snapshots of the live training state for a background checkpoint write: CPU buffers kept from save to save and
refilled, so an async save copies into memory that is already there.

Fresh memory is faulted in page by page as the copy first touches it: on this project's 2-core machine a 215 MB
state took 45 ms to clone into fresh memory and 17 ms to copy into kept buffers (benchmarks/RESULTS.md, "Async
save"). The cost is one copy of the live state kept for the whole run; a save holds that copy anyway while it
writes, so the peak is unchanged. torch.distributed.checkpoint's stager keeps its buffers the same way.

Only live tensors are copied: those sharing storage with the model's parameters and buffers or the optimizer's
state, which training changes. A full state gathered by FSDP is already a fresh copy on the CPU and passes as it is.
A DTensor (a shard of the sharded format) is copied as its local shard and stays a DTensor; a tensor on a GPU is
copied into pinned memory, which the GPU copies to fastest.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def live_storages(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> set[int]:
    """Storage addresses of everything training changes in place: parameters, buffers, optimizer state."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    return {_storage_of(tensor) for tensor in tensors}


class StagingBuffers:
    """Kept CPU buffers, one per tensor position in a state tree (nested dicts, lists, tuples), refilled at each
    snapshot; a position whose shape or dtype changed gets a new buffer."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def snapshot(self, tree, live: set[int]):
        """tree with each live tensor replaced by its buffer, filled with the tensor's values now."""
        return self._copy(tree, live, path=())

    def _copy(self, tree, live: set[int], path: tuple):
        if isinstance(tree, torch.Tensor):
            return self._fill(path, tree) if _storage_of(tree) in live else tree
        if isinstance(tree, dict):
            return {key: self._copy(value, live, (*path, key)) for key, value in tree.items()}
        if isinstance(tree, list | tuple):
            return type(tree)(self._copy(value, live, (*path, i)) for i, value in enumerate(tree))
        return tree

    def _fill(self, path: tuple, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, DTensor):
            local, spec = self._fill(path, tensor.to_local()), (tensor.device_mesh, tensor.placements)
            return DTensor.from_local(local, *spec, run_check=False, shape=tensor.shape, stride=tensor.stride())
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=tensor.is_cuda)
            self._buffers[path] = buffer
        return buffer.copy_(tensor.detach())


def _storage_of(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor  # FSDP2: this rank's shard
    return local.untyped_storage().data_ptr()
