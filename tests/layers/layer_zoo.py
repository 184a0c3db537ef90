"""The layer zoo's checking machinery: offset gradients, a float64 reference, and a table of true axes.

Everything here is written from each layer's documented storage, independently of lightning_gc's registry:
a test lists, per parameter name pattern, the dims of the stored weight that index output units (or that
the parameter must be left alone), and :func:`check_centralization` compares what
``lightning_gc.centralize_gradients`` did against a unit-by-unit float64 reference.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import lightning_gc


@dataclass(frozen=True)
class Units:
    """The truth for one parameter: GC centralizes it within each output unit.

    Args:
        out_dims: the dims of the stored tensor that index output units.
        groups: dim 0 holds this many blocks of inputs, each seen only by its own units (grouped transposed
            convolutions, DBRX's ``w2``): a unit's mean is taken within its block.
    """

    out_dims: tuple[int, ...]
    groups: int = 1

    def averaged_dims(self, ndim: int) -> tuple[int, ...]:
        """The dims GC averages over (dim 0 within its block when ``groups > 1``)."""
        return tuple(d for d in range(ndim) if d not in self.out_dims)


@dataclass(frozen=True)
class Skip:
    """The truth for one parameter: GC must leave it alone (``why`` is for the reader and describe checks)."""

    why: str


Truth = Units | Skip
DIM0 = Units((0,))
SKIP_BIAS = Skip("bias")
SKIP_NORM = Skip("normalization scale/shift")
SKIP_EMBEDDING = Skip("embedding table")
SKIP_TOKEN = Skip("token / position embedding / table")
SKIP_SCALE = Skip("scale whose averaged dims all have size 1, or a per-channel scale")


def offset_gradient(shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """A float64 gradient whose mean differs along every axis: noise plus a random offset per index of each axis.

    Real gradients behind a LayerNorm or softmax are often centered along some axis already, which would hide
    a GC that averages along the wrong one; per-axis offsets make every choice of axes give a different result.
    """
    grad = torch.randn(tuple(shape), generator=generator, dtype=torch.float64)
    for axis, size in enumerate(shape):
        offsets = 1.0 + axis + torch.rand(size, generator=generator, dtype=torch.float64) * 3.0
        view = [1] * len(shape)
        view[axis] = size
        grad += offsets.view(view)
    return grad


def reference_centralized(grad: Tensor, truth: Units) -> Tensor:
    """``grad`` with each output unit's mean removed, one unit at a time, in float64."""
    g = grad.detach().to(torch.float64).clone()
    if g.dim() == 0:
        return g
    block = g.shape[0] // truth.groups
    group_ranges = (
        [range(g.shape[0])] if truth.groups == 1 else [range(k * block, (k + 1) * block) for k in range(truth.groups)]
    )
    for rows in group_ranges:
        for unit in itertools.product(*(range(g.shape[d]) for d in truth.out_dims)):
            index: list[object] = [slice(None)] * g.dim()
            for d, i in zip(truth.out_dims, unit):
                index[d] = i
            if 0 not in truth.out_dims:
                index[0] = slice(rows.start, rows.stop)
            cell = g[tuple(index)]
            g[tuple(index)] = cell - cell.mean()
    return g


def truth_for(name: str, table: Sequence[tuple[str, Truth]]) -> Truth:
    """The first entry of ``table`` whose ``fnmatch`` pattern matches ``name``; every name must have one."""
    for pattern, truth in table:
        if fnmatch.fnmatchcase(name, pattern):
            return truth
    raise AssertionError(f"the test's table has no entry for parameter {name!r}: add its true output axes")


def set_offset_gradients(model: nn.Module, seed: int = 0) -> dict[str, Tensor]:
    """Give every parameter an offset gradient (float64 parameters); return copies of the originals by name."""
    generator = torch.Generator().manual_seed(seed)
    originals = {}
    for name, param in model.named_parameters():
        assert param.dtype == torch.float64, f"{name}: build the zoo in float64 (model.double())"
        param.grad = offset_gradient(param.shape, generator)
        originals[name] = param.grad.clone()
    return originals


def check_centralization(
    model: nn.Module,
    table: Sequence[tuple[str, Truth]],
    originals: dict[str, Tensor],
) -> dict[str, Truth]:
    """Compare every gradient of ``model`` (after GC) with the reference its true layout gives; return the truths.

    Centralized parameters must equal the unit-by-unit reference (float64, 1e-12); skipped parameters must be
    bit-for-bit untouched; no gradient may end up all zeros, and no output unit's gradient either.
    """
    truths: dict[str, Truth] = {}
    failures = []
    for name, param in model.named_parameters():
        truth = truth_for(name, table)
        truths[name] = truth
        before, after = originals[name], param.grad
        assert after is not None
        if isinstance(truth, Skip):
            if not torch.equal(after, before):
                failures.append(f"{name} {tuple(param.shape)}: must be left alone ({truth.why}), but GC changed it")
            continue
        expected = reference_centralized(before, truth)
        if not torch.allclose(after, expected, rtol=1e-12, atol=1e-12):
            failures.append(f"{name} {tuple(param.shape)}: not centralized within units along {truth.out_dims}")
        assert_no_unit_zeroed(name, after, truth)
    assert not failures, "\n".join(failures)
    return truths


def assert_no_unit_zeroed(name: str, grad: Tensor, truth: Units) -> None:
    """GC must never zero a whole output unit (it would stop training): every unit keeps a non-zero entry."""
    dims = truth.averaged_dims(grad.dim())
    assert dims, f"{name}: a unit with nothing to average over must be skipped, not centralized"
    magnitude = (
        grad.abs().amax(dim=dims)
        if truth.groups == 1
        else grad.unflatten(0, (truth.groups, -1)).abs().amax(dim=tuple(d + 1 for d in dims))
    )
    assert bool((magnitude > 0).all()), f"{name}: GC zeroed the gradient of some output unit"


def check_report(report: object, truths: dict[str, Truth]) -> None:
    """``lightning_gc.describe``'s rows agree with the truths: decision, and the averaged dims where centralized."""
    rows = {row.name: row for row in report.rows}  # type: ignore[attr-defined]
    assert set(rows) == set(truths), f"report names differ: {sorted(set(rows) ^ set(truths))}"
    wrong = []
    for name, truth in truths.items():
        row = rows[name]
        if isinstance(truth, Skip):
            if row.decision != "skipped":
                wrong.append(f"{name}: reported {row.decision} {row.dims}, must be skipped ({truth.why})")
        elif row.decision == "skipped" or row.dims != truth.averaged_dims(len(row.shape)):
            wrong.append(
                f"{name}: reported {row.decision} {row.dims} ({row.reason}), truth averages {truth.averaged_dims(len(row.shape))}"
            )
    assert not wrong, "\n".join(wrong)


def run_and_check(
    model: nn.Module,
    table: Sequence[tuple[str, Truth]],
    centralize: Callable[[nn.Module], object],
    seed: int = 0,
    **gc_options: object,
) -> dict[str, Truth]:
    """Offset gradients, ``centralize(model)``, then :func:`check_centralization` and the describe() report."""
    originals = set_offset_gradients(model, seed)
    centralize(model)
    truths = check_centralization(model, table, originals)
    check_report(lightning_gc.describe(model, **gc_options), truths)
    return truths
