"""How a plan's gradients are centralized, decided once per plan and run every step.

Four routes, all exact (float32 accumulation for half precision, one rounding):

- native (CPU, on by default): the fused kernel of :mod:`lightning_gc.native`, one call for every gradient
  whose output units are contiguous rows, each read once from memory;
- stacks: small gradients of one shape are centralized a stack at a time (:mod:`lightning_gc.stacking`),
  a handful of operator calls per stack instead of two per tensor;
- singles: every other gradient on its own, big ones a cache-sized block of output units at a time, half
  precision on CPU through a bounded float32 scratch buffer (:func:`~lightning_gc.centralize.centralize_view_`);
- compiled (opt-in, taking precedence): one ``torch.compile``'d graph for the gradients without
  weight-decay compensation, a fused read-reduce-subtract kernel per tensor (:mod:`lightning_gc.compiled`).

What the first routes do not take (gradients on GPUs, unusual layouts, no C compiler) goes to the eager ones.

Temporaries stay within the plan's budget: 1% of its gradient bytes (at least ``MIN_BUDGET_BYTES``),
plus one mean per output unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_gc.centralize import (
    DEFAULT_BLOCK_BYTES,
    accumulation_dtype,
    centralize_view_,
    needs_scratch,
    removed_sq_norm,
)
from lightning_gc.compiled import CompiledCentralizer
from lightning_gc.native import kernel as native_kernel
from lightning_gc.native.route import NativeRoute
from lightning_gc.stacking import centralize_stacked_, stack_size

MIN_BUDGET_BYTES = 32 << 10
"""Floor of the temporary-memory budget, so that tiny models are not processed in slivers."""
BUDGET_FRACTION = 100
"""Temporaries stay within 1/100 of the planned gradients' bytes (plus one mean per output unit)."""
STACK_MAX_BYTES = 32 << 10
"""Gradients up to this size are stacked with others of their shape; above it a stack's copy costs more
than the per-call overhead it saves (measured on ResNet-50 shapes, see docs/performance.md)."""
BLOCK_MIN_BYTES = 32 << 20
"""Tensors bigger than this (beyond a typical L3) are processed in blocks of ``DEFAULT_BLOCK_BYTES``; smaller
ones are cache-resident between the two passes anyway and blocking would only add calls."""


@dataclass
class Unit:
    """One target's plan-time constants (autograd keeps a ``.grad``'s dtype and device those of its parameter)."""

    param: torch.nn.Parameter
    view: Callable[[Tensor], Tensor]
    groups: int
    decay: float
    numel: int
    dims: tuple[int, ...]
    unit_dim: int | None
    acc: torch.dtype = field(init=False)
    staged: bool = field(init=False)
    block_elements: int = field(init=False)
    direct: bool = field(init=False)
    output_units: int = field(init=False)

    def __post_init__(self) -> None:
        shape = self.param.shape  # as RowLayout.view would show it, without viewing (the param may be a DTensor)
        if self.groups > 1:
            shape = (self.groups, shape[0] // self.groups, *shape[1:])
        self.output_units = math.prod(size for d, size in enumerate(shape) if d not in self.dims)
        self.acc = accumulation_dtype(self.param.dtype)
        self.staged = needs_scratch(self.param)
        big = self.numel * self.param.element_size() > BLOCK_MIN_BYTES and self.param.device.type == "cpu"
        self.block_elements = DEFAULT_BLOCK_BYTES // self.param.element_size() if big else self.numel
        self.direct = not (self.staged or big or self.decay or self.groups > 1 or self.unit_dim is None)

    def centralize_(self, grad: Tensor, scratch: Tensor | None, grad_scale: float) -> Tensor:
        """Centralize ``grad`` on its own; return the mean removed."""
        if self.direct:  # the common case, kept to two operator calls
            mean = grad.mean(dim=self.dims, keepdim=True, dtype=self.acc)
            grad.sub_(mean)
            return mean
        block_elements = scratch.numel() if scratch is not None and self.staged else self.block_elements
        weight = self.view(self.param.detach()) if self.decay else None
        return centralize_view_(
            self.view(grad), self.dims, self.unit_dim, block_elements, scratch if self.staged else None,
            weight, self.decay * grad_scale,
        )  # fmt: skip


@dataclass
class Stack:
    """Indices of same-shape small units and how many share one buffer."""

    indices: list[int]
    dims: tuple[int, ...]
    numel: int
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

    def __init__(self, units: list[Unit], compile: bool | str = False, warn: Callable[[str], None] = print) -> None:
        self.units = units
        total = sum(u.numel * u.param.element_size() for u in units)
        # the budget holds the buffers; the means of the biggest tensor (full and per block) come on top
        means = max((8 * u.output_units for u in units), default=0)
        self.budget_bytes = max(MIN_BUDGET_BYTES, total // BUDGET_FRACTION - means)
        self.compiled = CompiledCentralizer(warn, _backend(compile)) if compile is not False else None
        fused = native_kernel()
        self.native = NativeRoute(fused, units) if fused is not None else None
        if self.native is not None and not self.native.indices:
            self.native = None
        native = set(self.native.indices) if self.native is not None else set()
        eager = [i for i in range(len(units)) if i not in native]
        self.stacks = _stacks(units, eager, self.budget_bytes)
        stacked = {i for s in self.stacks for i in s.indices}
        self.singles = [i for i in eager if i not in stacked]

    def run(self, grads: list[Tensor | None], grad_scale: float, removed: list[Tensor] | None) -> None:
        """Centralize ``grads`` (aligned with the units; ``None`` entries are skipped) in place.

        Appends the squared norms of what was removed to ``removed`` when given.
        """
        done = self._run_compiled(grads, removed) if self.compiled is not None else set()
        leftovers: list[int] = []
        if self.native is not None:
            pending = [None if i in done else g for i, g in enumerate(grads)] if done else grads
            leftovers = self.native.run(pending, grad_scale, removed)
        for stack in self.stacks:
            # autograd refuses a .grad of another dtype than its parameter, so members share the stack's dtype
            members = [grads[i] for i in stack.indices if i not in done]
            if any(g is None for g in members):
                members = [g for g in members if g is not None]
            if len(members) < 2:
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

    def _run_compiled(self, grads: list[Tensor | None], removed: list[Tensor] | None) -> set[int]:
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


def unit_of(param: torch.nn.Parameter, layout_view: Callable[[Tensor], Tensor], groups: int, decay: float,
            dims: tuple[int, ...], unit_dim: int | None) -> Unit:  # fmt: skip
    """A :class:`Unit` for ``param``."""
    return Unit(param, layout_view, groups, decay, param.numel(), dims, unit_dim)


def _stacks(units: list[Unit], candidates: list[int], budget_bytes: int) -> list[Stack]:
    """Group the small, undecayed, ungrouped ``candidates`` by (shape, dtype, device, dims)."""
    keyed: dict[tuple, list[int]] = {}
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
            stacks.append(Stack(indices, dims, numel, per_stack, serial_per_stack))
    return stacks


def _backend(compile: bool | str) -> str:
    if compile is True:
        return "inductor"
    if isinstance(compile, str) and compile in torch._dynamo.list_backends(exclude_tags=()):
        return compile
    raise ValueError(
        f"`compile` must be True, False or a torch.compile backend name"
        f" {torch._dynamo.list_backends(exclude_tags=())}, got {compile!r}"
    )
