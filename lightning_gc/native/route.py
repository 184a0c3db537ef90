"""Which of a plan's gradients the fused kernel takes, and calling it on them every step.

The kernel centralizes rows: output units whose entries are contiguous in memory. That covers linear, RNN
and conv weights whether contiguous or channels_last (the output channel is the outermost dim in both), in
channel and tensor mode, with and without weight-decay compensation, in float32, float64, bfloat16 and
float16 (where the CPU converts half precision in hardware). Anything else (grouped transposed convs,
gradients off the CPU, gradients whose strides differ from their parameter's) stays on the eager route.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_gc.native.build import Kernel
from lightning_gc.unit import Unit

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
"""As the ``LGC_*`` enum in ``kernel.c``."""
MIN_ENTRIES_PER_THREAD = 1 << 18
"""Each extra thread costs a create and a join (tens of microseconds); below this many entries it is not worth it."""


def row_layout(shape: Sequence[int], strides: Sequence[int], unit_dim: int | None) -> tuple[int, int, int] | None:
    """``(rows, cols, row_stride)`` if every output unit of this layout is one contiguous run of ``cols`` entries.

    Args:
        shape: the tensor's shape, as seen through its :class:`~lightning_gc.centralize.RowLayout` view.
        strides: its strides.
        unit_dim: the dim indexing output units, ``None`` for one unit holding the whole tensor (tensor mode).

    Example:
        >>> row_layout((4, 3, 2, 2), (12, 4, 2, 1), unit_dim=0)
        (4, 12, 12)
        >>> row_layout((4, 3, 2, 2), (12, 1, 6, 3), unit_dim=0)  # channels_last
        (4, 12, 12)
        >>> row_layout((3, 4), (1, 3), unit_dim=0) is None  # a transposed view: units are strided
        True
    """
    inner = [d for d in range(len(shape)) if d != unit_dim]
    expected = 1
    for d in sorted(inner, key=lambda d: strides[d]):
        if shape[d] == 1:
            continue
        if strides[d] != expected:
            return None
        expected *= shape[d]
    cols = math.prod(shape[d] for d in inner)
    if unit_dim is None:
        return 1, cols, cols
    rows = shape[unit_dim]
    return rows, cols, strides[unit_dim] if rows > 1 else cols


class NativeRoute:
    """The fused kernel over the eligible units of an executor's plan.

    Args:
        kernel: the loaded kernel.
        units: the plan's :class:`~lightning_gc.unit.Unit` list.
    """

    def __init__(self, kernel: Kernel, units: Sequence[Unit]) -> None:
        self.kernel = kernel
        picked = [(i, layout) for i, u in enumerate(units) if (layout := _eligible(u, kernel)) is not None]
        self.indices = [i for i, _ in picked]
        self.params = [units[i].param for i in self.indices]
        self.strides = [p.stride() for p in self.params]
        self.decay = [units[i].decay for i in self.indices]
        self.decayed = [j for j, d in enumerate(self.decay) if d]
        n = len(picked)
        self._grads = (ctypes.c_int64 * n)()
        self._weights = (ctypes.c_int64 * n)()
        self._coefficients = (ctypes.c_double * n)()
        self._rows = (ctypes.c_int64 * n)(*[rows for _, (rows, _, _) in picked])
        self._cols = (ctypes.c_int64 * n)(*[cols for _, (_, cols, _) in picked])
        self._row_strides = (ctypes.c_int64 * n)(*[stride for _, (_, _, stride) in picked])
        self._dtypes = (ctypes.c_int32 * n)(*[DTYPE_CODES[units[i].param.dtype] for i in self.indices])

    def run(self, grads: Sequence[Tensor | None], grad_scale: float, removed: list[Tensor] | None) -> list[int]:
        """Centralize this route's ``grads`` in place; return the indices of those it had to decline.

        A gradient is declined, and the eager route takes it, when its strides differ from its parameter's
        (autograd allows that) or when it requires grad (``backward(create_graph=True)``: eager in-place
        ops keep GC differentiable, raw writes would not). Appends the squared norm of what was removed to
        ``removed`` when given.
        """
        declined, live = [], []
        pointers = [0] * len(self.indices)
        for j, (i, strides) in enumerate(zip(self.indices, self.strides)):
            grad = grads[i]
            if grad is None:
                continue
            if grad.stride() == strides and not grad.requires_grad:  # a gradient lives on its parameter's device
                pointers[j] = grad.data_ptr()
                live.append(grad)
            else:
                declined.append(i)
        if not live:
            return declined
        self._grads[:] = pointers
        for j in self.decayed:
            self._weights[j] = self.params[j].data_ptr()
            self._coefficients[j] = self.decay[j] * grad_scale
        removed_sq = self.kernel.centralize(
            len(self.indices), self._grads, self._weights, self._rows, self._cols, self._row_strides,
            self._dtypes, self._coefficients, torch.get_num_threads(), MIN_ENTRIES_PER_THREAD,
        )  # fmt: skip
        torch.autograd.graph.increment_version(live)  # written behind autograd's back: say so, as in-place ops do
        if removed is not None:
            removed.append(torch.tensor(removed_sq, dtype=torch.float64))
        return declined


def _eligible(unit: Unit, kernel: Kernel) -> tuple[int, int, int] | None:
    param = unit.param
    if type(param.data) is not Tensor or param.device.type != "cpu" or param.numel() == 0 or unit.groups != 1:
        return None
    if param.dtype not in DTYPE_CODES or (param.dtype == torch.float16 and not kernel.supports_float16):
        return None
    return row_layout(param.shape, param.stride(), unit.unit_dim)
