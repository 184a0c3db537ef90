"""A plan: which gradients of one optimizer GC touches and how, built once and applied every step."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_gc.config import GCConfig
from lightning_gc.diagnostics import GCStats
from lightning_gc.errors import check_dense_gradient
from lightning_gc.errors import warn as warn_user
from lightning_gc.executor import Executor
from lightning_gc.layouts import Mode
from lightning_gc.selection import Selection, Target, select
from lightning_gc.unit import Unit

if TYPE_CHECKING:
    from torch.optim import Optimizer

Warn = Callable[[str], None]


class GCPlan:
    """The dense gradients GC touches for one optimizer (or one set of parameters), and how.

    Build it from the targets of a :func:`~lightning_gc.selection.select`; call :meth:`apply` after every
    backward. Everything that does not depend on the gradients' values is decided here, once (by the
    :class:`~lightning_gc.executor.Executor`): the route of each gradient, the dims to average over, the
    memory budget, and which small gradients of equal shape are stacked together.

    Args:
        targets: what to centralize (with their layouts and decay coefficients).
        mode: ``"channel"`` or ``"tensor"``.
        compile: try the ``torch.compile`` route first (:mod:`lightning_gc.compiled`): ``True`` for
            Inductor, or a backend name.
        warn: receives the plan's runtime warnings (sparse gradients, compilation unavailable).
        strategy_name: named in errors.
        selection: the selection the targets came from, kept for :func:`~lightning_gc.describe` and warnings.

    Example:
        >>> from torch import nn
        >>> from lightning_gc.config import GCConfig
        >>> from lightning_gc.selection import select
        >>> model = nn.Linear(3, 2)
        >>> plan = GCPlan(select(model, GCConfig()).targets, "channel")
        >>> model(torch.randn(4, 3)).sum().backward()
        >>> stats = plan.apply()
        >>> bool(model.weight.grad.sum(dim=1).abs().max() < 1e-6)
        True
    """

    def __init__(
        self,
        targets: list[Target],
        mode: Mode = "channel",
        *,
        compile: bool | str = False,
        warn: Warn = warn_user,
        strategy_name: str = "",
        selection: Selection | None = None,
    ) -> None:
        self.targets = targets
        self.mode = mode
        self.selection = selection
        self._warn = warn
        self.strategy_name = strategy_name
        self._sparse_warned = False
        self._params = [target.param for target in targets]
        self._shapes = [param.shape for param in self._params]
        self._numel = sum(param.numel() for param in self._params)
        self._executor = Executor([Unit.of(target, mode) for target in targets], compile=compile, warn=warn)

    def apply(self, compute_stats: bool = False, grad_scale: float = 1.0) -> GCStats:
        """Centralize every planned gradient in place; skip those whose ``.grad`` is None.

        Gradients are read afresh on every call (``zero_grad(set_to_none=True)`` makes new tensors); only
        their expected layout is planned.

        Args:
            compute_stats: also measure the gradient norm and what GC removed (the fused kernel sums the
                squares of the gradients it takes in its own pass; the others are read once more).
            grad_scale: the loss scale the gradients still carry (fused optimizers unscale themselves);
                stats are reported unscaled and the weight-decay compensation is scaled to match.
        """
        native = self._executor.only_native
        if native is not None:  # the kernel's own checks see every gradient first; None: not all as planned
            done = native.run_checked(self._params, grad_scale, compute_stats, from_params=True)
            if done is not None:
                return self._kernel_stats(*done, compute_stats, grad_scale)
        grads = self._checked_gradients()
        live = [g for g in grads if g is not None]
        stats = GCStats(tensors=len(live), elements=sum(map(Tensor.numel, live)))
        if not live:
            return stats
        removed: list[Tensor | float] | None = [] if compute_stats else None
        grad_sq: list[Tensor | float] | None = [] if compute_stats else None
        self._executor.run(grads, grad_scale, removed, grad_sq)
        if removed is not None and grad_sq is not None:
            stats.grad_sq = _total(grad_sq, live[0].device, grad_scale)
            stats.removed_sq = _total(removed, live[0].device, grad_scale)
        return stats

    def _kernel_stats(
        self, removed_sq: float, grad_sq: float, live: int, compute_stats: bool, grad_scale: float
    ) -> GCStats:
        """The stats of a step the kernel did alone: its host sums, as 0-dim float32 tensors like every route's."""
        if live == len(self._params):
            elements = self._numel
        else:
            elements = sum(p.grad.numel() for p in self._params if p.grad is not None)
        if compute_stats and live:
            return GCStats.from_host_sums(live, elements, grad_sq / grad_scale**2, removed_sq / grad_scale**2)
        return GCStats(tensors=live, elements=elements)

    def _checked_gradients(self) -> list[Tensor | None]:
        """The ``.grad`` of every target, ``None`` for missing and sparse ones; raises for sharded ones."""
        grads: list[Tensor | None] = [param.grad for param in self._params]
        unusual = [  # one comprehension: this runs every step over every target
            i
            for i, (grad, shape) in enumerate(zip(grads, self._shapes))
            if grad is None or type(grad) is not Tensor or grad.is_sparse or grad.shape != shape
        ]
        for index in unusual:
            grad = grads[index]
            if grad is None:
                continue
            target = self.targets[index]
            if grad.is_sparse:
                self._warn_sparse(target)
                grads[index] = None
                continue
            check_dense_gradient(target, grad, self.strategy_name)
        return grads

    def _warn_sparse(self, target: Target) -> None:
        if not self._sparse_warned:
            self._sparse_warned = True
            self._warn(
                f"GradientCentralization skips sparse gradients (first seen: `{target.name}`, e.g. from"
                " `nn.Embedding(sparse=True)`): GC needs every entry of a row. Exclude the parameter to silence this."
            )


def dense_plan(
    model_or_params: nn.Module | Iterable[nn.Parameter],
    config: GCConfig | None = None,
    optimizer: Optimizer | None = None,
    *,
    warn: Warn = warn_user,
) -> GCPlan:
    """A :class:`GCPlan` straight from :func:`~lightning_gc.selection.select`: no cache, no adapter.

    What the dense adapter builds; for benchmarks and tests of the dense routes.

    Example:
        >>> [t.name for t in dense_plan(nn.Sequential(nn.Linear(3, 2))).targets]
        ['0.weight']
    """
    config = config if config is not None else GCConfig()
    selection = select(model_or_params, config, optimizer, warn=warn)
    return GCPlan(selection.targets, config.mode, compile=config.compile, warn=warn, selection=selection)


def _total(parts: list[Tensor | float], device: torch.device, grad_scale: float) -> Tensor:
    """The unscaled float32 sum of squared norms some routes gave as host floats, others as tensors."""
    host = sum(p for p in parts if isinstance(p, float)) / grad_scale**2
    tensors = [p.float() for p in parts if isinstance(p, Tensor)]
    if not tensors:
        return torch.tensor(host, dtype=torch.float32)
    return torch.stack(tensors).sum() / grad_scale**2 + host
