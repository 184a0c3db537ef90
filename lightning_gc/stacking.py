"""Many small gradients of one shape, centralized a stack at a time instead of one tensor at a time.

Per-tensor GC costs two operator calls per tensor, which dominates for small tensors (and on GPUs, two
kernel launches each). Stacking ``k`` same-shape gradients into one buffer computes all their means in one
call; the subtraction is then one ``_foreach`` call. The buffer is bounded by the caller's budget.

Exactness as in :func:`~lightning_gc.centralize.centralize_`: means accumulate in float32 for half
precision, and the mean is subtracted in that precision with one rounding. Where subtracting a float32
mean from a half tensor would materialize float32 copies (CPU), or where ``_foreach_sub_`` with
broadcasting falls back to one kernel per tensor (CUDA), the buffer is stored in float32, centralized
there, and copied back with ``_foreach_copy_`` (one multi-tensor kernel on CUDA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gc.centralize import accumulation_dtype, removed_sq_norm

SERIAL_ELEMENTS = 32768
"""ATen's parallel grain size. With several intra-op threads on CPU, stacks stay below it, so that their
calls run on the calling thread like the per-tensor calls they replace: every call on a bigger buffer opens
a parallel region, and on an oversubscribed machine each region can wait a scheduler quantum for a
preempted worker (measured: 40x slower stacks of 2,000 64x64 tensors with 2 threads on 2 busy cores)."""


def stack_size(numel: int, dtype: torch.dtype, max_bytes: int, serial: bool = False) -> int:
    """How many tensors of ``numel`` entries one stack holds: within ``max_bytes``, and below
    ``SERIAL_ELEMENTS`` entries if ``serial``.

    Example:
        >>> stack_size(64 * 64, torch.float32, max_bytes=1 << 20)
        64
        >>> stack_size(64 * 64, torch.float32, max_bytes=1 << 20, serial=True)
        7
    """
    per_stack = max_bytes // (numel * torch.empty((), dtype=accumulation_dtype(dtype)).element_size())
    if serial:
        per_stack = min(per_stack, (SERIAL_ELEMENTS - 1) // numel)
    return max(1, per_stack)


def centralize_stacked_(
    grads: list[Tensor], dims: tuple[int, ...], per_stack: int, removed: list[Tensor | float] | None = None
) -> None:
    """Centralize ``grads`` (same shape, dtype and device; any strides) over ``dims`` in place.

    Args:
        grads: the tensors.
        dims: the dims of one tensor to average over.
        per_stack: how many tensors share one buffer (see :func:`stack_size`).
        removed: if given, receives the squared norm of what was removed, one scalar per stack (the means
            themselves are dropped as soon as they are subtracted, to keep within the budget).

    Example:
        >>> grads = [torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 4.0]])]
        >>> centralize_stacked_(grads, dims=(1,), per_stack=2)
        >>> grads
        [tensor([[-1.,  1.]]), tensor([[-2.,  2.]])]
    """
    first = grads[0]
    stacked_dims = tuple(d + 1 for d in dims)
    acc = accumulation_dtype(first.dtype)
    in_place = first.device.type == "cpu" and acc == first.dtype
    buffer = first.new_empty((min(per_stack, len(grads)), *first.shape), dtype=acc)
    for start in range(0, len(grads), per_stack):
        chunk = grads[start : start + per_stack]
        stacked = torch.stack(chunk, out=buffer[: len(chunk)])
        mean = stacked.mean(dim=stacked_dims, keepdim=True)
        if in_place:
            torch._foreach_sub_(chunk, mean.unbind(0))
        else:
            stacked.sub_(mean)
            torch._foreach_copy_(chunk, stacked.unbind(0))
        if removed is not None:
            removed.append(removed_sq_norm(mean, stacked.numel()))
