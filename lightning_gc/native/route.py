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
import operator
from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter

import torch
from torch import Tensor

from lightning_gc.native.build import Kernel
from lightning_gc.unit import Unit

_DTYPE, _SHAPE, _IS_CPU, _REQUIRES_GRAD = (attrgetter(a) for a in ("dtype", "shape", "is_cpu", "requires_grad"))
_PLAIN = {Tensor}
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
    if rows > 1 and strides[unit_dim] < cols:  # units overlap (an expanded or as_strided view): not rows
        return None
    return rows, cols, strides[unit_dim] if rows > 1 else cols


def storage_span(shape: Sequence[int], strides: Sequence[int]) -> int:
    """Entries from a tensor's first entry to one past its last, as laid out in its storage.

    Example:
        >>> storage_span((4, 3), (3, 1)), storage_span((4, 3), (6, 2)), storage_span((0, 3), (3, 1))
        (12, 23, 0)
    """
    if 0 in shape:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(shape, strides))


class NativeRoute:
    """The fused kernel over the eligible units of an executor's plan.

    The kernel is handed raw addresses and the row geometry of each job, so it must never see a tensor that
    geometry does not describe. Every job records the dtype, shape, strides and storage span it was planned
    for (from the gradient's dtype: ``param.grad_dtype`` where set, else the parameter's); every call checks
    each gradient (and, for weight-decay compensation, its parameter) against them. A gradient that differs
    (``model.to(torch.bfloat16)``, a ``.data`` swap, a hand-set gradient of another dtype or layout) has its
    job re-planned from the gradient itself when its units are still rows, and is declined to the eager
    route otherwise.

    Args:
        kernel: the loaded kernel.
        units: the plan's :class:`~lightning_gc.unit.Unit` list.
    """

    def __init__(self, kernel: Kernel, units: Sequence[Unit]) -> None:
        self.kernel = kernel
        self.units = units
        candidates = [i for i, u in enumerate(units) if _plannable(u)]
        geometry = [_planned_geometry(units[i].param) for i in candidates]
        picked = [(i, g) for i, g in zip(candidates, geometry) if self._layout(units[i], *g) is not None]
        self.indices = [i for i, _ in picked]
        self.params = [units[i].param for i in self.indices]
        self.decay = [units[i].decay for i in self.indices]
        self.decayed = [j for j, d in enumerate(self.decay) if d]
        self._ndim = [p.ndim for p in self.params]  # the eager route's dims were planned for this many
        n = len(picked)
        self._grads = (ctypes.c_int64 * n)()
        self._weights = (ctypes.c_int64 * n)()
        self._coefficients = (ctypes.c_double * n)()
        self._rows = (ctypes.c_int64 * n)()
        self._cols = (ctypes.c_int64 * n)()
        self._row_strides = (ctypes.c_int64 * n)()
        self._dtypes = (ctypes.c_int32 * n)()
        # what each job's table entries describe; None after a gradient the kernel could not take
        self._dtype: list[torch.dtype | None] = [None] * n
        self._shape: list[torch.Size | None] = [None] * n
        self._stride: list[tuple[int, ...] | None] = [None] * n
        self._bytes = [0] * n  # bytes from the first entry to one past the last
        self._element_size = [0] * n
        self._identity = self.indices == list(range(len(units)))  # the executor's grads are the jobs' own
        for j, (_, g) in enumerate(picked):
            self._plan_job(j, *g)
        # what the binding checks each gradient against: these very lists, which `_plan_job` keeps current
        tables = (
            self._grads,
            self._weights,
            self._rows,
            self._cols,
            self._row_strides,
            self._dtypes,
            self._coefficients,
        )
        weights = [p if d else None for p, d in zip(self.params, self.decay)]
        self._expected = (Tensor, self._dtype, self._shape, self._stride, self._bytes, self._element_size, weights,
                          *[ctypes.addressof(table) for table in tables], torch._C._increment_version)  # fmt: skip

    def run(
        self,
        grads: Sequence[Tensor | None],
        grad_scale: float,
        removed: list[Tensor | float] | None,
        grad_sq: list[Tensor | float] | None = None,
    ) -> list[int]:
        """Centralize this route's ``grads`` in place; return the indices of those it had to decline.

        Declined, for the eager route to take: gradients whose units are no longer contiguous rows or whose
        dtype the kernel lacks, gradients off the CPU, and gradients that require grad
        (``backward(create_graph=True)``: eager in-place ops keep GC differentiable, raw writes would not).
        Appends the squared norm of what was removed to ``removed`` when given, and the squared norm of the
        gradients it took, before GC (summed in float64 in the same pass), to ``grad_sq`` when given.
        """
        jobs = grads if self._identity and len(grads) == len(self.indices) else [grads[i] for i in self.indices]
        done = self.run_checked(jobs, grad_scale, grad_sq is not None)
        if done is not None:
            if done[2] and removed is not None:
                removed.append(done[0])
            if done[2] and grad_sq is not None:
                grad_sq.append(done[1])
            return []
        for j in self.decayed:
            self._coefficients[j] = self.decay[j] * grad_scale
        declined: list[int]
        live: list[Tensor]
        if self._all_as_planned(jobs):  # the common case, checked a list at a time
            declined, live = [], list(jobs)  # type: ignore[arg-type]  # no None: checked
            pointers = list(map(Tensor.data_ptr, live))
        else:
            declined, live, pointers = self._check_one_by_one(grads)
        for j in self.decayed:
            if pointers[j] and not self._weight_fits(j):
                pointers[j] = 0
                declined.append(self.indices[j])
                live = [g for g in live if g is not grads[self.indices[j]]]
        if not live:
            return declined
        self._grads[:] = pointers  # type: ignore[assignment]  # ctypes stubs: arrays take ints
        for j in self.decayed:
            self._weights[j] = self.params[j].data_ptr() if pointers[j] else 0
        grad_total = ctypes.c_double(0.0)
        removed_sq = self.kernel.centralize(
            len(self.indices), self._grads, self._weights, self._rows, self._cols, self._row_strides,
            self._dtypes, self._coefficients, torch.get_num_threads(), MIN_ENTRIES_PER_THREAD,
            ctypes.byref(grad_total) if grad_sq is not None else None,
        )  # fmt: skip
        self._grads[:] = [0] * len(pointers)  # no address outlives the call
        torch.autograd.graph.increment_version(live)  # written behind autograd's back: say so, as in-place ops do
        if removed is not None:  # host floats: the kernel ran on the host, no tensor needed until the sum
            removed.append(removed_sq)
        if grad_sq is not None:
            grad_sq.append(grad_total.value)
        return declined

    def run_checked(
        self, items: Sequence[Tensor | None], grad_scale: float, want_grad_sq: bool, from_params: bool = False
    ) -> tuple[float, float, int] | None:
        """Every check and the kernel in one C call (``binding.c``), for the jobs' gradients in job order.

        ``items`` are the gradients (``None``: skip the job), or with ``from_params`` the jobs' parameters,
        whose ``.grad`` the binding reads itself. Returns ``(removed_sq, grad_sq, live)`` (``grad_sq`` 0
        unless wanted; ``live``: gradients centralized, their version counters bumped), or ``None`` when the
        binding is not built or some gradient (or decay weight) is not exactly as planned: then nothing was
        written, and :meth:`run` checks them one by one.
        """
        checked = self.kernel.checked_centralize
        if checked is None:
            return None
        for j in self.decayed:
            self._coefficients[j] = self.decay[j] * grad_scale
        as_list = items if type(items) is list else list(items)
        return checked(
            as_list, self._expected, torch.get_num_threads(), MIN_ENTRIES_PER_THREAD, want_grad_sq, from_params
        )

    def _all_as_planned(self, jobs: Sequence[Tensor | None]) -> bool:
        """Whether every job's gradient is present and exactly as planned, checked with C-level iteration."""
        if not all(map(operator.is_not, jobs, repeat(None))):
            return False
        present: Sequence[Tensor] = jobs  # type: ignore[assignment]
        if not (
            list(map(_DTYPE, present)) == self._dtype
            and list(map(Tensor.stride, present)) == self._stride
            and list(map(_SHAPE, present)) == self._shape
            and set(map(type, present)) == _PLAIN
            and all(map(_IS_CPU, present))
            and not any(map(_REQUIRES_GRAD, present))
        ):
            return False
        first_byte = map(operator.mul, map(Tensor.storage_offset, present), self._element_size)
        needed = map(operator.add, first_byte, self._bytes)
        held = map(torch.UntypedStorage.nbytes, map(Tensor.untyped_storage, present))
        return all(map(operator.le, needed, held))

    def _check_one_by_one(self, grads: Sequence[Tensor | None]) -> tuple[list[int], list[Tensor], list[int]]:
        """Check each gradient, re-planning the jobs whose gradient changed; return (declined, live, pointers)."""
        declined: list[int] = []
        live: list[Tensor] = []
        pointers = [0] * len(self.indices)
        expected = zip(self.indices, self._dtype, self._shape, self._stride, self._bytes, self._element_size)
        for j, (i, dtype, shape, stride, span, size) in enumerate(expected):
            grad = grads[i]
            if grad is None:
                continue
            if (  # one expression: this runs every step over every job
                grad.dtype is dtype
                and grad.stride() == stride
                and grad.shape == shape
                and type(grad) is Tensor
                and grad.is_cpu
                and not grad.requires_grad
                and grad.storage_offset() * size + span <= grad.untyped_storage().nbytes()
            ) or self._replan(j, grad):
                pointers[j] = grad.data_ptr()
                live.append(grad)
            else:
                declined.append(i)
        return declined, live, pointers

    def _layout(
        self, unit: Unit, dtype: torch.dtype, shape: Sequence[int], stride: Sequence[int]
    ) -> tuple[int, int, int] | None:
        """``(rows, cols, row_stride)`` if the kernel can take a gradient of this geometry for ``unit``."""
        if dtype not in DTYPE_CODES or (dtype == torch.float16 and not self.kernel.supports_float16):
            return None
        if 0 in shape:
            return None
        return row_layout(shape, stride, unit.unit_dim)

    def _plan_job(self, j: int, dtype: torch.dtype, shape: Sequence[int], stride: Sequence[int]) -> bool:
        """Point job ``j``'s table entries at this geometry if the kernel can take it; False otherwise."""
        unit = self.units[self.indices[j]]
        layout = self._layout(unit, dtype, shape, stride) if len(shape) == self._ndim[j] else None
        if layout is None:
            self._dtype[j] = self._shape[j] = self._stride[j] = None
            return False
        self._rows[j], self._cols[j], self._row_strides[j] = layout
        self._dtypes[j] = DTYPE_CODES[dtype]
        self._dtype[j], self._shape[j], self._stride[j] = dtype, torch.Size(shape), tuple(stride)
        self._element_size[j] = _element_size(dtype)
        self._bytes[j] = storage_span(shape, stride) * self._element_size[j]
        return True

    def _replan(self, j: int, grad: Tensor) -> bool:
        """Re-plan job ``j`` for a gradient that differs from what it was planned for; False: decline it."""
        if type(grad) is not Tensor or grad.layout is not torch.strided or not grad.is_cpu or grad.requires_grad:
            return False
        if grad.is_neg() or grad.is_conj():  # lazily negated views: their memory is not their value
            return False
        if not self._plan_job(j, grad.dtype, grad.shape, grad.stride()):
            return False
        return grad.storage_offset() * grad.element_size() + self._bytes[j] <= grad.untyped_storage().nbytes()

    def _weight_fits(self, j: int) -> bool:
        """Whether job ``j``'s parameter is still laid out as its gradient (the kernel reads both alike)."""
        weight = self.params[j].detach()
        return (
            weight.dtype is self._dtype[j]
            and weight.stride() == self._stride[j]
            and weight.shape == self._shape[j]
            and type(weight) is Tensor
            and weight.is_cpu
            and weight.storage_offset() * weight.element_size() + self._bytes[j] <= weight.untyped_storage().nbytes()
        )


def _plannable(unit: Unit) -> bool:
    """Units whose layout is settled at plan time: plain CPU tensors, output units not split into groups."""
    param = unit.param
    return type(param.data) is Tensor and param.device.type == "cpu" and unit.groups == 1


def _planned_geometry(param: Tensor) -> tuple[torch.dtype, torch.Size, tuple[int, ...]]:
    """The gradient autograd will produce: the parameter's layout, in ``param.grad_dtype`` where set."""
    return getattr(param, "grad_dtype", None) or param.dtype, param.shape, param.stride()


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
