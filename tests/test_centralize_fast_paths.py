"""Every fast path of the GC implementation against a float64 reference written here.

Fast paths: blocks of output units (big tensors, any strides), a float32 scratch buffer for half precision on
CPU (including units bigger than the buffer), stacks of same-shape small tensors, the compiled route and its
fallback, and the plan cache of `centralize_gradients`. Memory is checked through the allocator's own
records; nothing here asserts a time.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lightning_gc import centralize_gradients
from lightning_gc.centralize import centralize_, row_mean
from lightning_gc.compiled import CompiledCentralizer
from lightning_gc.config import GCConfig
from lightning_gc.executor import Executor
from lightning_gc.functional import plan_for
from lightning_gc.layouts import RowLayout
from lightning_gc.native import kernel as native_kernel
from lightning_gc.plan import GCPlan, dense_plan
from lightning_gc.selection import select

HALF = (torch.float16, torch.bfloat16)
TOLERANCE = {
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
}


def unit_means(grad: torch.Tensor, out_dim: int = 0, groups: int = 1, mode: str = "channel") -> torch.Tensor:
    """Each entry replaced by the float64 mean of its output unit, computed one unit at a time."""
    g = grad.detach().double()
    means = torch.empty_like(g)
    if mode == "tensor":
        means.fill_(g.sum().item() / g.numel())
        return means
    if out_dim == 0:
        for o in range(g.shape[0]):
            means[o] = g[o].sum() / g[o].numel()
        return means
    block = g.shape[0] // groups
    for grp in range(groups):
        rows = slice(grp * block, (grp + 1) * block)
        for o in range(g.shape[1]):
            unit = g[rows, o]
            means[rows, o] = unit.sum() / unit.numel()
    return means


def reference(grad: torch.Tensor, out_dim: int = 0, groups: int = 1, mode: str = "channel") -> torch.Tensor:
    return grad.detach().double() - unit_means(grad, out_dim, groups, mode)


def native_fp16() -> bool:
    fused = native_kernel()
    return fused is not None and fused.supports_float16


def random_grad(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # an offset per output unit, so that the mean removed is large and errors in it would show
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 3).to(dtype)


def peak_allocated(fn) -> int:
    """Peak CPU bytes allocated during ``fn`` above the start, from the allocator's records."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return peak


# --- blocks of output units, any strides -------------------------------------------------------------------


