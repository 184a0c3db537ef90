"""Token ids of a split held as one flat tensor, and the on-disk cache of a prepared data set."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from .corpus import LabelledTexts
from .encoder import TextEncoder
from .tokenizer import tokenize
from .vocabulary import Vocabulary


class EncodedSplit(Dataset):
    """Reviews as token ids: item ``i`` is ``(ids, label)``, ids truncated to ``max_length``.

    The ids of all reviews sit in one ``int32`` tensor with offsets (25,000 IMDB reviews would otherwise be
    25,000 small tensors, slow to save and load).

    Args:
        ids: every review's ids, concatenated.
        offsets: ``offsets[i]:offsets[i + 1]`` are review ``i``'s ids (``len(labels) + 1`` entries).
        labels: ``0`` negative, ``1`` positive.
        max_length: keep the first ``max_length`` ids of longer reviews; ``None`` keeps all.
    """

    def __init__(
        self, ids: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor, max_length: Optional[int] = None
    ):
        if offsets.numel() != labels.numel() + 1 or int(offsets[-1]) != ids.numel():
            raise ValueError("`offsets` must hold len(labels) + 1 positions, the last one len(ids)")
        self.ids, self.offsets, self.labels, self.max_length = ids, offsets, labels, max_length

    @classmethod
    def from_ids(
        cls, ids: Sequence[Sequence[int]], labels: Sequence[int], max_length: Optional[int] = None
    ) -> EncodedSplit:
        """Pack per-review id lists."""
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)
        offsets = torch.zeros(len(ids) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        flat = torch.tensor([i for x in ids for i in x], dtype=torch.int32)
        return cls(flat, offsets, torch.tensor(list(labels), dtype=torch.int64), max_length)

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        if self.max_length is not None:
            end = min(end, start + self.max_length)
        return self.ids[start:end].long(), int(self.labels[index])

    @property
    def lengths(self) -> list[int]:
        """Length of each item, after truncation (what batching sorts by)."""
        lengths = self.offsets[1:] - self.offsets[:-1]
        if self.max_length is not None:
            lengths = lengths.clamp(max=self.max_length)
        return lengths.tolist()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids, "offsets": self.offsets, "labels": self.labels}


def encode_splits(
    splits: dict[str, LabelledTexts], min_freq: int, max_vocab_size: Optional[int], max_length: Optional[int]
) -> tuple[TextEncoder, dict[str, EncodedSplit]]:
    """Tokenize every split, build the vocabulary from ``splits["train"]`` only, and encode them all.

    Args:
        splits: at least ``"train"``.
        min_freq: a training token's minimum count to enter the vocabulary.
        max_vocab_size: keep at most this many training tokens (most frequent); ``None`` keeps all.
        max_length: truncation of every review (the encoder applies it to raw text too).

    Example:
        >>> splits = {"train": LabelledTexts(["Great, great film!", "Bad film."], [1, 0]),
        ...           "test": LabelledTexts(["Great acting"], [1])}
        >>> encoder, encoded = encode_splits(splits, min_freq=2, max_vocab_size=None, max_length=None)
        >>> encoder.vocabulary.tokens, encoded["test"][0]
        (['<pad>', '<unk>', 'film', 'great'], (tensor([3, 1]), 1))
    """
    tokenized = {name: [tokenize(text) for text in part.texts] for name, part in splits.items()}
    vocabulary = Vocabulary.build(tokenized["train"], min_freq=min_freq, max_size=max_vocab_size)
    encoder = TextEncoder(vocabulary, max_length)
    # Store untruncated ids (encode_tokens truncates, so encode with no limit); truncation happens on read.
    full = TextEncoder(vocabulary)
    encoded = {
        name: EncodedSplit.from_ids([full.encode_tokens(t) for t in tokens], splits[name].labels, max_length)
        for name, tokens in tokenized.items()
    }
    return encoder, encoded


def save_prepared(path: str | Path, encoder: TextEncoder, splits: dict[str, EncodedSplit]) -> None:
    """Write the encoder and the encoded splits to ``path`` atomically (a half-written cache is never read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"encoder": encoder.state_dict(), "splits": {name: part.state_dict() for name, part in splits.items()}}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_prepared(path: str | Path, max_length: Optional[int]) -> tuple[TextEncoder, dict[str, EncodedSplit]]:
    """Read what :func:`save_prepared` wrote (plain tensors and lists only: ``weights_only`` loading).

    The cache holds untruncated ids, so ``max_length`` can change without preparing the data again.
    """
    state = torch.load(path, weights_only=True)
    encoder = TextEncoder(TextEncoder.from_state_dict(state["encoder"]).vocabulary, max_length)
    splits = {name: EncodedSplit(**part, max_length=max_length) for name, part in state["splits"].items()}
    return encoder, splits
