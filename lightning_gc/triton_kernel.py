"""A Triton multi-tensor kernel for GC on GPUs: one launch per dtype per step for every centralized gradient.

The eager routes launch a mean and a subtraction per tensor (about 5 us each on a GPU, so 108 launches for
ResNet-50's weights cost more than the memory traffic). Here every gradient of one dtype is one launch: each
program takes one output unit (a row of ``cols`` contiguous entries), sums it in float32 (float64 for
float64), subtracts its mean and rounds once into the gradient's dtype; the row is read twice, the second
time from L2. What does not change between steps is a table built once per plan: for every row, its job
and offset; for every job, its row length and planned geometry. Per step only the gradients' addresses
change: one host-to-device copy of one ``int64`` per tensor, then the launches. No buffer beyond one float
per row (for the diagnostics, on logging steps) is allocated.

Opt-in on CUDA (``LIGHTNING_GC_TRITON=1``): no GPU has measured it against the eager routes yet, so they
stay the default. Triton is optional and imported only when the route is asked for. Its interpreter
(``TRITON_INTERPRET=1``, with numpy) runs the same kernel on CPU tensors, which is how CI tests it; the
interpreter converts float32 to bfloat16 by truncation where a GPU rounds to nearest even, so bfloat16
results are only compared bit for bit on a GPU (``benchmarks/gpu_check.py``).

Example:
    >>> from lightning_gc.triton_kernel import ENV_SWITCH, enabled
    >>> ENV_SWITCH, enabled({"LIGHTNING_GC_TRITON": "0"})
    ('LIGHTNING_GC_TRITON', False)
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_gc.native.route import row_layout, storage_span

if TYPE_CHECKING:
    from lightning_gc.unit import Unit

ENV_SWITCH = "LIGHTNING_GC_TRITON"
"""``1`` turns the Triton route on for CUDA gradients (off by default: unmeasured on GPUs)."""
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MAX_BLOCK = 1024
"""Entries a program reads per iteration; longer rows loop."""


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the user asked for the Triton route (``LIGHTNING_GC_TRITON=1``)."""
    return environ.get(ENV_SWITCH, "0") == "1"


