"""How a plan's gradients are centralized, decided once per plan and run every step.

Four routes, all exact (float32 accumulation for half precision, one rounding):

- native (CPU, on by default): the fused kernel of :mod:`lightning_gc.native`, one call for every gradient
  whose output units are contiguous rows, each read once from memory;
- stacks: small gradients of one shape are centralized a stack at a time (:mod:`lightning_gc.stacking`),
  a handful of operator calls per stack instead of two per tensor;
- singles: every other gradient on its own, big ones a cache-sized block of output units at a time, half
  precision on CPU through a bounded float32 scratch buffer (:func:`~lightning_gc.centralize.centralize_view_`);
- triton (opt-in on CUDA, ``LIGHTNING_GC_TRITON=1``): one launch per dtype for every gradient whose output
  units are contiguous rows (:mod:`lightning_gc.triton_kernel`);
- compiled (opt-in, taking precedence): one ``torch.compile``'d graph for the gradients without
  weight-decay compensation, a fused read-reduce-subtract kernel per tensor (:mod:`lightning_gc.compiled`).

What the first routes do not take (gradients on GPUs, unusual layouts, no C compiler) goes to the eager ones.

Temporaries stay within the plan's budget: 1% of its gradient bytes (at least ``MIN_BUDGET_BYTES``),
plus one mean per output unit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gc.centralize import removed_sq_norm
from lightning_gc.compiled import CompiledCentralizer, compile_backend
from lightning_gc.errors import warn as warn_user
from lightning_gc.native import kernel as native_kernel
from lightning_gc.native.route import NativeRoute
from lightning_gc.stacking import centralize_stacked_, stack_size
from lightning_gc.triton_kernel import triton_route
from lightning_gc.unit import Unit

MIN_BUDGET_BYTES = 32 << 10
"""Floor of the temporary-memory budget, so that tiny models are not processed in slivers."""
BUDGET_FRACTION = 100
"""Temporaries stay within 1/100 of the planned gradients' bytes (plus one mean per output unit)."""
STACK_MAX_BYTES = 32 << 10
"""Gradients up to this size are stacked with others of their shape; above it a stack's copy costs more
than the per-call overhead it saves (measured on ResNet-50 shapes, see docs/performance.md)."""


@dataclass
class Stack:
    """Indices of same-shape small units and how many share one buffer."""

    indices: list[int]
    dims: tuple[int, ...]
    dtype: torch.dtype
    per_stack: int
    serial_per_stack: int


