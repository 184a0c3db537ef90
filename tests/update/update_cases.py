"""Float64 references of the update placement, shared by the update tests (single-process and distributed)."""

from __future__ import annotations

import math

import torch
from models import LAYOUTS, TinyConvNet
from reference import gc_reference
from torch import nn


def reference_adam_update_gc(
    initial_state: dict[str, torch.Tensor],
    steps: list[list[tuple[torch.Tensor, torch.Tensor]]],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    layouts: dict[str, tuple[int, int]] = LAYOUTS,
    model: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """The authors' Adam with ``gc_loc=False``, float64, written out: coupled decay enters the gradient before
    the moments, then ``p -= lr / bc1 * GC(m / (sqrt(v) / sqrt(bc2) + eps))``. Each step averages its batches.

    ``model`` (default: a TinyConvNet) is converted to float64 and loaded with ``initial_state``."""
    model = (model if model is not None else TinyConvNet()).double()
    model.load_state_dict({k: v.double() for k, v in initial_state.items()})
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    beta1, beta2 = betas
    for t, batches in enumerate(steps, start=1):
        model.zero_grad()
        for x, y in batches:
            inputs = x.double() if x.is_floating_point() else x
            (nn.functional.cross_entropy(model(inputs), y) / len(batches)).backward()
        with torch.no_grad():
            for name, p in model.named_parameters():
                g = p.grad + weight_decay * p
                m, v = moments.setdefault(name, (torch.zeros_like(p), torch.zeros_like(p)))
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bias1, bias2 = 1 - beta1**t, 1 - beta2**t
                update = m / (v.sqrt() / math.sqrt(bias2) + eps)
                if name in layouts:
                    update = gc_reference(update, *layouts[name])
                p -= lr / bias1 * update
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unit_means(weight: torch.Tensor, out_dim: int, groups: int = 1) -> torch.Tensor:
    """Each output unit's mean, float64 (independent of lightning_gc: the reference's own definition)."""
    w = weight.detach().double()
    return w - gc_reference(w, out_dim, groups)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())
