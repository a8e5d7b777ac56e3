"""A byte-level tokenizer for the built-in model: every UTF-8 byte is a token, plus pad/bos/eos. No downloads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ByteTokenizer:
    """Token ids 0-255 are bytes; 256 is padding, 257 begins and 258 ends a sequence."""

    pad_id: int = 256
    bos_id: int = 257
    eos_id: int = 258

    @property
    def vocab_size(self) -> int:
        return 259

    def encode(self, text: str, *, add_special: bool = True) -> list[int]:
        """Text to ids; with add_special the ids are wrapped in bos ... eos."""
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids, self.eos_id] if add_special else ids

    def decode(self, ids: list[int]) -> str:
        """Ids back to text; special ids are dropped and invalid UTF-8 is replaced, never raised."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
