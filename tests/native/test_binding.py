"""The kernel's Python binding (binding.c): every check in one C call, and nothing written unless all pass.

Each case runs in a subprocess: a check that lets a wrong tensor through may crash the process, and that
must fail the test, not the suite. The reference is written in each snippet: a float64 loop over rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lightning_gc import native
from lightning_gc.native import build

PRELUDE = """
import torch
from torch import nn
from lightning_gc.plan import dense_plan

def reference(grad):
    g = grad.detach().double().clone()
    for o in range(g.shape[0]):
        g[o] -= g[o].mean()
    return g

def mean_rows(*shape, dtype=torch.float32):
    # a non-zero mean along every axis, so that a wrong axis cannot pass
    g = torch.randn(*shape, dtype=torch.float64)
    for d in range(g.ndim):
        g = g + torch.arange(g.shape[d], dtype=torch.float64).reshape([-1 if i == d else 1 for i in range(g.ndim)])
    return g.to(dtype)
"""


def run_snippet(code: str, binding: bool = True) -> None:
    if not native.status().available:
        pytest.skip(f"fused kernel unavailable: {native.status().reason}")
    env = {**os.environ, native.ENV_SWITCH: "1", native.ENV_BINDING: "1" if binding else "0"}
    script = PRELUDE + textwrap.dedent(code) + "\nprint('ok')"
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    assert result.stdout.strip().endswith("ok")


def test_the_binding_is_built_where_python_headers_are():
    if build.compiler() is None or build.python_include() is None:
        pytest.skip("no C compiler or no Python.h here")
    run_snippet("""
        from lightning_gc import native
        status = native.status()
        assert status.binding and "checked in C" in status.reason, status
        assert native.kernel().checked_centralize is not None
    """)


def test_switched_off_the_binding_leaves_the_checks_to_python():
    run_snippet(
        """
        from lightning_gc import native
        status = native.status()
        assert status.available and not status.binding and "LIGHTNING_GC_NATIVE_BINDING=0" in status.reason, status
        model = nn.Linear(40, 12)
        plan = dense_plan(model)
        model.weight.grad = mean_rows(12, 40)
        expected = reference(model.weight.grad)
        plan.apply()
        torch.testing.assert_close(model.weight.grad.double(), expected, rtol=1e-5, atol=1e-5)
        """,
        binding=False,
    )


def test_a_step_the_kernel_does_alone_matches_the_reference_and_its_norms():
    """Linear, conv and channels_last conv weights in float32, float64 and bfloat16, with their stats."""
    run_snippet("""
        from lightning_gc import native
        if native.kernel().checked_centralize is None:
            raise SystemExit("binding not built")
        for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 1.6e-2)):
            model = nn.Sequential(nn.Linear(30, 20, bias=False), nn.Conv2d(3, 8, 3, bias=False), nn.Conv2d(8, 4, 3, bias=False))
            model[2].to(memory_format=torch.channels_last)
            model.to(dtype)
            plan = dense_plan(model)
            route = plan._executor.only_native
            assert route is not None, "every weight on the kernel"
            calls = []
            checked = route.run_checked
            route.run_checked = lambda *a, **k: calls.append(a) or checked(*a, **k)
            grads = []
            for p in model.parameters():
                g = mean_rows(*p.shape).to(dtype)
                p.grad = g.contiguous(memory_format=torch.channels_last) if g.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() else g
                grads.append(p.grad)
            expected = [reference(g) for g in grads]
            removed = [(g.double() - e) for g, e in zip(grads, expected)]
            grad_norm = torch.stack([g.double().norm() for g in grads]).norm()
            stats = plan.apply(compute_stats=True)
            assert len(calls) == 1, "one call of the binding for the whole step"
            for p, g, e in zip(model.parameters(), grads, expected):
                assert p.grad is g, "in place"
                torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol)
            assert stats.tensors == 3 and stats.elements == sum(p.numel() for p in model.parameters())
            ratio = torch.stack([r.norm() for r in removed]).norm() / grad_norm
            got_norm, got_ratio = stats.norms()
            assert abs(got_norm - float(grad_norm)) <= 1e-4 * float(grad_norm), (got_norm, float(grad_norm))
            assert abs(got_ratio - float(ratio)) <= max(tol, 1e-5) * 10, (got_ratio, float(ratio))
            torch.testing.assert_close(stats.grad_norm.double(), grad_norm, rtol=1e-4, atol=0)
            assert all(a == 0 for a in route._grads), "no gradient address outlives the call"
    """)


def test_every_difference_from_the_plan_is_refused_before_anything_is_written():
    """dtype, shape, strides, device, requires_grad, a subclass, a shrunken storage, a decay weight of another dtype."""
    run_snippet("""
        from lightning_gc import native
        if native.kernel().checked_centralize is None:
            raise SystemExit("binding not built")

        class Marked(torch.Tensor):
            pass

        model = nn.Sequential(nn.Linear(16, 8, bias=False), nn.Linear(8, 6, bias=False))
        plan = dense_plan(model)
        route = plan._executor.only_native
        good = mean_rows(6, 8)
        shrunk = mean_rows(8, 16)
        shrunk.untyped_storage().resize_(16)
        cases = {
            "dtype": mean_rows(8, 16, dtype=torch.float64),
            "shape": mean_rows(16, 8).reshape(8, 16)[:, :15],
            "strides": mean_rows(16, 8).t(),
            "device": torch.empty(8, 16, device="meta"),
            "requires_grad": mean_rows(8, 16).requires_grad_(),
            "subclass": mean_rows(8, 16).as_subclass(Marked),
            "storage": shrunk,
        }
        for name, bad in cases.items():
            before = good.clone()
            assert route.run_checked([bad, good], 1.0, True) is None, name
            assert torch.equal(good, before), f"{name}: the good gradient was written although the step was refused"
            assert all(a == 0 for a in route._grads), name
        assert route.run_checked([None, good], 1.0, False)[2] == 1  # a missing gradient is skipped, not refused
        torch.testing.assert_close(good.double(), reference(before), rtol=1e-5, atol=1e-5)

        # weight-decay compensation: the weight is checked as its gradient is
        decayed = nn.Linear(16, 8, bias=False)
        optimizer = torch.optim.SGD(decayed.parameters(), lr=0.1, weight_decay=0.1)
        from lightning_gc.config import GCConfig
        plan = dense_plan(decayed, GCConfig(centralize_weight_decay=True), optimizer)
        route = plan._executor.only_native
        assert route is not None and route.decayed == [0]
        grad = mean_rows(8, 16)
        decayed.weight.data = decayed.weight.data.t().contiguous().t()  # same values, column-major
        before = grad.clone()
        assert route.run_checked([grad], 1.0, False) is None
        assert torch.equal(grad, before)
        decayed.weight.grad = grad
        plan.apply()  # the Python checks decline it to the eager route, which compensates correctly
        # GC of g + decay * w, less the decay term the optimizer adds back: g - mean(g + decay * w) per row
        expected = reference(before.double() + 0.1 * decayed.weight.detach().double()) - 0.1 * decayed.weight.detach().double()
        torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-5)
    """)