class Executor:
    """Runs a plan's units over the gradients of one step.

    Args:
        units: the plan's units, in plan order.
        compile: try the ``torch.compile`` route first (see :mod:`lightning_gc.compiled`); ``True`` for
            Inductor, or the name of another ``torch.compile`` backend.
        warn: where to report that compilation is unavailable.

    Raises:
        ValueError: for a ``compile`` that is neither a bool nor a known backend name.
    """

    def __init__(self, units: list[Unit], compile: bool | str = False, warn: Callable[[str], None] = warn_user) -> None:
        self.units = units
        total = sum(u.numel * u.param.element_size() for u in units)
        # the budget holds the buffers; the means of the biggest tensor (full and per block) come on top
        means = max((8 * u.output_units for u in units), default=0)
        self.budget_bytes = max(MIN_BUDGET_BYTES, total // BUDGET_FRACTION - means)
        self.compiled = CompiledCentralizer(warn, compile_backend(compile)) if compile is not False else None
        self.triton = triton_route(units)  # opt-in (LIGHTNING_GC_TRITON=1): CUDA gradients, one launch per dtype
        gpu = set(self.triton.indices) if self.triton is not None else set()
        # the kernel's rows are indexed by one dim: units with several output dims stay on the eager routes
        self._kernel_candidates = [i for i, u in enumerate(units) if u.single_unit_dim and i not in gpu]
        fused = native_kernel()
        self.native = NativeRoute(fused, [units[i] for i in self._kernel_candidates]) if fused is not None else None
        if self.native is not None and not self.native.indices:
            self.native = None
        if len(self._kernel_candidates) == len(units):
            self._kernel_candidates = []  # the identity: no remapping on every step
        native = {self._unit_index(j) for j in self.native.indices} if self.native is not None else set()
        eager = [i for i in range(len(units)) if i not in native and i not in gpu]
        self.stacks = _stacks(units, eager, self.budget_bytes)
        stacked = {i for s in self.stacks for i in s.indices}
        self.singles = [i for i in eager if i not in stacked]
        # every unit on the kernel, in plan order: the plan may hand the gradients straight to its checks
        self.only_native = self.native if not eager and not gpu and self.compiled is None and native_all(self) else None

    def run(
        self,
        grads: list[Tensor | None],
        grad_scale: float,
        removed: list[Tensor | float] | None,
        grad_sq: list[Tensor | float] | None = None,
    ) -> None:
        """Centralize ``grads`` (aligned with the units; ``None`` entries are skipped) in place.

        Appends the squared norms of what was removed to ``removed`` when given, and the squared norms of
        the gradients before GC to ``grad_sq`` when given: the fused kernel sums those it takes in its own
        pass; the others are read once more, before any route writes them.
        """
        if grad_sq is not None and (self.native is None or self.compiled is not None or self.triton is not None):
            live = [g for g in grads if g is not None]
            if live:
                grad_sq.append(sum_of_squares(live))
            grad_sq = None  # every gradient counted: the routes below need not
        done = self._run_compiled(grads, removed) if self.compiled is not None else set()
        leftovers: list[int] = []
        if self.triton is not None:
            leftovers = self.triton.run([None if i in done else g for i, g in enumerate(grads)], grad_scale, removed)
        if self.native is not None:
            pending = [None if i in done else g for i, g in enumerate(grads)] if done else grads
            if self._kernel_candidates:
                pending = [pending[i] for i in self._kernel_candidates]
            leftovers = [self._unit_index(j) for j in self.native.run(pending, grad_scale, removed, grad_sq)]
            if grad_sq is not None:  # the kernel left these untouched: count them before the eager routes run
                stacked = [i for stack in self.stacks for i in stack.indices]
                rest = [g for i in self.singles + stacked + leftovers if (g := grads[i]) is not None]
                if rest:
                    grad_sq.append(sum_of_squares(rest))
        for stack in self.stacks:
            # autograd refuses a .grad of another dtype than its parameter, so members share the stack's dtype
            members = [g for i in stack.indices if i not in done and (g := grads[i]) is not None]
            if len(members) < 2 or any(g.dtype != stack.dtype for g in members):  # see Unit: planned by the grad
                leftovers.extend(i for i in stack.indices if grads[i] is not None and i not in done)
                continue
            serial = members[0].device.type == "cpu" and torch.get_num_threads() > 1  # see SERIAL_ELEMENTS
            centralize_stacked_(members, stack.dims, stack.serial_per_stack if serial else stack.per_stack, removed)
        scratch = None
        for i in self.singles + leftovers:
            grad = grads[i]
            if grad is None or i in done:
                continue
            unit = self.units[i]
            if scratch is None and unit.staged:
                scratch = torch.empty(self.budget_bytes // 4, dtype=torch.float32)
            mean = unit.centralize_(grad, scratch, grad_scale)
            if removed is not None:
                removed.append(removed_sq_norm(mean, grad.numel()))

    def _unit_index(self, kernel_index: int) -> int:
        return self._kernel_candidates[kernel_index] if self._kernel_candidates else kernel_index

    def _run_compiled(self, grads: list[Tensor | None], removed: list[Tensor | float] | None) -> set[int]:
        assert self.compiled is not None
        chosen = [i for i, g in enumerate(grads) if g is not None and not self.units[i].decay]
        if not chosen:
            return set()
        specs = tuple((self.units[i].dims, self.units[i].groups) for i in chosen)
        removed_sq = self.compiled([grads[i] for i in chosen], specs)  # type: ignore[misc]
        if removed_sq is None:  # compilation unavailable, or too many variants: the eager routes take over
            return set()
        if removed is not None:
            removed.append(removed_sq)
        return set(chosen)


def native_all(executor: Executor) -> bool:
    """Whether ``executor``'s kernel route takes every unit, with jobs in unit order."""
    native = executor.native
    return native is not None and not executor._kernel_candidates and native.indices == list(range(len(executor.units)))


def _stacks(units: list[Unit], candidates: list[int], budget_bytes: int) -> list[Stack]:
    """Group the small, undecayed, ungrouped ``candidates`` by (shape, dtype, device, dims)."""
    keyed: dict[tuple[torch.Size, torch.dtype, torch.device, tuple[int, ...]], list[int]] = {}
    for index in candidates:
        u = units[index]
        if u.groups == 1 and not u.decay and u.numel * u.param.element_size() <= STACK_MAX_BYTES:
            keyed.setdefault((u.param.shape, u.param.dtype, u.param.device, u.dims), []).append(index)
    stacks = []
    for (_, dtype, _, dims), indices in keyed.items():
        numel = units[indices[0]].numel
        per_stack = stack_size(numel, dtype, budget_bytes)
        serial_per_stack = stack_size(numel, dtype, budget_bytes, serial=True)
        if len(indices) >= 2 and serial_per_stack >= 2:
            stacks.append(Stack(indices, dims, dtype, per_stack, serial_per_stack))
    return stacks


def sum_of_squares(grads: list[Tensor]) -> Tensor:
    """The squared L2 norm of ``grads`` together (float32), one ``_foreach_norm`` per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for group in by_dtype.values():
        norms = torch._foreach_norm(group)
        total = total + torch.stack([n.float() for n in norms]).square().sum()
    return total
