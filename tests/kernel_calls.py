"""Calling the fused kernel (lightning_gc.native) straight through ctypes, without a plan or a route."""

from __future__ import annotations

import ctypes
from collections.abc import Collection, Sequence

import torch

from lightning_gc.native.build import Kernel
from lightning_gc.native.route import DTYPE_CODES, row_layout


def call_kernel(
    kernel: Kernel,
    grads: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor | None] | None = None,
    coefficient: float = 0.0,
    threads: int = 1,
    min_per_thread: int = 1,
    unit_dim: int | None = 0,
    skip: Collection[int] = (),
    grad_sq: list[float] | None = None,
) -> float:
    """Centralize ``grads`` as rows in place (jobs in ``skip`` get a null pointer); return the removed squared norm.

    With ``grad_sq`` given, the kernel also sums the squares of the gradients before GC; that total is appended.
    """
    n = len(grads)
    layouts = [row_layout(g.shape, g.stride(), unit_dim) for g in grads]
    int64s = ctypes.c_int64 * n
    out = ctypes.c_double(float("nan"))
    removed = kernel.centralize(
        n, int64s(*[0 if j in skip else g.data_ptr() for j, g in enumerate(grads)]),
        int64s(*[w.data_ptr() if w is not None else 0 for w in (weights or [None] * n)]),
        int64s(*[lay[0] for lay in layouts]), int64s(*[lay[1] for lay in layouts]), int64s(*[lay[2] for lay in layouts]),
        (ctypes.c_int32 * n)(*[DTYPE_CODES[g.dtype] for g in grads]), (ctypes.c_double * n)(*[coefficient] * n),
        threads, min_per_thread, ctypes.byref(out) if grad_sq is not None else None,
    )  # fmt: skip
    if grad_sq is not None:
        grad_sq.append(out.value)
    return float(removed)
