"""Labelled texts and deterministic splits, shared by both data sources."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

LABEL_NAMES = ("negative", "positive")


@dataclass
class LabelledTexts:
    """Reviews with their labels (``0`` negative, ``1`` positive), in a fixed order.

    Example:
        >>> part = LabelledTexts(["Dull.", "A delight."], [0, 1])
        >>> part.subset([1]).texts
        ['A delight.']
    """

    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"`texts` ({len(self.texts)}) and `labels` ({len(self.labels)}) differ in length")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        """The texts at ``indices``, in that order."""
        return LabelledTexts([self.texts[i] for i in indices], [self.labels[i] for i in indices])


def split(corpus: LabelledTexts, fractions: Sequence[float], seed: int) -> list[LabelledTexts]:
    """Shuffle with ``seed`` and cut into parts of the given fractions; the rest is the first part.

    The same corpus and seed always give the same parts, whatever the global random state (so every
    seed of a baseline/GC comparison sees the same validation and test sets).

    Args:
        corpus: the texts to split.
        fractions: sizes of the parts after the first, e.g. ``(0.1, 0.1)`` for train/val/test 80/10/10.
        seed: the shuffling seed.

    Raises:
        ValueError: if a fraction is outside ``(0, 1)`` or they leave nothing for the first part.

    Example:
        >>> train, test = split(LabelledTexts(list("abcdefghij"), [0] * 10), (0.2,), seed=0)
        >>> len(train), len(test), sorted(train.texts + test.texts) == list("abcdefghij")
        (8, 2, True)
    """
    if any(not 0.0 < f < 1.0 for f in fractions) or sum(fractions) >= 1.0:
        raise ValueError(f"split fractions must each be in (0, 1) and sum to less than 1, got {list(fractions)}")
    order = list(range(len(corpus)))
    random.Random(seed).shuffle(order)
    sizes = [round(f * len(corpus)) for f in fractions]
    parts, start = [], len(corpus) - sum(sizes)
    parts.append(corpus.subset(order[:start]))
    for size in sizes:
        parts.append(corpus.subset(order[start : start + size]))
        start += size
    return parts
