"""The Triton kernel (lightning_gc.triton_kernel) on CPU tensors under Triton's interpreter, against float64.

Run by ``test_triton_kernel.py`` in a subprocess with ``TRITON_INTERPRET=1`` set before Triton is imported
(``python interpreted_checks.py CHECK``); prints ``ok``. float32, float64 and float16 only: the interpreter
converts float32 to bfloat16 by truncation, a GPU rounds to nearest even (``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lightning_gc.config import GCConfig
from lightning_gc.plan import GCPlan, dense_plan
from lightning_gc.triton_kernel import TritonRoute

TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}


def offset_grad(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    value = torch.randn(shape, generator=generator, dtype=torch.float64)
    for d, size in enumerate(shape):
        offsets = [1] * len(shape)
        offsets[d] = size
        value = value + 3 * torch.rand(offsets, generator=generator, dtype=torch.float64)
    return value.to(dtype)


def layers(count: int, dtype: torch.dtype) -> nn.Sequential:
    """Linear and conv weights with row lengths around the block sizes (16 .. 1024 and past it)."""
    shapes = [(3, 5), (7, 16), (5, 17), (4, 1023), (2, 1100), (6, 3, 3, 3)]
    mods: list[nn.Module] = []
    for k in range(count):
        shape = shapes[k % len(shapes)]
        mods.append(nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], shape[2]))
    return nn.Sequential(*mods).to(dtype)


def route_for(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[GCPlan, TritonRoute]:
    if optimizer is None:
        plan = dense_plan(model)
    else:
        plan = dense_plan(model, GCConfig(centralize_weight_decay=True), optimizer)
    route = TritonRoute(plan._executor.units, devices=("cpu",))
    return plan, route


def check_matches_float64(dtype: torch.dtype, channels_last: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    model = layers(6, dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    plan, route = route_for(model)
    grads = []
    for unit in plan._executor.units:
        grad = offset_grad(tuple(unit.param.shape), dtype, generator)
        unit.param.grad = (
            grad.contiguous(memory_format=torch.channels_last) if grad.ndim == 4 and channels_last else grad
        )
        grads.append(unit.param.grad)
    expected = [g.double() - g.double().mean(dim=tuple(range(1, g.ndim)), keepdim=True) for g in grads]
    removed: list[torch.Tensor] = []
    assert route.run(grads, 1.0, removed) == []
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad.double(), want, **TOLERANCE[dtype])
    assert len(removed) == 1


def check_removed_norm() -> None:
    generator = torch.Generator().manual_seed(1)
    model = layers(6, torch.float64)
    plan, route = route_for(model)
    grads = [offset_grad(tuple(u.param.shape), torch.float64, generator) for u in plan._executor.units]
    originals = [g.clone() for g in grads]
    removed: list[torch.Tensor] = []
    route.run(grads, 1.0, removed)
    expected = sum(float((o - g).square().sum()) for o, g in zip(originals, grads))
    assert abs(float(removed[0]) - expected) <= 1e-9 * expected, (float(removed[0]), expected)


def check_one_launch_per_dtype() -> None:
    counts = []
    for n in (2, 12, 40):
        model = nn.Sequential(layers(n, torch.float32), layers(n, torch.float64))
        plan, route = route_for(model)
        grads = [torch.randn(u.param.shape, dtype=u.param.dtype) + 1 for u in plan._executor.units]
        route.run(grads, 1.0, None)
        counts.append(route.launches)
    assert counts == [2, 2, 2], counts


def check_declines_what_it_was_not_planned_for() -> None:
    model = layers(3, torch.float32)
    plan, route = route_for(model)
    units = plan._executor.units
    grads: list[torch.Tensor | None] = [torch.randn(u.param.shape) + 1 for u in units]
    grads[0] = torch.randn(units[0].param.shape, dtype=torch.float64)  # another dtype
    grads[1] = torch.randn(tuple(reversed(units[1].param.shape))).t()  # other strides
    grads[2] = None
    kept = grads[0].clone()
    assert route.run(grads, 1.0, None) == [0, 1]
    assert torch.equal(grads[0], kept)


def check_weight_decay() -> None:
    generator = torch.Generator().manual_seed(2)
    model = layers(4, torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.25)
    plan, route = route_for(model, optimizer)
    units = plan._executor.units
    grads = [offset_grad(tuple(u.param.shape), torch.float32, generator) for u in units]
    expected = []
    for u, g in zip(units, grads):
        w = u.param.detach().double()
        decayed = g.double() + 0.25 * 2.0 * w  # a loss scale of 2 still in the gradient
        expected.append(decayed - decayed.mean(dim=1, keepdim=True) - 0.25 * 2.0 * w)
    assert all(u.decay == 0.25 for u in units)
    route.run(grads, 2.0, None)
    for g, want in zip(grads, expected):
        torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-5)


def check_plans_take_the_route_when_asked() -> None:
    """``LIGHTNING_GC_TRITON=1``: a plan's executor sends every row-layout gradient through one launch per dtype."""
    import os

    os.environ["LIGHTNING_GC_TRITON"] = "1"
    generator = torch.Generator().manual_seed(3)
    for count in (3, 30):
        model = nn.Sequential(layers(count, torch.float32), nn.ConvTranspose2d(4, 3, 2))
        plan = dense_plan(model)
        executor = plan._executor
        assert executor.triton is not None and len(executor.triton.indices) == count  # not the transposed conv
        assert executor.native is None or not executor.native.indices
        for unit in executor.units:
            unit.param.grad = offset_grad(tuple(unit.param.shape), torch.float32, generator)
        out_dims = [1 if isinstance(m, nn.ConvTranspose2d) else 0 for m in model.modules() if hasattr(m, "weight")]
        expected = []
        for unit, out_dim in zip(executor.units, out_dims):
            g = unit.param.grad.double()
            dims = tuple(d for d in range(g.ndim) if d != out_dim)
            expected.append(g - g.mean(dim=dims, keepdim=True))
        plan.apply()
        assert executor.triton.launches == 1, executor.triton.launches
        for unit, want in zip(executor.units, expected):
            torch.testing.assert_close(unit.param.grad.double(), want, **TOLERANCE[torch.float32])


CHECKS = {
    "plans": check_plans_take_the_route_when_asked,
    "float32": lambda: check_matches_float64(torch.float32, False),
    "float64": lambda: check_matches_float64(torch.float64, False),
    "float16": lambda: check_matches_float64(torch.float16, False),
    "channels_last": lambda: check_matches_float64(torch.float32, True),
    "removed_norm": check_removed_norm,
    "launches": check_one_launch_per_dtype,
    "declines": check_declines_what_it_was_not_planned_for,
    "weight_decay": check_weight_decay,
}

if __name__ == "__main__":
    CHECKS[sys.argv[1]]()
    print("ok")
