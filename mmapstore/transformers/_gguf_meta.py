"""Typed reads of one architecture's GGUF metadata (``{arch}.{key}``), for
the architectures the runtime reads without transformers' GGUF loader."""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import FormatError

__all__ = ["ArchMetadata"]


@dataclass(frozen=True, slots=True)
class ArchMetadata:
    """The metadata of the GGUF file ``path`` under the key prefix ``architecture``."""

    path: str
    architecture: str
    metadata: dict[str, object]

    def get(self, key: str, default: object = None) -> object:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def has(self, key: str) -> bool:
        return f"{self.architecture}.{key}" in self.metadata

    def number(self, key: str, default: float | None = None) -> float:
        """``{arch}.{key}`` as a float; ``default`` where absent.

        Raises
        ------
        FormatError
            Absent with no default, or not a number.
        """
        value = self.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise FormatError(f"{self.path}: {self.architecture}.{key} must be a number, found {value!r}")
        return float(value)

    def integer(self, key: str, default: int | None = None, *, minimum: int = 0) -> int:
        """``{arch}.{key}`` as an integer of at least ``minimum``; ``default`` where absent
        (:class:`FormatError` where absent with no default, or not such an integer)."""
        value = self.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise FormatError(
                f"{self.path}: {self.architecture}.{key} must be an integer of at least {minimum}, found {value!r}"
            )
        return value

    def vocab_size(self) -> int | None:
        """``{arch}.vocab_size``, else the length of the token list (what llama.cpp writes), else None."""
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        value = self.get("vocab_size", len(tokens) if isinstance(tokens, list) else None)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def special_tokens(self) -> dict[str, object]:
        """``bos_token_id`` and ``eos_token_id`` as the file states them."""
        return {
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.metadata.get("tokenizer.ggml.eos_token_id"),
        }
