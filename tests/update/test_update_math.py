"""The correction itself: ``w_before + GC(w_after - w_before)`` against a float64 reference, every layout and route."""

from __future__ import annotations

import pytest
import torch
from reference import gc_reference
from torch import nn

from lightning_gc import update
from lightning_gc.config import GCConfig
from lightning_gc.update import UpdatePlan


class Layers(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.linear = nn.Linear(13, 7)
        self.conv = nn.Conv2d(3, 6, 3)
        self.up = nn.ConvTranspose2d(6, 4, 2, groups=2)  # weight (6, 2, 2, 2): outputs in dim 1, grouped
        self.rnn = nn.GRU(5, 3)
        self.to(dtype)


# name -> (out_dim, groups) as in tests/reference.py
LAYOUTS = {
    "linear.weight": (0, 1),
    "conv.weight": (0, 1),
    "up.weight": (1, 2),
    "rnn.weight_ih_l0": (0, 1),
    "rnn.weight_hh_l0": (0, 1),
}


class SetChange(torch.optim.Optimizer):
    """An optimizer whose step adds a given change (non-zero mean along every axis) to every parameter."""

    def __init__(self, params, changes: dict[int, torch.Tensor]) -> None:
        super().__init__(params, {})
        self.changes = changes

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(self.changes[id(p)].to(p.dtype))


def _change_like(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    shape = p.shape
    change = torch.randn(shape, generator=generator, dtype=torch.float64) * 0.01
    for dim in range(len(shape)):  # a non-zero mean along every axis
        ramp = torch.linspace(-0.02, 0.05, shape[dim], dtype=torch.float64)
        change = change + ramp.view([-1 if d == dim else 1 for d in range(len(shape))])
    return change


@pytest.fixture(params=["default", "tiny scratch"])
def scratch(request, monkeypatch):
    if request.param == "tiny scratch":  # 3 float64 entries: blocks of one unit, units sliced in chunks
        monkeypatch.setattr(update, "SCRATCH_MAX_BYTES", 24)
        monkeypatch.setattr(update, "SCRATCH_MIN_BYTES", 24)
    return request.param


TOLERANCE = {  # one rounding of the result into the weight's dtype (float32 accumulation for half)
    torch.float64: dict(rtol=1e-13, atol=1e-13),
    torch.float32: dict(rtol=1.2e-7, atol=1e-7),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-6),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["channel", "tensor"])
def test_correction_equals_the_reference_for_every_layout(dtype, mode, scratch):
    model = Layers(dtype)
    generator = torch.Generator().manual_seed(3)
    changes = {id(p): _change_like(p, generator) for p in model.parameters()}
    optimizer = SetChange(model.parameters(), changes)
    plan = UpdatePlan.for_optimizer(optimizer, model, GCConfig(mode=mode))
    assert sorted(w.name for w in plan.weights) == sorted(LAYOUTS)
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    plan.record()
    optimizer.step()
    after_step = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    # what the step wrote (rounded into dtype), before the correction; the correction is recomputed here
    for n, p in model.named_parameters():
        p.data.copy_(before[n])
    plan.record()
    optimizer.step()
    plan.correct()
    for name, p in model.named_parameters():
        if name not in LAYOUTS:
            torch.testing.assert_close(p.detach().double(), after_step[name], rtol=0, atol=0, msg=name)
            continue
        change = after_step[name] - before[name]
        expected = before[name] + gc_reference(change, *LAYOUTS[name], mode=mode)
        torch.testing.assert_close(p.detach().double(), expected, **TOLERANCE[dtype], msg=f"{name} {dtype} {mode}")


def test_correction_is_exact_for_non_contiguous_weights(scratch):
    weight = nn.Parameter(torch.randn(6, 5, 4, dtype=torch.float64).permute(2, 0, 1).contiguous().permute(1, 2, 0))
    assert not weight.is_contiguous()
    change = _change_like(weight, torch.Generator().manual_seed(5))
    optimizer = SetChange([weight], {id(weight): change})
    plan = UpdatePlan.for_optimizer(optimizer, None, GCConfig())
    before = weight.detach().clone()
    plan.record()
    optimizer.step()
    plan.correct()
    torch.testing.assert_close(weight.detach(), before + gc_reference(change), rtol=1e-13, atol=1e-13)


def test_extra_memory_is_one_sum_per_unit_plus_a_bounded_scratch():
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = UpdatePlan.for_optimizer(optimizer, model, GCConfig())
    weight_bytes = 2 * 1024 * 1024 * 4
    sum_bytes = 2 * 1024 * 8  # float64, one per output unit
    assert sum_bytes < plan.extra_bytes <= weight_bytes / 100
