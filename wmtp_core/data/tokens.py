"""What the data pipeline needs from a tokenizer: the interface only. The tokenizers themselves live with the models
(wmtp_core.models.tokenizer's ByteTokenizer, wmtp_core.models.hf_tokenizer's adapter)."""

from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    pad_id: int
    bos_id: int | None
    eos_id: int | None

    @property
    def vocab_size(self) -> int: ...

    @property
    def vocabulary_digest(self) -> str:
        """Identifies the vocabulary itself (tokens and ids), so two tokenizers can be compared."""
        ...

    def encode(self, text: str, *, add_special: bool = True) -> list[int]: ...
