"""The fused kernel is never handed memory it does not describe (issue 15): model changes between calls.

``model_changes.py`` drives random sequences of changes (dtype casts, ``.data`` swaps to other sizes and
dtypes, gradients of other dtypes, sizes and layouts, layers added, ``requires_grad`` toggled) and checks
every call against its own float64 reference. Everything runs in subprocesses: a crash (SIGSEGV,
``malloc(): invalid size``) fails the test instead of killing the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_gc import native

DRIVER = Path(__file__).with_name("model_changes.py")
SEEDS = range(8)


def run_python(args: list[str], route: str) -> subprocess.CompletedProcess[str]:
    """Run Python with the kernel checking gradients in C (``native``), in Python (``python-checks``), or off."""
    if route != "eager" and not native.status().available:
        pytest.skip(f"fused kernel unavailable: {native.status().reason}")
    env = {
        **os.environ,
        native.ENV_SWITCH: "0" if route == "eager" else "1",
        native.ENV_BINDING: "0" if route == "python-checks" else "1",
    }
    return subprocess.run([sys.executable, "-W", "ignore", *args], env=env, capture_output=True, text=True, timeout=300)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("route", ["native", "python-checks", "eager"])
@pytest.mark.parametrize("seed", SEEDS)
def test_random_model_changes_never_crash_and_match_the_reference(seed, route):
    """Every dtype to one rounding of it (float64 to 1e-10): every route plans by the gradient's dtype."""
    assert_ok(run_python([str(DRIVER), "--seed", str(seed), "--changes", "30"], route))


def run_snippet(code: str) -> None:
    assert_ok(run_python(["-c", textwrap.dedent(code) + "\nprint('ok')"], "native"))


def test_a_gradient_whose_storage_shrank_under_it_is_declined():
    """``untyped_storage().resize_()`` leaves a tensor with its shape and less memory: the kernel must not write it."""
    run_snippet("""
        import torch
        from torch import nn
        from lightning_gc.plan import dense_plan
        model = nn.Linear(64, 32)
        plan = dense_plan(model)
        model.weight.grad = torch.randn(32, 64) + 1
        plan.apply()
        route = plan._executor.native
        grad = torch.randn(32, 64) + 1
        grad.untyped_storage().resize_(16)  # four float32 entries left of 2,048
        grads = [grad, None]
        assert route.run(grads, 1.0, None) == [0], "declined to the eager route"
        grad.untyped_storage().resize_(32 * 64 * 4)
        grad.copy_(torch.randn(32, 64) + 1)  # regrown memory is uninitialized
        assert route.run(grads, 1.0, None) == []
        assert float(grad.sum(dim=1).abs().max()) < 1e-4
    """)


def test_a_parameter_with_grad_dtype_is_planned_by_its_gradients_dtype():
    run_snippet("""
        import torch
        from torch import nn
        from lightning_gc import centralize_gradients
        from lightning_gc.native.route import DTYPE_CODES
        from lightning_gc.plan import dense_plan
        model = nn.Linear(300, 7).to(torch.bfloat16)
        model.weight.grad_dtype = torch.float32
        plan = dense_plan(model)
        assert plan._executor.native._dtypes[0] == DTYPE_CODES[torch.float32]
        model(torch.randn(5, 300, dtype=torch.bfloat16)).float().pow(2).sum().backward()
        assert model.weight.grad.dtype == torch.float32
        grad = model.weight.grad.double()
        plan.apply()
        expected = grad - grad.mean(dim=1, keepdim=True)
        torch.testing.assert_close(model.weight.grad.double(), expected, rtol=1e-5, atol=1e-6)
    """)


def test_decay_compensation_reads_no_weight_of_another_layout():
    """A ``.data`` swap of a decayed parameter to other strides (or a dtype) sends its gradient to the eager route."""
    for swapped in ("torch.randn(64, 32).t()", "torch.randn(32, 64, dtype=torch.float64)", "torch.randn(2, 8)"):
        run_snippet(f"""
            import torch
            from torch import nn
            from lightning_gc import centralize_gradients
            model = nn.Linear(64, 32)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5)
            model.weight.grad = torch.randn(32, 64) + 1
            centralize_gradients(model, optimizer=optimizer, centralize_weight_decay=True)
            model.weight.data = {swapped}
            model.weight.grad_dtype = None
            model.weight.grad = torch.randn(model.weight.shape) + 1
            g = model.weight.grad.double() + 0.5 * model.weight.detach().double()
            centralize_gradients(model, optimizer=optimizer, centralize_weight_decay=True)
            expected = g - g.mean(dim=1, keepdim=True) - 0.5 * model.weight.detach().double()
            torch.testing.assert_close(model.weight.grad.double(), expected, rtol=1e-5, atol=1e-5)
        """)
