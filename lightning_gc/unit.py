"""A planned gradient's constants: what the executor and the fused kernel's route both read.

Its own module so that imports point one way: :mod:`lightning_gc.executor` and
:mod:`lightning_gc.native.route` both import it, and it imports neither.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_gc.centralize import DEFAULT_BLOCK_BYTES, accumulation_dtype, centralize_view_, needs_scratch
from lightning_gc.layouts import Mode
from lightning_gc.selection import Target

BLOCK_MIN_BYTES = 32 << 20
"""Tensors bigger than this (beyond a typical L3) are processed in blocks of ``DEFAULT_BLOCK_BYTES``; smaller
ones are cache-resident between the two passes anyway and blocking would only add calls."""


@dataclass
class Unit:
    """One target's plan-time constants (autograd keeps a ``.grad``'s dtype and device those of its parameter).

    Args:
        param: the parameter.
        view: :meth:`~lightning_gc.layouts.RowLayout.view` of its layout.
        groups: the layout's ``groups``.
        decay: the coupled weight-decay coefficient to compensate (0.0: none).
        numel: entries in the parameter.
        dims: the dims of the view to average over.
        unit_dim: a dim of the view that indexes output units, ``None`` in tensor mode.
        single_unit_dim: whether one dim indexes all output units (the fused kernel's rows need it).
    """

    param: torch.nn.Parameter
    view: Callable[[Tensor], Tensor]
    groups: int
    decay: float
    numel: int
    dims: tuple[int, ...]
    unit_dim: int | None
    single_unit_dim: bool = True
    dtype: torch.dtype = field(init=False)
    acc: torch.dtype = field(init=False)
    staged: bool = field(init=False)
    block_elements: int = field(init=False)
    direct: bool = field(init=False)
    output_units: int = field(init=False)

    @classmethod
    def of(cls, target: Target, mode: Mode) -> Unit:
        """The unit for ``target`` in ``mode``."""
        param, layout = target.param, target.layout
        return cls(
            param,
            layout.view,
            layout.groups,
            target.decay,
            param.numel(),
            layout.reduce_dims(param.ndim, mode),
            layout.unit_dim(mode),
            single_unit_dim=mode == "tensor" or len(layout.out_dims) == 1,
        )

    def __post_init__(self) -> None:
        shape: tuple[int, ...] = tuple(self.param.shape)  # as RowLayout.view shows it (the param may be a DTensor)
        if self.groups > 1:
            shape = (self.groups, shape[0] // self.groups, *shape[1:])
        self.output_units = math.prod(size for d, size in enumerate(shape) if d not in self.dims)
        self.dtype = self.param.dtype
        self.acc = accumulation_dtype(self.param.dtype)
        self.staged = needs_scratch(self.param)
        big = self.numel * self.param.element_size() > BLOCK_MIN_BYTES and self.param.device.type == "cpu"
        self.block_elements = DEFAULT_BLOCK_BYTES // self.param.element_size() if big else self.numel
        self.direct = not (self.staged or big or self.decay or self.groups > 1 or self.unit_dim is None)

    def centralize_(self, grad: Tensor, scratch: Tensor | None, grad_scale: float) -> Tensor:
        """Centralize ``grad`` on its own; return the mean removed."""
        if grad.dtype != self.dtype:
            return self._centralize_other_dtype_(grad, grad_scale)
        if self.direct:  # the common case, kept to two operator calls
            mean = grad.mean(dim=self.dims, keepdim=True, dtype=self.acc)
            grad.sub_(mean)
            return mean
        block_elements = scratch.numel() if scratch is not None and self.staged else self.block_elements
        weight = self.view(self.param.detach()) if self.decay else None
        return centralize_view_(
            self.view(grad),
            self.dims,
            self.unit_dim,
            block_elements,
            scratch if self.staged else None,
            weight,
            self.decay * grad_scale,
        )

    def _centralize_other_dtype_(self, grad: Tensor, grad_scale: float) -> Tensor:
        """A gradient whose dtype is not its parameter's (``param.grad_dtype``): planned by the gradient, now."""
        scratch = None
        if needs_scratch(grad):
            scratch = torch.empty(max(1, min(grad.numel(), DEFAULT_BLOCK_BYTES // 4)), dtype=torch.float32)
        block_elements = scratch.numel() if scratch is not None else max(1, DEFAULT_BLOCK_BYTES // grad.element_size())
        weight = self.view(self.param.detach().to(grad.dtype)) if self.decay else None
        return centralize_view_(
            self.view(grad), self.dims, self.unit_dim, block_elements, scratch, weight, self.decay * grad_scale
        )