STRIDED = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "transposed_storage": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),
    "every_other_column": lambda t: torch.cat([t, t], dim=-1)[..., ::2],
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", list(STRIDED))
@pytest.mark.parametrize("block_bytes", [64, 1 << 20])
def test_blocks_of_units_match_reference_for_any_strides(dtype, layout, block_bytes):
    grad = STRIDED[layout](random_grad((12, 5, 3, 4), dtype))
    expected_mean = unit_means(grad)[:, :1, :1, :1]
    expected = reference(grad)
    mean = centralize_(grad, block_bytes=block_bytes)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), expected, **TOLERANCE[dtype])
    assert mean.dtype == (torch.float32 if dtype in HALF else dtype)
    torch.testing.assert_close(mean.double(), expected_mean, **TOLERANCE[torch.float32 if dtype in HALF else dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("groups", [1, 3])
def test_grouped_transposed_layout_in_blocks(dtype, groups):
    grad = random_grad((6, 7, 3, 2), dtype)  # (in, out // groups, *k)
    expected = reference(grad, out_dim=1, groups=groups)
    centralize_(grad, RowLayout(out_dims=(1,), groups=groups), block_bytes=48)
    torch.testing.assert_close(grad.double(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["channel", "tensor"])
def test_units_bigger_than_the_block_are_done_in_slices(dtype, mode):
    grad = STRIDED["channels_last"](random_grad((3, 40, 6, 5), dtype))  # a unit is 1200 entries
    expected = reference(grad, mode=mode)
    centralize_(grad, mode=mode, block_bytes=400)  # 100 float32 entries of scratch
    torch.testing.assert_close(grad.double(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_row_mean_takes_no_float32_copy_on_cpu(dtype):
    grad = random_grad((256, 1024), dtype)
    mean = None

    def run():
        nonlocal mean
        mean = row_mean(grad, block_bytes=64 << 10)

    peak = peak_allocated(run)
    assert peak <= (64 << 10) + 256 * 4 * 2, peak  # the scratch and the means, far from 1 MiB of float32
    torch.testing.assert_close(mean.double(), unit_means(grad)[:, :1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_centralize_stays_within_its_block(dtype):
    grad = random_grad((256, 1024), dtype)
    expected = reference(grad)
    peak = peak_allocated(lambda: centralize_(grad, block_bytes=64 << 10))
    assert peak <= (64 << 10) + 256 * 4 * 2, peak
    torch.testing.assert_close(grad.double(), expected, **TOLERANCE[dtype])


def test_half_precision_subtracts_the_float32_mean_with_one_rounding():
    # rows of 1 + tiny: a mean rounded to bfloat16 first would leave a visible offset after subtraction
    grad = torch.full((4, 4096), 1.0, dtype=torch.bfloat16)
    grad[:, ::2] += 2**-7
    centralize_(grad, block_bytes=256)
    torch.testing.assert_close(grad.double().abs(), torch.full((4, 4096), 2**-8, dtype=torch.float64), rtol=0, atol=0)


# --- plans: stacks, singles, scratch, weight decay, stats --------------------------------------------------


class MixedNet(nn.Module):
    """Every route at once: same-shape small layers (stacks), a big linear (blocks), convs, grouped transposed
    conv, an excluded embedding, in the given dtype."""

    def __init__(self, dtype: torch.dtype, small: int = 7) -> None:
        super().__init__()
        self.small = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(small))
        self.big = nn.Linear(300, 700)
        self.conv = nn.Conv2d(3, 8, 3)
        self.up = nn.ConvTranspose2d(6, 9, 2, groups=3)
        self.embed = nn.Embedding(10, 4)
        self.to(dtype)


LAYOUT = {"up.weight": (1, 3)}


def fill_grads(model: nn.Module, seed: int, channels_last: bool = False, skip: tuple[str, ...] = ()) -> None:
    for index, (name, p) in enumerate(model.named_parameters()):
        if name in skip:
            p.grad = None
            continue
        grad = random_grad(tuple(p.shape), p.dtype, seed=seed * 1000 + index)
        if channels_last and grad.ndim == 4:
            grad = grad.contiguous(memory_format=torch.channels_last)
        p.grad = grad


def expected_after_gc(model: nn.Module, mode: str = "channel", decay: float = 0.0) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if p.ndim < 2 or name.startswith("embed"):
            out[name] = p.grad.double().clone()
            continue
        out_dim, groups = LAYOUT.get(name, (0, 1))
        out[name] = reference(p.grad, out_dim, groups, mode) - decay * unit_means(p.detach(), out_dim, groups, mode)
    return out


def check(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad.double(), expected[name], **TOLERANCE[p.dtype], msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["channel", "tensor"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_plan_routes_match_reference(dtype, mode, channels_last, route):
    model = MixedNet(dtype)
    plan = dense_plan(model, GCConfig(mode=mode))
    if route == "eager":
        assert plan._executor.stacks, "the small layers should be stacked"
    else:  # all but the grouped transposed conv, whose output units are not contiguous
        assert len(plan._executor.native.indices) == 9 - (dtype == torch.float16 and not native_fp16())
    for step in range(2):  # fresh gradient tensors every step, as after zero_grad(set_to_none=True)
        fill_grads(model, seed=step, channels_last=channels_last, skip=("small.3.weight",))
        expected = expected_after_gc(model, mode)
        stats = plan.apply(compute_stats=True)
        check(model, expected)
        assert stats.tensors == 9  # 6 of 7 small layers, big, conv, up


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stacks_below_the_parallel_grain_with_several_threads(dtype, eager_route):
    # 64x64 weights beside 8M other entries: the 1% budget allows 8+ per stack, the grain only 7
    model = nn.Sequential(*(nn.Linear(64, 64, bias=False) for _ in range(12)), nn.Linear(4096, 2048, bias=False))
    model.to(dtype)
    plan = dense_plan(model)
    (stack,) = plan._executor.stacks
    assert stack.serial_per_stack == 7 < stack.per_stack
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fill_grads(model, seed=6)
        expected = expected_after_gc(model)
        plan.apply()
    finally:
        torch.set_num_threads(threads)
    check(model, expected)


def test_stack_with_one_live_gradient_falls_back_to_the_single_route(eager_route):
    model = MixedNet(torch.float32, small=2)
    plan = dense_plan(model)
    assert plan._executor.stacks
    fill_grads(model, seed=4, skip=("small.0.weight",))
    expected = expected_after_gc(model)
    plan.apply()
    check(model, expected)


def test_mixed_dtypes_in_one_plan(route):
    model = MixedNet(torch.float32)
    model.small[:4].to(torch.bfloat16)
    model.big.to(torch.float16)
    model.up.to(torch.float64)
    plan = dense_plan(model)
    fill_grads(model, seed=3)
    expected = expected_after_gc(model)
    plan.apply()
    check(model, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stats_from_every_route_match_reference(dtype, route):
    model = MixedNet(dtype)
    plan = dense_plan(model)
    fill_grads(model, seed=5)
    centralized = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n}
    stats = plan.apply(compute_stats=True, grad_scale=4.0)
    after = {n: p.grad.double() for n, p in model.named_parameters() if n in centralized}
    grad_sq = sum(g.square().sum() for g in centralized.values()) / 16
    removed_sq = sum((centralized[n] - after[n]).square().sum() for n in centralized) / 16
    rtol = 1e-2 if dtype in HALF else 1e-4  # half: each tensor's norm is rounded to its dtype
    torch.testing.assert_close(stats.grad_sq.double(), grad_sq, rtol=rtol, atol=0)
    torch.testing.assert_close(stats.removed_sq.double(), removed_sq, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_weight_decay_compensation_on_blocked_and_staged_routes(dtype, eager_route):
    model = MixedNet(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(random_grad(tuple(p.shape), torch.float64, seed=p.numel()).to(dtype))
    targets = [replace(t, decay=0.1) for t in select(model, GCConfig()).targets]
    plan = GCPlan(targets, "channel")
    for unit in plan._executor.units:  # force blocks and the sliced route on every tensor
        unit.block_elements, unit.direct = 50, False
    fill_grads(model, seed=7)
    expected = expected_after_gc(model, decay=0.1 * 2.0)
    plan.apply(grad_scale=2.0)
    check(model, expected)


def test_plan_peak_memory_is_within_one_percent_of_gradient_bytes(route):
    model = nn.Sequential(*(nn.Linear(1024, 1024, bias=False) for _ in range(4)), nn.Linear(1024, 4096)).bfloat16()
    plan = dense_plan(model)
    fill_grads(model, seed=0)
    grad_bytes = sum(p.numel() * 2 for p in model.parameters() if p.ndim >= 2)
    units = 4 * 1024 + 4096
    peak = peak_allocated(plan.apply)
    assert peak <= grad_bytes // 100 + 8 * units, (peak, grad_bytes)


# --- the compiled route -------------------------------------------------------------------------------------


@pytest.fixture
def failing_backend():
    name = "lightning_gc_test_failing"
    if name not in torch._dynamo.list_backends(exclude_tags=()):

        @torch._dynamo.register_backend(name=name)
        def _fail(gm, example_inputs):
            raise RuntimeError("no C++ compiler in this test")

    return name


COMPILES: list[int] = []


@pytest.fixture
def counting_backend():
    """A backend that runs the captured graph as is and counts how often dynamo hands it one."""
    name = "lightning_gc_test_counting"
    if name not in torch._dynamo.list_backends(exclude_tags=()):

        @torch._dynamo.register_backend(name=name)
        def _count(gm, example_inputs):
            COMPILES.append(1)
            return gm.forward

    COMPILES.clear()
    return name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_route_matches_reference_and_compiles_once(dtype, counting_backend):
    torch._dynamo.reset()
    model = MixedNet(dtype, small=3)
    plan = dense_plan(model, GCConfig(compile=counting_backend))
    compiled = plan._executor.compiled
    for step in range(3):  # new gradient tensors every step: same layout, no recompilation
        fill_grads(model, seed=step)
        expected = expected_after_gc(model)
        stats = plan.apply(compute_stats=True)
        check(model, expected)
        assert stats.removed_sq is not None and stats.removed_sq > 0
    assert len(COMPILES) == 1
    assert len(compiled.variants) == 1 and not compiled.unavailable


def test_compiled_route_declines_new_layouts_beyond_its_limit():
    torch._dynamo.reset()
    model = MixedNet(torch.float32, small=2)
    plan = dense_plan(model, GCConfig(compile="aot_eager"))
    plan._executor.compiled.max_variants = 1
    for channels_last in (False, True, False):
        fill_grads(model, seed=1, channels_last=channels_last)
        expected = expected_after_gc(model)
        plan.apply()
        check(model, expected)  # the second layout ran eagerly
    assert len(plan._executor.compiled.variants) == 1


def test_compiled_route_falls_back_with_one_warning(failing_backend):
    torch._dynamo.reset()
    model = MixedNet(torch.float32, small=2)
    messages: list[str] = []
    plan = GCPlan(select(model, GCConfig()).targets, "channel", warn=messages.append, compile=failing_backend)
    for step in range(2):
        fill_grads(model, seed=step)
        expected = expected_after_gc(model)
        plan.apply()
        check(model, expected)
    assert len(messages) == 1 and "torch.compile is unavailable" in messages[0]


def test_decayed_targets_stay_on_the_eager_route():
    torch._dynamo.reset()
    model = MixedNet(torch.float32, small=2)
    selected = select(model, GCConfig()).targets
    targets = [replace(t, decay=0.5 if t.name == "big.weight" else 0.0) for t in selected]
    plan = GCPlan(targets, "channel", compile="aot_eager")
    fill_grads(model, seed=2)
    expected = expected_after_gc(model)
    expected["big.weight"] -= 0.5 * unit_means(model.big.weight)
    plan.apply()
    check(model, expected)


def test_compile_option_is_validated():
    with pytest.raises(ValueError, match="`compile` must be True, False or a torch.compile backend name"):
        Executor([], compile="no-such-backend")


@pytest.mark.slow
def test_inductor_route_when_a_compiler_is_present():
    torch._dynamo.reset()
    weight = nn.Parameter(torch.zeros(6, 5))
    plan = dense_plan([weight], GCConfig(compile=True), warn=warnings.warn)
    weight.grad = random_grad((6, 5), torch.float32)
    expected = reference(weight.grad)
    with warnings.catch_warnings(record=True):
        plan.apply()
    torch.testing.assert_close(weight.grad.double(), expected, **TOLERANCE[torch.float32])
    if shutil.which("g++") or shutil.which("c++"):
        assert not plan._executor.compiled.unavailable


def test_compiled_centralizer_declines_when_marked_unavailable():
    centralizer = CompiledCentralizer(backend="eager")
    centralizer.unavailable = True
    grad = random_grad((3, 4), torch.float32)
    before = grad.clone()
    assert centralizer([grad], (((1,), 1),)) is None
    assert torch.equal(grad, before)


# --- the plan cache of centralize_gradients -----------------------------------------------------------------


def test_centralize_gradients_reuses_its_plan_and_replans_on_change():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    plans = set()
    for _ in range(3):
        fill_grads(model, seed=0)
        centralize_gradients(model)
        plans.add(id(plan_for(model)))
    assert len(plans) == 1
    assert plan_for(model, config=GCConfig(mode="tensor")) is not plan_for(model)  # other options, other plan
    first = plan_for(model)
    model[1] = nn.Linear(3, 2)  # a replaced layer must be centralized too
    fill_grads(model, seed=1)
    expected = reference(model[1].weight.grad)
    centralize_gradients(model)
    assert plan_for(model) is not first
    torch.testing.assert_close(model[1].weight.grad.double(), expected, **TOLERANCE[torch.float32])
    second = plan_for(model)
    model[0].requires_grad_(False)  # freezing changes the selection
    assert plan_for(model) is not second


def test_optimizer_keyed_plan_follows_param_groups():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    fill_grads(model, seed=0)
    untouched = model[1].weight.grad.clone()
    centralize_gradients(model, optimizer=optimizer)
    torch.testing.assert_close(model[1].weight.grad, untouched)
    optimizer.add_param_group({"params": model[1].parameters()})
    expected = reference(model[1].weight.grad)
    centralize_gradients(model, optimizer=optimizer)
    torch.testing.assert_close(model[1].weight.grad.double(), expected, **TOLERANCE[torch.float32])
