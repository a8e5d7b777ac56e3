"""Checkpoint files hashed on the way out: the digest (BLAKE3, wmtp_core.checkpoint.digests) runs in a helper thread
over the very bytes being written, so a file's manifest entry is ready when its last byte is written, and the file
is never read back to hash it.

On two cores this is what keeps a durable, checksummed save close to a bare `torch.save`: the write runs on one
core and the hash on the other, instead of one after the other.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from wmtp_core.checkpoint.digests import DIGEST_ALGORITHM, new_hasher
from wmtp_core.checkpoint.manifest import file_entry

# Below this a chunk is hashed in the writing thread: handing it to the helper would cost more than hashing it.
_INLINE_BYTES = 1 << 16

# safetensors dtype names, in the order the reference writer (safetensors.torch.save_file) lays tensors out:
# widest first, so every tensor's data stays aligned to its element size.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.uint64: "U64",
    torch.int64: "I64",
    torch.float64: "F64",
    torch.float32: "F32",
    torch.uint32: "U32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.uint16: "U16",
    torch.int16: "I16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_LAYOUT_RANK = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES)}

# torch's CRC32 switch is process-wide: saves that turn it off and back on must not interleave.
_CRC32_SWITCH = threading.Lock()


class HashingFile:
    """A new binary file, written front to back, whose digest and size are known the moment it is closed.

    pipelined=False hashes in the writing thread: better when another file is written at the same time, so that
    two cores are not shared by four busy threads.
    """

    def __init__(self, path: Path, *, pipelined: bool = True, on_bytes: Callable[[int], None] | None = None):
        self._file = path.open("wb", buffering=0)
        self._on_bytes = on_bytes
        self._hasher = new_hasher(DIGEST_ALGORITHM)
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wmtp-digest")
        self._inline_bytes = _INLINE_BYTES if pipelined else float("inf")
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes < self._inline_bytes:
            self._hasher.update(view)
            self._write_all(view)
        else:
            hashed = self._helper.submit(self._hasher.update, view)  # blake3 releases the GIL on large buffers
            self._write_all(view)
            hashed.result()  # the caller may reuse its buffer once write returns
        self.size += view.nbytes
        if self._on_bytes is not None:
            self._on_bytes(view.nbytes)
        return view.nbytes

    def flush(self) -> None:
        """Nothing is buffered here (torch.save calls this when it is done)."""

    def close(self) -> dict:
        """Close the file (again is harmless) and return its manifest entry (algorithm, hex digest, size in bytes)."""
        self._file.close()
        self._helper.shutdown()
        return file_entry(self._hasher.hexdigest(), self.size)

    def __enter__(self) -> HashingFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()  # also when the writing failed: the helper thread must not outlive the file

    def _write_all(self, view: memoryview) -> None:
        while view.nbytes:
            view = view[self._file.write(view) :]


def torch_save_hashed(obj, path: Path, *, on_bytes: Callable[[int], None] | None = None) -> dict:
    """torch.save(obj) to path; return its manifest entry. on_bytes(n) follows the bytes written.

    torch's zip writer would also compute a CRC32 of every record: a second, slower checksum of bytes the manifest's
    digest already covers (about 40% of torch.save's time), so it is skipped; torch.load does not need it. torch
    offers only a process-wide switch for it, which is turned back to what it was when the save ends.
    """
    with _CRC32_SWITCH:
        previous = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            with HashingFile(path, on_bytes=on_bytes) as file:
                torch.save(obj, file)
                return file.close()
        finally:
            torch.serialization.set_crc32_options(previous)


def save_safetensors_hashed(
    tensors: dict[str, torch.Tensor],
    path: Path,
    *,
    pipelined: bool = True,
    on_bytes: Callable[[int], None] | None = None,
) -> dict:
    """Write tensors in the safetensors format, byte for byte what safetensors.torch.save_file writes, streamed
    from the tensors' own memory (no intermediate copy); return the file's manifest entry.
    Tensors that share memory (tied weights, as GPT-2's embedding and unembedding) are each written in full, which
    save_file refuses; loading the two copies fills the one parameter twice with the same values.
    """
    ordered = sorted(tensors.items(), key=lambda item: (_layout_rank(item[0], item[1]), item[0]))
    header, offset = {}, 0
    for name, tensor in ordered:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    with HashingFile(path, pipelined=pipelined, on_bytes=on_bytes) as file:
        file.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for _, tensor in ordered:
            if tensor.numel():
                file.write(_raw_bytes(tensor))
        return file.close()


def _layout_rank(name: str, tensor: torch.Tensor) -> int:
    if tensor.dtype not in _LAYOUT_RANK:
        raise TypeError(
            f"tensor {name!r} has dtype {tensor.dtype}, which a checkpoint's model.safetensors cannot hold; "
            f"supported: {', '.join(str(dtype) for dtype in SAFETENSORS_DTYPES)}"
        )
    return _LAYOUT_RANK[tensor.dtype]


def _raw_bytes(tensor: torch.Tensor):
    """The tensor's little-endian bytes as a buffer over its own CPU memory (no copy for a contiguous CPU tensor)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()
