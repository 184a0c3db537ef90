"""The vocabulary: token <-> id, with a padding and an unknown token."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Optional

PAD = "<pad>"
UNK = "<unk>"


class Vocabulary:
    """Token ids: ``0`` is padding, ``1`` stands for every token not in the vocabulary.

    Args:
        tokens: every token in id order, starting with ``"<pad>"`` and ``"<unk>"``.

    Raises:
        ValueError: if ``tokens`` does not start with the two special tokens or repeats a token.

    Example:
        >>> vocab = Vocabulary.build([["a", "good", "film"], ["a", "bad", "film"]], min_freq=2)
        >>> vocab.tokens
        ['<pad>', '<unk>', 'a', 'film']
        >>> vocab.encode(["a", "great", "film"])
        [2, 1, 3]
    """

    pad_index = 0
    unk_index = 1

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if tokens[:2] != [PAD, UNK]:
            raise ValueError(f"`tokens` must start with {PAD!r} and {UNK!r}, got {tokens[:2]!r}")
        self._ids = {token: index for index, token in enumerate(tokens)}
        if len(self._ids) != len(tokens):
            raise ValueError("`tokens` must not repeat a token")
        self.tokens = tokens

    @classmethod
    def build(
        cls, tokenized_texts: Iterable[Sequence[str]], min_freq: int = 2, max_size: Optional[int] = None
    ) -> Vocabulary:
        """Keep the tokens seen at least ``min_freq`` times, most frequent first (ties alphabetically).

        Args:
            tokenized_texts: the token lists of the training split (never validation or test texts: their
                words must look unknown to the model, as unseen words will at prediction time).
            min_freq: minimum number of occurrences for a token to get its own id (at least 1).
            max_size: keep at most this many tokens besides the two special ones; ``None`` for no limit.

        Raises:
            ValueError: for ``min_freq < 1`` or ``max_size < 1``.
        """
        if isinstance(min_freq, bool) or not isinstance(min_freq, int) or min_freq < 1:
            raise ValueError(f"`min_freq` must be an integer >= 1, got {min_freq!r}")
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1):
            raise ValueError(f"`max_size` must be None or an integer >= 1, got {max_size!r}")
        counts: Counter[str] = Counter()
        for tokens in tokenized_texts:
            counts.update(tokens)
        kept = sorted(
            (t for t, c in counts.items() if c >= min_freq and t not in (PAD, UNK)), key=lambda t: (-counts[t], t)
        )
        return cls([PAD, UNK, *kept[:max_size]])

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Ids of ``tokens``; unknown tokens map to :attr:`unk_index`."""
        return [self._ids.get(token, self.unk_index) for token in tokens]

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens)"