def interpreting(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``): kernels then take CPU tensors."""
    return environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _kernel() -> Any:
    """The jitted kernel; importing Triton only here keeps it optional."""
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]
    def centralize_rows(  # type: ignore[no-untyped-def]
        addresses, weight_addresses, coefficients, row_job, row_offset, job_cols, removed,
        DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, STATS: tl.constexpr, DECAY: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        job = tl.load(row_job + row)
        offset = tl.load(row_offset + row)
        cols = tl.load(job_cols + job)
        address = tl.load(addresses + job)
        live_cols = tl.where(address != 0, cols, 0)  # address 0: a gradient this call skips, nothing is read
        grad = address.to(tl.pointer_type(DTYPE)) + offset
        total = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, live_cols, BLOCK):
            lanes = start + tl.arange(0, BLOCK)
            total += tl.load(grad + lanes, mask=lanes < cols, other=0.0).to(ACC)
        mean = tl.sum(total, axis=0) / cols
        shift = mean
        if DECAY:
            coefficient = tl.load(coefficients + job)
            if coefficient != 0.0:
                weight = tl.load(weight_addresses + job).to(tl.pointer_type(DTYPE)) + offset
                weights = tl.zeros([BLOCK], dtype=ACC)
                for start in range(0, live_cols, BLOCK):
                    lanes = start + tl.arange(0, BLOCK)
                    weights += tl.load(weight + lanes, mask=lanes < cols, other=0.0).to(ACC)
                shift = mean + coefficient * (tl.sum(weights, axis=0) / cols)
        for start in range(0, live_cols, BLOCK):
            lanes = start + tl.arange(0, BLOCK)
            values = tl.load(grad + lanes, mask=lanes < cols, other=0.0).to(ACC)
            tl.store(grad + lanes, (values - shift).to(DTYPE), mask=lanes < cols)
        if STATS:
            tl.store(removed + row, mean * mean * cols)

    return centralize_rows


def _triton_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
    }[dtype]


class _Group:
    """The jobs of one dtype on one device: one launch per step, over all their rows."""

    def __init__(self, jobs: list[int], layouts: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device):
        self.jobs = jobs
        self.dtype = dtype
        self.rows = sum(rows for rows, _, _ in layouts)
        row_job = [j for j, (rows, _, _) in zip(jobs, layouts) for _ in range(rows)]
        row_offset = [r * stride for rows, _, stride in layouts for r in range(rows)]
        self.row_job = torch.tensor(row_job, dtype=torch.int32, device=device)
        self.row_offset = torch.tensor(row_offset, dtype=torch.int64, device=device)
        longest = max(cols for _, cols, _ in layouts)
        self.block = min(MAX_BLOCK, 1 << max(4, math.ceil(math.log2(longest))))
        self.acc = torch.float64 if dtype == torch.float64 else torch.float32


class TritonRoute:
    """The Triton kernel over the eligible units of an executor's plan (the seam of ``NativeRoute``).

    Args:
        units: the plan's :class:`~lightning_gc.unit.Unit` list.
        devices: device types it takes (``("cuda",)``; the interpreter's tests pass ``("cpu",)``).

    Each job records the dtype, shape, strides and storage span it was planned for; a gradient that differs
    in any of them, requires grad or lives elsewhere is declined to the eager route for that call.
    """

    def __init__(self, units: Sequence[Unit], devices: tuple[str, ...] = ("cuda",)) -> None:
        picked = []
        for i, unit in enumerate(units):
            param = unit.param
            if type(param.data) is not Tensor or param.device.type not in devices or unit.groups != 1:
                continue
            if not unit.single_unit_dim:  # rows need one dim indexing every output unit
                continue
            if param.dtype not in DTYPES or param.numel() == 0:
                continue
            layout = row_layout(param.shape, param.stride(), unit.unit_dim)
            if layout is not None:
                picked.append((i, layout))
        self.indices = [i for i, _ in picked]
        self.params = [units[i].param for i in self.indices]
        self.decay = [units[i].decay for i in self.indices]
        self.launches = 0
        """Kernel launches of the last :meth:`run` (one per dtype and device)."""
        self._dtype = [p.dtype for p in self.params]
        self._device = [p.device for p in self.params]
        self._shape = [p.shape for p in self.params]
        self._stride = [p.stride() for p in self.params]
        self._bytes = [storage_span(p.shape, p.stride()) * p.element_size() for p in self.params]
        by_key: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for j, p in enumerate(self.params):
            by_key.setdefault((p.dtype, p.device), []).append(j)
        self._groups: list[_Group] = []
        self._uploaded: tuple[list[int], list[int], float] | None = None
        self._tables: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        for (dtype, device), jobs in by_key.items():
            self._groups.append(_Group(jobs, [picked[j][1] for j in jobs], dtype, device))
        for device in {p.device for p in self.params}:
            n = len(self.params)
            cols = torch.tensor([layout[1] for _, layout in picked], dtype=torch.int64, device=device)
            coefficients = torch.zeros(n, dtype=torch.float64, device=device)
            addresses = torch.zeros(n, dtype=torch.int64, device=device)
            weights = torch.zeros(n, dtype=torch.int64, device=device)
            self._tables[device] = (addresses, weights, coefficients, cols)

    def run(self, grads: Sequence[Tensor | None], grad_scale: float, removed: list[Tensor | float] | None) -> list[int]:
        """Centralize this route's ``grads`` in place; return the indices of those it had to decline."""
        declined: list[int] = []
        pointers = [0] * len(self.indices)
        weight_pointers = [0] * len(self.indices)
        for j, i in enumerate(self.indices):
            grad = grads[i]
            if grad is None:
                continue
            if self._fits(j, grad) and (not self.decay[j] or self._fits(j, self.params[j].detach())):
                pointers[j] = grad.data_ptr()
                if self.decay[j]:
                    weight_pointers[j] = self.params[j].data_ptr()
            else:
                declined.append(i)
        self.launches = 0
        if not any(pointers):
            return declined
        kernel = _kernel()
        decayed = any(self.decay)
        uploaded = (pointers, weight_pointers, grad_scale)
        if uploaded != self._uploaded:  # static gradients (zero_grad(set_to_none=False)) keep their addresses
            if any(_capturing(device) for device in self._tables):
                raise RuntimeError(
                    "GC's Triton route saw new gradient addresses inside a CUDA graph capture: a captured step needs"
                    " static gradients (zero_grad(set_to_none=False)) and one GC call on them before capture."
                )
            for addresses, weights, coefficients, _ in self._tables.values():
                addresses.copy_(torch.tensor(pointers, dtype=torch.int64), non_blocking=True)
                if decayed:
                    weights.copy_(torch.tensor(weight_pointers, dtype=torch.int64), non_blocking=True)
                    coefficients.copy_(torch.tensor([d * grad_scale for d in self.decay], dtype=torch.float64))
            self._uploaded = uploaded
        for group in self._groups:
            addresses, weights, coefficients, cols = self._tables[self._device[group.jobs[0]]]
            if not any(pointers[j] for j in group.jobs):
                continue
            rows = group.rows
            stats = torch.empty(rows if removed is not None else 1, dtype=group.acc, device=group.row_job.device)
            kernel[(rows,)](
                addresses, weights, coefficients, group.row_job, group.row_offset, cols, stats,
                DTYPE=_triton_dtype(group.dtype), ACC=_triton_dtype(group.acc), BLOCK=group.block,
                STATS=removed is not None, DECAY=decayed,
            )  # fmt: skip
            self.launches += 1
            if removed is not None:
                removed.append(stats.sum(dtype=torch.float64))
        live_grads = [grads[i] for j, i in enumerate(self.indices) if pointers[j]]
        torch.autograd.graph.increment_version(live_grads)  # type: ignore[arg-type]  # written behind autograd's back
        return declined

    def _fits(self, j: int, tensor: Tensor) -> bool:
        """Whether ``tensor`` has job ``j``'s planned dtype, device, shape, strides and storage span."""
        return (
            tensor.dtype is self._dtype[j]
            and tensor.device == self._device[j]
            and tensor.stride() == self._stride[j]
            and tensor.shape == self._shape[j]
            and type(tensor) is Tensor
            and not tensor.requires_grad
            and not tensor.is_neg()
            and tensor.storage_offset() * tensor.element_size() + self._bytes[j] <= tensor.untyped_storage().nbytes()
        )


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def triton_route(units: Sequence[Unit]) -> TritonRoute | None:
    """A :class:`TritonRoute` for the CUDA units when ``LIGHTNING_GC_TRITON=1`` and Triton imports; else ``None``."""
    if not enabled():
        return None
    try:
        _kernel()
    except ImportError:
        import warnings

        warnings.warn(f"{ENV_SWITCH}=1 but Triton is not installed: GC runs on the eager routes", stacklevel=2)
        return None
    devices = ("cuda", "cpu") if interpreting() else ("cuda",)
    route = TritonRoute(units, devices)
    return route if route.indices else None
