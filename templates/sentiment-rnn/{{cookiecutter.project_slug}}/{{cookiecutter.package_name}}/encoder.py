"""Raw text to model input: tokenizer, vocabulary and truncation, saved together in every checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from .tokenizer import TOKENIZER_VERSION, tokenize
from .vocabulary import Vocabulary


@dataclass(frozen=True)
class TextEncoder:
    """Turns a raw review into token ids exactly as the training data was turned into ids.

    Args:
        vocabulary: built from the training split.
        max_length: keep the first ``max_length`` tokens of longer texts; ``None`` keeps all.

    Raises:
        ValueError: for ``max_length < 1``.

    Example:
        >>> encoder = TextEncoder(Vocabulary(["<pad>", "<unk>", "great", "!"]))
        >>> encoder.encode("Great!!"), encoder.encode("")
        ([2, 3, 3], [1])
    """

    vocabulary: Vocabulary
    max_length: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1
        ):
            raise ValueError(f"`max_length` must be None or an integer >= 1, got {self.max_length!r}")

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``: never empty, an empty or blank text becomes the single unknown token."""
        return self.encode_tokens(tokenize(text))

    def encode_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Ids of already tokenized text (``tokenize`` output), truncated; ``[unk]`` when there are none.

        A recurrent network needs at least one step, and an empty review says nothing: the unknown token
        makes the model answer with what it learned for "no usable words".
        """
        ids = self.vocabulary.encode(tokens[: self.max_length])
        return ids or [self.vocabulary.unk_index]

    def state_dict(self) -> dict[str, Any]:
        """Plain types only, so that ``torch.load(weights_only=True)`` reads checkpoints holding it."""
        return {"tokenizer": TOKENIZER_VERSION, "tokens": list(self.vocabulary.tokens), "max_length": self.max_length}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TextEncoder:
        """The encoder saved by :meth:`state_dict`.

        Raises:
            ValueError: when the state was written by another tokenizer version.
        """
        if state.get("tokenizer") != TOKENIZER_VERSION:
            raise ValueError(
                f"the saved text encoder used tokenizer version {state.get('tokenizer')!r}, this code has "
                f"{TOKENIZER_VERSION!r}: its token ids would not mean the same words; retrain the model"
            )
        return cls(Vocabulary(state["tokens"]), state["max_length"])
