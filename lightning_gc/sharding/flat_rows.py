"""GC rows of a tensor flattened in storage order, and of any contiguous slice of it.

Flat-parameter strategies (FSDP1, DeepSpeed ZeRO) concatenate parameters in *storage* order and give each
rank one contiguous range of the result. A rank's slice of one parameter may cut GC rows (output units)
anywhere: :class:`FlatRows` says which rows a range boundary cuts, and :class:`RowSlice` computes per-row
partial sums of a slice and subtracts per-row means from it, without materializing the logical tensor.

Rows of a weight whose output dim is outermost in storage (linear, conv, RNN weights; any weight in
``mode="tensor"``) are consecutive blocks of the flat tensor: a slice needs three reductions and no index.
Other layouts (transposed convolutions and transformers' ``Conv1D``, whose output dim is dim 1) map
entries to rows through their strides, with a row-id per entry of the slice. What a row is comes from
:class:`~lightning_gc.layouts.RowLayout`, as everywhere else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gc.layouts import DIM0, Mode, RowLayout


@dataclass(frozen=True)
class FlatRows:
    """How the entries of a dense tensor, flattened in storage order, map to GC rows.

    Args:
        shape: the tensor's logical shape.
        strides: its strides (a dense, non-overlapping layout: contiguous, channels-last, permuted).
        layout: where its output units are.
        mode: ``"channel"`` (one row per output unit) or ``"tensor"`` (the whole tensor is one row).

    Raises:
        ValueError: when ``strides`` do not describe a dense, non-overlapping tensor of ``shape``.

    Example:
        >>> rows = FlatRows((3, 4), (4, 1))
        >>> rows.rows, rows.row_numel, rows.rows_are_blocks
        (3, 4, True)
        >>> rows.cut_rows([5, 8])  # entries 4|5 share row 1; 7|8 is a row boundary
        [1]
    """

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    layout: RowLayout = DIM0
    mode: Mode = "channel"

    def __post_init__(self) -> None:
        if not _is_dense(self.shape, self.strides):
            raise ValueError(f"`strides` {self.strides} are not those of a dense tensor of shape {self.shape}")

    @property
    def numel(self) -> int:
        """Entries in the tensor."""
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Number of GC rows (output units; 1 in ``"tensor"`` mode)."""
        return self.layout.output_units(self.shape, self.mode)

    @property
    def row_numel(self) -> int:
        """Entries per row: the count each row mean divides by."""
        return self.numel // self.rows

    @property
    def rows_are_blocks(self) -> bool:
        """Whether row ``r`` is exactly the flat range ``[r * row_numel, (r + 1) * row_numel)``."""
        if self.rows == 1:
            return True
        return self.layout.out_dims == (0,) and self.strides[0] == self.row_numel

    def cut_rows(self, boundaries: Iterable[int]) -> list[int]:
        """Rows that have entries on both sides of some flat position in ``boundaries``, sorted.

        A boundary ``b`` separates flat entries ``b - 1`` and ``b``; boundaries outside ``(0, numel)`` cut nothing.
        """
        inside = [b for b in boundaries if 0 < b < self.numel]
        if not inside:
            return []
        if not self.rows_are_blocks:
            return list(range(self.rows))  # rows interleave: every row may have entries on both sides
        length = self.row_numel
        return sorted({b // length for b in inside if b % length})

    def row_ids(self, start: int, stop: int, device: torch.device | None = None) -> Tensor:
        """The row of each flat entry in ``[start, stop)``, as int64."""
        flat = torch.arange(start, stop, device=device)
        if self.rows == 1:
            return torch.zeros_like(flat)
        unit = torch.zeros_like(flat)
        units = 1
        for dim in self.layout.out_dims:  # dense strides: the index along `dim` is (flat // stride) % size
            unit = unit * self.shape[dim] + (flat // self.strides[dim]) % self.shape[dim]
            units *= self.shape[dim]
        if self.layout.groups == 1:
            return unit
        # Grouped transposed conv: dim 0 holds `groups` blocks of input channels, each with its own outputs.
        group = (flat // self.strides[0]) % self.shape[0] // (self.shape[0] // self.layout.groups)
        return group * units + unit


class RowSlice:
    """The flat range ``[start, stop)`` of a :class:`FlatRows` tensor: per-row sums and in-place subtraction.

    Local rows are numbered ``0 .. local_rows - 1``; local row ``i`` is global row ``first_row + i``. For
    block rows these are the rows the slice touches; otherwise all rows of the tensor (untouched ones sum to 0).

    Args:
        rows: the tensor's row geometry.
        start, stop: the slice, in flat entries of the tensor.
        device: where row ids live (non-block layouts only).

    Example:
        >>> rows = FlatRows((3, 4), (4, 1))
        >>> piece = RowSlice(rows, 2, 9)  # entries 2..8: rows 0 (2 entries), 1 (4), 2 (1)
        >>> piece.first_row, piece.local_rows
        (0, 3)
        >>> piece.sums(torch.ones(7), torch.float32)
        tensor([2., 4., 1.])
    """

    def __init__(self, rows: FlatRows, start: int, stop: int, device: torch.device | None = None) -> None:
        if not 0 <= start < stop <= rows.numel:
            raise ValueError(f"slice [{start}, {stop}) is empty or outside a tensor of {rows.numel} entries")
        self.rows = rows
        self.numel = stop - start
        self._ids: Tensor | None = None
        if rows.rows_are_blocks:
            length = rows.row_numel
            self.first_row = start // length
            last_row = (stop - 1) // length
            self.local_rows = last_row - self.first_row + 1
            self._head = min(stop, (self.first_row + 1) * length) - start
            self._tail = stop - max(start, last_row * length) if self.local_rows > 1 else 0
        else:
            self.first_row, self.local_rows = 0, rows.rows
            self._ids = rows.row_ids(start, stop, device)

    def sums(self, flat: Tensor, dtype: torch.dtype) -> Tensor:
        """Per local row, the sum of ``flat``'s entries (the slice's values), accumulated in ``dtype``."""
        if self._ids is not None:
            return torch.zeros(self.local_rows, dtype=dtype, device=flat.device).index_add_(
                0, self._ids, flat.to(dtype)
            )
        if self.local_rows == 1:
            return flat.sum(dtype=dtype).reshape(1)
        head, tail = self._head, self._tail
        middle = flat[head : self.numel - tail].view(-1, self.rows.row_numel)
        return torch.cat(
            [
                flat[:head].sum(dtype=dtype).reshape(1),
                middle.sum(dim=1, dtype=dtype),
                flat[self.numel - tail :].sum(dtype=dtype).reshape(1),
            ]
        )

    def subtract_(self, flat: Tensor, values: Tensor) -> None:
        """Subtract ``values[i]`` from every entry of local row ``i`` of ``flat``, in place."""
        if self._ids is not None:
            flat.sub_(values.index_select(0, self._ids))
            return
        if self.local_rows == 1:
            flat.sub_(values[0])
            return
        head, tail = self._head, self._tail
        flat[:head].sub_(values[0])
        flat[head : self.numel - tail].view(-1, self.rows.row_numel).sub_(values[1:-1, None])
        flat[self.numel - tail :].sub_(values[-1])


def _is_dense(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    if len(shape) != len(strides):
        return False
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(shape, strides) if s > 1), key=lambda x: x[1]):
        if stride != expected:
            return False
        expected *= size
    return True
