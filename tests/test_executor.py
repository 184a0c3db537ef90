"""The executor (lightning_gc.executor): which route takes which unit, and every route against float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gc.compiled import compile_backend
from lightning_gc.executor import Executor
from lightning_gc.layouts import RowLayout
from lightning_gc.selection import Target
from lightning_gc.unit import Unit


def _skewed(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    for d in range(len(shape)):
        view = [1] * len(shape)
        view[d] = -1
        grad = grad + 2 * torch.randn(shape[d], generator=gen, dtype=torch.float64).view(view)
    return grad


def _units(layouts: list[tuple[tuple[int, ...], RowLayout]]) -> tuple[list[Unit], list[nn.Parameter]]:
    params = [nn.Parameter(torch.zeros(shape)) for shape, _ in layouts]
    units = [Unit.of(Target(p, f"p{i}", layout), "channel") for i, (p, (_, layout)) in enumerate(zip(params, layouts))]
    return units, params


LAYOUTS = [
    ((6, 5), RowLayout()),
    ((6, 5), RowLayout()),
    ((6, 5), RowLayout()),
    ((4, 3, 5), RowLayout((0, 2))),  # several output dims: never the kernel's rows
    ((6, 2, 3), RowLayout((1,), groups=3)),
    ((300, 200), RowLayout((1,))),
]


def test_every_unit_has_exactly_one_route(route):
    units, _ = _units(LAYOUTS)
    executor = Executor(units)
    native = set(executor.native.indices) if executor.native is not None else set()
    stacked = {i for s in executor.stacks for i in s.indices}
    singles = set(executor.singles)
    assert native | stacked | singles == set(range(len(units)))
    assert not (native & stacked or native & singles or stacked & singles)
    assert 3 not in native and 4 not in native
    if route == "native":
        assert {0, 1, 2} <= native


def test_every_route_matches_float64(route):
    units, params = _units(LAYOUTS)
    executor = Executor(units)
    grads = [_skewed(tuple(p.shape), i).float() for i, p in enumerate(params)]
    expected = []
    for grad, (_, layout) in zip(grads, LAYOUTS):
        g = grad.double()
        if layout.groups > 1:
            v = g.unflatten(0, (layout.groups, -1))
            expected.append((v - v.mean(dim=(1, 3), keepdim=True)).flatten(0, 1))
        else:
            dims = tuple(d for d in range(g.ndim) if d not in layout.out_dims)
            expected.append(g - g.mean(dim=dims, keepdim=True))
    removed: list[torch.Tensor] = []
    executor.run(list(grads), 1.0, removed)
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-5)
    removed_sq = sum(float(r) for r in removed)
    want_sq = sum(
        float((g.double() - w).square().sum())
        for g, w in zip([_skewed(tuple(p.shape), i) for i, p in enumerate(params)], expected)
    )
    assert removed_sq == pytest.approx(want_sq, rel=1e-4)


def test_missing_gradients_are_skipped():
    units, params = _units(LAYOUTS[:3])
    grads: list[torch.Tensor | None] = [_skewed((6, 5), 0).float(), None, None]
    Executor(units).run(grads, 1.0, None)
    assert grads[0] is not None and grads[0].sum(dim=1).abs().max() < 1e-5


def test_compile_backend_names():
    assert compile_backend(True) == "inductor"
    assert compile_backend("eager") == "eager"
    with pytest.raises(ValueError, match="`compile` must be True, False or a torch.compile backend name"):
        compile_backend("no-such-backend")


@pytest.mark.parametrize("grad_dtype", [torch.float64, torch.bfloat16])
def test_a_gradient_of_another_dtype_than_its_parameter_is_planned_by_the_gradient(grad_dtype, eager_route):
    layouts = [((6, 5), RowLayout()), ((6, 5), RowLayout()), ((600, 300), RowLayout((1,)))]
    units, params = _units(layouts)
    executor = Executor(units)
    grads = []
    for i, p in enumerate(params):
        p.grad_dtype = None  # type: ignore[attr-defined]  # torch lets the gradient keep its own dtype
        grads.append(_skewed(tuple(p.shape), i).to(grad_dtype))
    expected = []
    for grad, (_, layout) in zip(grads, layouts):
        g = grad.double()
        dims = tuple(d for d in range(g.ndim) if d not in layout.out_dims)
        expected.append(g - g.mean(dim=dims, keepdim=True))
    executor.run(list(grads), 1.0, None)
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if grad_dtype == torch.float64 else {"rtol": 1.6e-2, "atol": 1.6e-2 * 8}
    for grad, want in zip(grads, expected):
        assert grad.dtype == grad_dtype
        torch.testing.assert_close(grad.double(), want, **tolerance)
