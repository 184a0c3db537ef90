"""Static gradient buffers (``zero_grad(set_to_none=False)``), compiled steps and CUDA graph capture (issue 16.3).

On CPU: several steps on the same gradient tensors, and a ``torch.compile``d step that calls GC, match a
float64 reference; diagnostics refuse clearly inside a capture (simulated: CPU builds have no capture). Real
capture and replay on a GPU is in ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_gc import centralize_gradients, diagnostics
from lightning_gc.diagnostics import DiagnosticsWriter, GCStats


def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def reference_step(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradients GC must leave for this batch, centralized in float64 here."""
    double = copy.deepcopy(model).double()
    double.zero_grad(set_to_none=True)
    double(x.double()).square().mean().backward()
    out = {}
    for n, p in double.named_parameters():
        g = p.grad
        out[n] = g - g.mean(dim=tuple(range(1, g.ndim)), keepdim=True) if g.ndim >= 2 else g
    return out


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-step", "compiled-step"])
def test_static_gradient_buffers_are_centralized_every_step(route, compiled):
    model, optimizer = model_and_optimizer()

    def step(x: torch.Tensor) -> None:
        model(x).square().mean().backward()
        centralize_gradients(model)

    run = torch.compile(step, backend="eager") if compiled else step
    buffers = None
    for k in range(4):
        x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(k))
        expected = reference_step(model, x)
        optimizer.zero_grad(set_to_none=False)
        run(x)
        grads = {n: p.grad for n, p in model.named_parameters()}
        if buffers is None:
            buffers = {n: g.data_ptr() for n, g in grads.items()}
        assert {n: g.data_ptr() for n, g in grads.items()} == buffers, "the same gradient buffers every step"
        for name, grad in grads.items():
            torch.testing.assert_close(grad.double(), expected[name], rtol=1e-5, atol=1e-6, msg=f"step {k}: {name}")
        optimizer.step()


def test_diagnostics_refuse_to_log_inside_a_cuda_graph_capture(monkeypatch):
    monkeypatch.setattr(diagnostics, "_capturing", lambda device: True)
    stats = GCStats(tensors=1, elements=4, grad_sq=torch.tensor(4.0), removed_sq=torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="log_diagnostics=False"):
        DiagnosticsWriter().metrics(stats, "gc/", loggers_key=())
