"""Row geometry of flat slices: partial row sums from arbitrary cuts add up to exact GC."""

from __future__ import annotations

import pytest
import torch

from lightning_gc.layouts import RowLayout
from lightning_gc.sharding.flat_rows import FlatRows, RowSlice

# (shape, channels_last, layout): linear, conv, channels-last conv, transposed conv, grouped transposed conv
CASES = [
    ((15, 13), False, RowLayout()),
    ((7, 3, 5), False, RowLayout()),
    ((5, 3, 3, 3), True, RowLayout()),
    ((5, 7, 3), False, RowLayout(out_dims=(1,))),
    ((6, 3, 2, 2), False, RowLayout(out_dims=(1,), groups=3)),
    ((6, 3, 2, 2), True, RowLayout(out_dims=(1,), groups=3)),
    ((9, 7), False, RowLayout(out_dims=(1,))),  # transformers' Conv1D: stored (in, out)
    ((3, 4, 5), False, RowLayout(out_dims=(0, 2))),  # expert-stacked (experts, in, out)
]


def _reference_gc(g: torch.Tensor, layout: RowLayout, mode: str) -> torch.Tensor:
    """GC written out per layout, independent of lightning_gc.centralize."""
    if mode == "tensor":
        return g - g.mean()
    if layout.groups > 1:
        v = g.reshape(layout.groups, g.shape[0] // layout.groups, *g.shape[1:])
        dims = (1, *range(3, v.ndim))
        return (v - v.mean(dim=dims, keepdim=True)).reshape(g.shape)
    averaged = tuple(d for d in range(g.ndim) if d not in layout.out_dims)
    return g - g.mean(dim=averaged, keepdim=True)


def _storage_flat(t: torch.Tensor) -> torch.Tensor:
    return t.as_strided((t.numel(),), (1,))


@pytest.mark.parametrize("mode", ["channel", "tensor"])
@pytest.mark.parametrize(("shape", "channels_last", "layout"), CASES)
def test_slices_cut_anywhere_give_exact_gc(shape, channels_last, layout, mode) -> None:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(shape, dtype=torch.float64, generator=gen)
    if channels_last:
        g = g.to(memory_format=torch.channels_last)
    rows = FlatRows(tuple(g.shape), tuple(g.stride()), layout, mode)
    flat = _storage_flat(g).clone()
    for trial in range(5):
        cuts = sorted(torch.randperm(flat.numel() - 1, generator=gen)[: trial + 1].add(1).tolist())
        bounds = [0, *cuts, flat.numel()]
        pieces = [(RowSlice(rows, a, b), flat[a:b].clone()) for a, b in zip(bounds, bounds[1:])]
        totals = torch.zeros(rows.rows, dtype=torch.float64)
        for piece, values in pieces:
            totals[piece.first_row : piece.first_row + piece.local_rows] += piece.sums(values, torch.float64)
        means = totals / rows.row_numel
        out = torch.empty_like(g)
        for (piece, values), (a, b) in zip(pieces, zip(bounds, bounds[1:])):
            piece.subtract_(values, means[piece.first_row : piece.first_row + piece.local_rows])
            _storage_flat(out)[a:b] = values
        torch.testing.assert_close(out, _reference_gc(g, layout, mode), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("shape", "channels_last", "layout"), CASES)
def test_cut_rows_are_exactly_rows_with_entries_on_both_sides(shape, channels_last, layout) -> None:
    g = torch.empty(shape)
    if channels_last:
        g = g.to(memory_format=torch.channels_last)
    rows = FlatRows(tuple(g.shape), tuple(g.stride()), layout)
    ids = rows.row_ids(0, rows.numel)
    for boundary in range(1, rows.numel):
        both = set(ids[:boundary].tolist()) & set(ids[boundary:].tolist())
        if rows.rows_are_blocks:
            assert rows.cut_rows([boundary]) == sorted(both)
        else:  # interleaved rows: all are shared, a superset
            assert set(rows.cut_rows([boundary])) >= both


def test_low_precision_slices_accumulate_in_float32() -> None:
    rows = FlatRows((3, 1000), (1000, 1))
    values = torch.full((2500,), 1.0 + 2**-7, dtype=torch.bfloat16)
    sums = RowSlice(rows, 250, 2750).sums(values, torch.float32)
    assert sums.dtype == torch.float32
    assert sums.tolist() == pytest.approx([750 * (1 + 2**-7), 1000 * (1 + 2**-7), 750 * (1 + 2**-7)])


def test_block_rows_need_no_index() -> None:
    piece = RowSlice(FlatRows((15, 13), (13, 1)), 5, 100)
    assert piece._ids is None and (piece.first_row, piece.local_rows) == (0, 8)


def test_non_dense_strides_and_empty_slices_are_rejected() -> None:
    with pytest.raises(ValueError, match="not those of a dense tensor"):
        FlatRows((4, 4), (8, 1))
    with pytest.raises(ValueError, match="empty or outside"):
        RowSlice(FlatRows((4, 4), (4, 1)), 3, 3)
    with pytest.raises(ValueError, match="empty or outside"):
        RowSlice(FlatRows((4, 4), (4, 1)), 10, 17)
