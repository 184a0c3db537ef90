"""Batches for packed sequences: reviews of similar length together, sorted longest first."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import BatchSampler, Sampler


@dataclass
class Batch:
    """Padded token ids sorted by decreasing length, as ``pack_padded_sequence`` wants them.

    Args:
        ids: ``(batch, longest)`` token ids, padded with ``0``.
        lengths: ``(batch,)`` number of real tokens per row, decreasing.
        labels: ``(batch,)`` float targets (``0.`` negative, ``1.`` positive).
        order: ``order[i]`` is the position in the incoming list of the example in row ``i``.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    order: torch.Tensor

    def __len__(self) -> int:
        return self.lengths.numel()


def collate(examples: Sequence[tuple[torch.Tensor, int]], pad_index: int = 0) -> Batch:
    """Sort ``(ids, label)`` examples longest first and pad them into a :class:`Batch`.

    Example:
        >>> batch = collate([(torch.tensor([5]), 0), (torch.tensor([7, 8, 9]), 1)])
        >>> batch.ids.tolist(), batch.lengths.tolist(), batch.order.tolist()
        ([[7, 8, 9], [5, 0, 0]], [3, 1], [1, 0])
    """
    if not examples:
        raise ValueError("`examples` must not be empty")
    lengths = torch.tensor([len(ids) for ids, _ in examples], dtype=torch.int64)
    if int(lengths.min()) < 1:
        raise ValueError("every example needs at least one token (encode empty texts as the unknown token)")
    order = torch.argsort(lengths, descending=True, stable=True)
    ids = torch.full((len(examples), int(lengths.max())), pad_index, dtype=torch.int64)
    for row, index in enumerate(order.tolist()):
        tokens = examples[index][0]
        ids[row, : len(tokens)] = torch.as_tensor(tokens)
    labels = torch.tensor([float(examples[i][1]) for i in order.tolist()])
    return Batch(ids=ids, lengths=lengths[order], labels=labels, order=order)


class BucketBatchSampler(BatchSampler):
    """Batches of similar lengths: take ``pool_batches`` batches' worth of indices from ``sampler``, sort them
    by length, cut into batches, and (when ``shuffle``) yield those batches in random order.

    Padding, and so wasted recurrent steps, shrinks to almost nothing while the order of the data stays
    random from epoch to epoch. The inner ``sampler`` is swapped by Lightning for a distributed one under DDP.

    Args:
        sampler: yields dataset indices (``RandomSampler`` for training, ``SequentialSampler`` otherwise).
        batch_size: examples per batch.
        drop_last: drop the last, smaller batch of each pool.
        lengths: length of every dataset item.
        pool_batches: how many batches are sorted together.
        shuffle: yield each pool's batches in random order (from the global torch generator, so seeded runs repeat).

    Example:
        >>> from torch.utils.data import SequentialSampler
        >>> lengths = [3, 1, 2, 5, 4]
        >>> list(BucketBatchSampler(SequentialSampler(lengths), 2, False, lengths, pool_batches=10, shuffle=False))
        [[3, 4], [0, 2], [1]]
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool,
        lengths: Sequence[int],
        pool_batches: int = 50,
        shuffle: bool = True,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if isinstance(pool_batches, bool) or not isinstance(pool_batches, int) or pool_batches < 1:
            raise ValueError(f"`pool_batches` must be an integer >= 1, got {pool_batches!r}")
        self.lengths, self.pool_batches, self.shuffle = lengths, pool_batches, shuffle

    def __iter__(self) -> Iterator[list[int]]:
        pool: list[int] = []
        for index in self.sampler:
            pool.append(index)
            if len(pool) == self.batch_size * self.pool_batches:
                yield from self._batches(pool)
                pool = []
        if pool:
            yield from self._batches(pool)

    def __len__(self) -> int:
        pool = self.batch_size * self.pool_batches
        full, rest = divmod(len(self.sampler), pool)
        last = (rest // self.batch_size) if self.drop_last else -(-rest // self.batch_size)
        return full * self.pool_batches + last

    def _batches(self, pool: list[int]) -> Iterator[list[int]]:
        pool = sorted(pool, key=lambda i: -self.lengths[i])
        batches = [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        order: Optional[list[int]] = torch.randperm(len(batches)).tolist() if self.shuffle else None
        yield from (batches[i] for i in order) if order is not None else batches
