"""The fused CPU kernel (lightning_gc.native) against float64 references computed one output unit at a time."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from kernel_calls import call_kernel
from reference import gc_reference, row_mean_reference, ulp_tolerance
from torch import nn

from lightning_gc import native
from lightning_gc.config import GCConfig
from lightning_gc.native.route import NativeRoute
from lightning_gc.plan import GCPlan, dense_plan
from lightning_gc.selection import select

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture
def fused(monkeypatch: pytest.MonkeyPatch) -> native.build.Kernel:
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    kernel = native.kernel()
    if kernel is None:
        pytest.skip(f"fused kernel unavailable: {native.status().reason}")
    return kernel


def offset_grad(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random entries around a large per-unit offset, so that an error in a mean shows."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=generator, dtype=torch.float64) * 5
    return (torch.randn(shape, generator=generator, dtype=torch.float64) + offsets).to(dtype)


def half_supported(kernel, dtype: torch.dtype) -> None:
    if dtype == torch.float16 and not kernel.supports_float16:
        pytest.skip("this CPU converts float16 in software: the kernel leaves float16 to the eager route")


# row lengths around the 8 summation lanes and the 256-entry half-precision chunks
SHAPES = [(5, 1), (3, 7), (4, 8), (6, 255), (2, 257), (64, 3, 7, 7), (9, 4, 3, 3), (3, 1000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["channel", "tensor"])
def test_kernel_matches_reference(fused, dtype, shape, mode):
    half_supported(fused, dtype)
    grad = offset_grad(shape, dtype)
    expected = gc_reference(grad, mode=mode)
    call_kernel(fused, [grad], unit_dim=0 if mode == "channel" else None)
    torch.testing.assert_close(grad.double(), expected, **ulp_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_one_rounding_of_the_float32_difference(fused, dtype):
    """Sums of half-precision values are exact in float64, so the expected bits are known exactly."""
    half_supported(fused, dtype)
    grad = offset_grad((16, 300), dtype, seed=3)
    grad[3, 5], grad[4, 0], grad[5, 7] = float("inf"), float("-inf"), float("nan")
    mean = (grad.double().sum(dim=1, keepdim=True) / grad.shape[1]).float()
    expected = (grad.float() - mean).to(dtype)
    call_kernel(fused, [grad])
    assert torch.equal(grad.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(grad[finite], expected[finite])


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_decay_compensation(fused, dtype):
    half_supported(fused, dtype)
    grad, weight = offset_grad((12, 5, 3, 3), dtype, 1), offset_grad((12, 5, 3, 3), dtype, 2)
    expected = gc_reference(grad) - 0.3 * row_mean_reference(weight)
    call_kernel(fused, [grad], weights=[weight], coefficient=0.3)
    torch.testing.assert_close(grad.double(), expected, **ulp_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_split_rows_without_changing_a_bit(fused, dtype):
    shapes = [(33, 17), (1, 500), (64, 3, 7, 7), (7, 1), (130, 64)]
    source = [offset_grad(s, dtype, seed=i) for i, s in enumerate(shapes)]
    results, removed = [], []
    for threads in (1, 2, 3, 8):
        grads = [g.clone() for g in source]
        removed.append(call_kernel(fused, grads, threads=threads, min_per_thread=1))
        results.append(grads)
    for grads in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], grads))
    assert removed == pytest.approx([removed[0]] * 4, rel=1e-12)
    expected_removed = sum((g.double() - gc_reference(g)).square().sum().item() for g in source)
    assert removed[0] == pytest.approx(expected_removed, rel=1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_sq_from_the_same_pass_matches_float64(fused, dtype):
    """The squared norm before GC, summed in float64 by the kernel, for every dtype and thread count."""
    half_supported(fused, dtype)
    shapes = [(33, 17), (1, 500), (64, 3, 7, 7), (7, 1), (6, 257), (130, 64)]
    source = [offset_grad(s, dtype, seed=i) for i, s in enumerate(shapes)]
    expected_grad_sq = sum(g.double().square().sum().item() for g in source)
    expected_removed = sum((g.double() - gc_reference(g)).square().sum().item() for g in source)
    results, sums = [], []
    for threads in (1, 2, 3, 8):
        grads, grad_sq = [g.clone() for g in source], []
        removed = call_kernel(fused, grads, threads=threads, min_per_thread=1, grad_sq=grad_sq)
        results.append(grads)
        sums.append(grad_sq[0])
        assert grad_sq[0] == pytest.approx(expected_grad_sq, rel=1e-12)  # float64 sums of exact squares
        assert removed == pytest.approx(expected_removed, rel=1e-2 if dtype != torch.float64 else 1e-12)
    for grads in results[1:]:  # asking for the norm changes no bit of the result, for any thread count
        assert all(torch.equal(a, b) for a, b in zip(results[0], grads))
    plain = [g.clone() for g in source]
    call_kernel(fused, plain, threads=3, min_per_thread=1)
    assert all(torch.equal(a, b) for a, b in zip(results[0], plain))


def test_grad_sq_skips_skipped_jobs(fused):
    grads = [offset_grad((4, 9), torch.float32, seed) for seed in range(3)]
    expected = sum(g.double().square().sum().item() for j, g in enumerate(grads) if j != 1)
    grad_sq: list[float] = []
    call_kernel(fused, grads, threads=2, skip={1}, grad_sq=grad_sq)
    assert grad_sq[0] == pytest.approx(expected, rel=1e-12)


def test_a_zero_pointer_skips_its_job(fused):
    grads = [offset_grad((4, 9), torch.float32, seed) for seed in range(3)]
    untouched = grads[1].clone()
    call_kernel(fused, grads, threads=2, skip={1})
    assert torch.equal(grads[1], untouched)
    torch.testing.assert_close(grads[0].sum(dim=1), torch.zeros(4), atol=1e-5, rtol=0)


# --- the route: which units it takes, what it declines ------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(40, 30)
        self.conv = nn.Conv2d(3, 8, 3)
        self.grouped_up = nn.ConvTranspose2d(6, 9, 2, groups=3)  # output units are not contiguous
        self.up = nn.ConvTranspose2d(4, 5, 2)  # (in, out, k, k): output channel is dim 1, strided


def fill(model: nn.Module, seed: int = 0, channels_last: bool = False) -> dict[str, torch.Tensor]:
    for index, (name, p) in enumerate(model.named_parameters()):
        grad = offset_grad(tuple(p.shape), p.dtype, seed * 100 + index)
        p.grad = grad.contiguous(memory_format=torch.channels_last) if channels_last and grad.ndim == 4 else grad
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}


def expected_gc(name: str, grad: torch.Tensor) -> torch.Tensor:
    if grad.ndim < 2:
        return grad
    if "up" in name:
        return gc_reference(grad, out_dim=1, groups=3 if "grouped" in name else 1)
    return gc_reference(grad)


def test_route_takes_contiguous_units_and_leaves_the_rest_to_the_eager_route(fused):
    model = Net()
    plan = dense_plan(model)
    route = plan._executor.native
    assert isinstance(route, NativeRoute)
    names = [name for name, p in model.named_parameters() if p.ndim >= 2]
    assert [names[i] for i in route.indices] == ["linear.weight", "conv.weight"]
    before = fill(model)
    plan.apply()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected_gc(name, before[name]), **ulp_tolerance(torch.float32))


def test_gradient_with_other_strides_than_its_parameter_is_declined_and_still_centralized(fused):
    model = Net()
    model.conv.weight.data = model.conv.weight.data.contiguous(memory_format=torch.channels_last)
    plan = dense_plan(model)
    assert len(plan._executor.native.indices) == 2  # channels_last units are contiguous too
    for channels_last in (True, False):  # matching strides, then contiguous grads: declined, eager
        before = fill(model, seed=int(channels_last), channels_last=channels_last)
        plan.apply()
        torch.testing.assert_close(model.conv.weight.grad.double(), expected_gc("conv", before["conv.weight"]),
                                   **ulp_tolerance(torch.float32))  # fmt: skip


def test_float16_stays_eager_where_the_cpu_cannot_convert_it(fused, monkeypatch):
    monkeypatch.setattr(fused, "supports_float16", False)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).half())
    plan = dense_plan(model)
    assert plan._executor.native.indices == [0]
    before = fill(model, seed=5)
    plan.apply()
    torch.testing.assert_close(model[1].weight.grad.double(), gc_reference(before["1.weight"]),
                               **ulp_tolerance(torch.float16))  # fmt: skip


def test_decayed_units_use_the_current_weights_and_loss_scale(fused):
    model = nn.Linear(20, 6)
    targets = [replace(t, decay=0.1) for t in select(model, GCConfig()).targets]
    plan = GCPlan(targets, "channel")
    assert plan._executor.native.decayed == [0]
    for step in range(2):
        with torch.no_grad():
            model.weight.copy_(offset_grad((6, 20), torch.float32, seed=10 + step))
        before = fill(model, seed=step)
        plan.apply(grad_scale=4.0)
        expected = gc_reference(before["weight"]) - 0.1 * 4.0 * row_mean_reference(model.weight)
        torch.testing.assert_close(model.weight.grad.double(), expected, **ulp_tolerance(torch.float32))


def test_written_gradients_count_as_modified_in_place(fused):
    model = nn.Linear(10, 4)
    plan = dense_plan(model)
    fill(model)
    version = model.weight.grad._version
    plan.apply()
    assert model.weight.grad._version > version  # autograd's saved-tensor checks see the change


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")
def test_gradients_that_require_grad_take_the_differentiable_eager_route(fused):
    model = nn.Linear(6, 3)
    plan = dense_plan(model)
    x = torch.randn(5, 6)
    (model(x) ** 2).sum().backward(create_graph=True)
    grad = model.weight.grad
    assert grad.requires_grad
    expected = gc_reference(grad)
    plan.apply()
    torch.testing.assert_close(model.weight.grad.double(), expected, **ulp_tolerance(torch.float32))
    assert model.weight.grad.grad_fn is not None  # the subtraction is part of the graph, as with eager GC
    model.zero_grad(set_to_none=True)  # breaks the parameter-gradient reference cycle


@pytest.mark.parametrize("native_on", ["1", "0"])
def test_plan_stats_match_float64_whichever_route_takes_a_gradient(monkeypatch, native_on):
    """grad_sq and removed_sq of plan.apply: kernel rows, stacked small ones, a grouped transposed conv (eager)
    and a gradient the kernel declines at run time (a transposed copy), against float64."""
    monkeypatch.setenv(native.ENV_SWITCH, native_on)
    model = nn.Sequential(
        nn.Linear(40, 30), nn.Linear(3, 3), nn.Linear(3, 3), nn.ConvTranspose2d(4, 6, 3, groups=2), nn.Conv2d(6, 8, 3)
    )
    plan = dense_plan(model)
    executor = plan._executor
    assert executor.singles and (executor.stacks or native_on == "1")  # the eager routes take some either way
    assert (executor.native is not None) == (native_on == "1")
    for i, param in enumerate(p for p in model.parameters() if p.ndim > 1):
        param.grad = offset_grad(tuple(param.shape), torch.float32, seed=10 + i)
    conv = model[4].weight
    conv.grad = conv.grad.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels_last: still rows
    model[0].weight.grad = model[0].weight.grad.t().contiguous().t()  # units are strided: declined to eager
    grads = [t.param.grad.double().clone() for t in plan.targets]
    expected_grad_sq = sum(g.square().sum().item() for g in grads)
    stats = plan.apply(compute_stats=True)
    # what was removed, read off the centralized gradients (their values are checked against float64 elsewhere)
    removed = sum((g - t.param.grad.double()).square().sum().item() for g, t in zip(grads, plan.targets))
    assert stats.grad_sq.item() == pytest.approx(expected_grad_sq, rel=1e-6)
    assert stats.removed_sq.item() == pytest.approx(removed, rel=1e-4)
