"""Independent float64 references for the tests: loops over output units, no code from lightning_gc."""

from __future__ import annotations

import torch
from torch import Tensor


def gc_reference(grad: Tensor, out_dim: int = 0, groups: int = 1, mode: str = "channel") -> Tensor:
    """Centralized copy of ``grad`` in float64, one output unit at a time."""
    g = grad.detach().to(torch.float64).clone()
    if mode == "tensor":
        return g - g.mean()
    if out_dim == 0:
        for o in range(g.shape[0]):
            g[o] -= g[o].mean()
        return g
    # transposed convolution: weight (in, out // groups, *k); output channel (grp, o) sees in-block grp only
    block = g.shape[0] // groups
    for grp in range(groups):
        for o in range(g.shape[1]):
            unit = g[grp * block : (grp + 1) * block, o]
            g[grp * block : (grp + 1) * block, o] = unit - unit.mean()
    return g


def row_mean_reference(weight: Tensor, out_dim: int = 0, groups: int = 1, mode: str = "channel") -> Tensor:
    """``weight - gc_reference(weight)``: each unit's mean broadcast over the unit, float64."""
    w = weight.detach().to(torch.float64)
    return w - gc_reference(w, out_dim, groups, mode)


def ulp_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``torch.testing`` tolerances for one rounding into ``dtype`` plus float32 accumulation error."""
    return {
        torch.float16: {"rtol": 2e-3, "atol": 2e-3},
        torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
        torch.float32: {"rtol": 1e-5, "atol": 1e-6},
        torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    }[dtype]
