"""Float64, single-process references for the DTensor tests, and the checks shared by their modules."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from dtensor_scenarios import MOMENTUM, Case, Run, TPNet, seeded
from reference import gc_reference
from torch import nn

# One round-to-nearest into bfloat16 (8 significant bits) moves a value by at most 2**-9 of itself;
# twice that leaves room for the float32 accumulation of the row sums.
BF16_ROUNDING = 2.0**-8


def expected_case(case: Case) -> dict[str, Any]:
    """The centralized gradient and the diagnostics for an adapter case, looping over units in float64."""
    grad, weight = (t.to(_dtype(case.dtype)).double() for t in case.tensors())
    centralized = gc_reference(grad, case.out_dim, case.groups, case.mode)
    if case.decay:
        decayed = grad + case.decay * weight
        expected = gc_reference(decayed, case.out_dim, case.groups, case.mode) - case.decay * weight
    else:
        expected = centralized
    return {
        "grad": expected.numpy(),
        "grad_sq": float(grad.square().sum()),
        "removed_sq": float((grad - centralized).square().sum()),
    }


def assert_case_result(case: Case, results: list[dict[str, Any]], row_elements: int | tuple[int, ...]) -> None:
    """Every rank holds the reference gradient and identical global diagnostics, and reduced only rows."""
    expected = expected_case(case)
    if case.dtype == "bfloat16":
        tolerance = {"rtol": BF16_ROUNDING, "atol": 1e-6}
    elif case.dtype == "float64":
        tolerance = {"rtol": 1e-12, "atol": 1e-12}
    else:
        tolerance = {"rtol": 1e-5, "atol": 1e-6}
    for rank, result in enumerate(results):
        assert "error" not in result, result.get("error")
        torch.testing.assert_close(
            torch.from_numpy(result["grad"]), torch.from_numpy(expected["grad"]), msg=f"rank {rank}", **tolerance
        )
        assert result["grad_sq"] == results[0]["grad_sq"] and result["removed_sq"] == results[0]["removed_sq"]
        expected_rows = row_elements[rank] if isinstance(row_elements, tuple) else row_elements
        assert result["row_elements"] == expected_rows, f"rank {rank} all-reduced {result['row_elements']} row values"
        assert not any("gather" in op or "all_to_all" in op for op in result["collectives"]), result["collectives"]
    assert results[0]["grad_sq"] == pytest_approx(expected["grad_sq"])
    assert results[0]["removed_sq"] == pytest_approx(expected["removed_sq"])
    assert results[0]["elements"] == int(np.prod(case.shape)) and results[0]["tensors"] == 1


def pytest_approx(value: float) -> Any:
    return pytest.approx(value, rel=1e-5)


def reference_fit(run: Run) -> dict[str, Any]:
    """SGD with momentum and coupled decay, written out, on the union of every rank's batches per step.

    FSDP2 averages gradients over data-parallel ranks and Lightning divides each micro-batch loss by the
    accumulation count, so with equal batch sizes a step's gradient is that of the mean loss over the
    step's samples: a contiguous block, since the sampler deals sample ``i`` to rank ``i % ranks`` in order.
    """
    net = seeded(run.net).double()
    data = run.data()
    per_step = run.samples // run.steps
    layouts = _centralized_layouts(run)
    buffers: dict[str, torch.Tensor] = {}
    grads, stats = [], []
    for step in range(run.steps):
        batch = data[step * per_step : (step + 1) * per_step]
        x = torch.stack([b[0] for b in batch])
        y = torch.stack([b[1] for b in batch])
        net.zero_grad()
        nn.functional.cross_entropy(net(x.double() if x.is_floating_point() else x), y).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
        stats.append(_diagnostics({n: g for n, g in grads[-1].items() if n in layouts}, layouts))
        with torch.no_grad():
            for name, p in net.named_parameters():
                update = p.grad + run.weight_decay * p
                if run.gc and name in layouts:
                    update = gc_reference(update, *layouts[name])
                buffers[name] = update if name not in buffers else MOMENTUM * buffers[name] + update
                p -= run.lr * buffers[name]
    return {"weights": {n: p.detach().clone() for n, p in net.named_parameters()}, "grads": grads, "stats": stats}


def assert_fit_matches(run: Run, results: list[dict[str, Any]], expected: dict[str, Any], **tolerance: float) -> None:
    """Final weights match the reference on every rank; the logged diagnostics are global and identical."""
    for rank, result in enumerate(results):
        for name, value in expected["weights"].items():
            torch.testing.assert_close(
                torch.from_numpy(result["weights"][name]), value, msg=f"rank {rank}: {name}", **tolerance
            )
        assert result["metrics"] == results[0]["metrics"], f"rank {rank} logged other diagnostics than rank 0"
    logged = [m for m in results[0]["metrics"] if "gc/removed_norm_ratio" in m]
    assert len(logged) == run.steps
    for metrics, reference in zip(logged, expected["stats"]):
        assert metrics["gc/removed_norm_ratio"] == _approx_for(reference["ratio"], run)
        assert metrics["gc/grad_norm"] == _approx_for(reference["norm"], run)
        assert metrics.get("gc/centralized_elements", reference["elements"]) == reference["elements"]
    assert "gc/centralized_elements" in logged[0]  # the counts are logged when they change, so first


def assert_hook_centralized(run: Run, results: list[dict[str, Any]], rtol: float, atol: float) -> None:
    """What the optimizer saw is GC(g + decay * w) - decay * w of what it would have seen, step by step.

    This isolates GC from the precision of forward and backward: the reference starts from the gradient the
    run produced, in float64.
    """
    layouts = _centralized_layouts(run)
    for result in results:
        assert len(result["before"]) == run.steps
        for before, after in zip(result["before"], result["after"]):
            for name, layout in layouts.items():
                g = torch.from_numpy(before[name])
                w = torch.from_numpy(before["weight:" + name])
                expected = gc_reference(g + run.weight_decay * w, *layout) - run.weight_decay * w
                torch.testing.assert_close(torch.from_numpy(after[name]), expected, rtol=rtol, atol=atol, msg=name)


def _approx_for(value: float, run: Run) -> Any:
    # the diagnostics come from the run's own gradients, which half-precision compute moves by ~1%
    return pytest.approx(value, rel=2e-2 if run.half_precision else 1e-4)


def _centralized_layouts(run: Run) -> dict[str, tuple[int, int]]:
    layouts = dict(run.net.LAYOUTS)
    if run.net is TPNet and run.gc_kwargs.get("exclude_modules") != []:
        layouts.pop("emb.weight")  # embeddings are excluded by default
    return layouts


def _diagnostics(grads: dict[str, torch.Tensor], layouts: dict[str, tuple[int, int]]) -> dict[str, float]:
    grad_sq = sum(float(g.square().sum()) for g in grads.values())
    removed = sum(float((g - gc_reference(g, *layouts[n])).square().sum()) for n, g in grads.items())
    elements = sum(g.numel() for g in grads.values())
    return {"ratio": (removed / grad_sq) ** 0.5, "norm": grad_sq**0.5, "elements": elements}


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[name]
