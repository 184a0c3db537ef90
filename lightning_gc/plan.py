"""A plan: which gradients of one optimizer GC touches and how, built once and applied every step."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_gc.centralize import Mode
from lightning_gc.config import GCConfig
from lightning_gc.diagnostics import GCStats
from lightning_gc.executor import Executor, Unit, unit_of
from lightning_gc.selection import Selector, Target
from lightning_gc.sharding.guard import check_dense_gradient
from lightning_gc.weight_decay import DecayKind, compensation, decay_kind

Warn = Callable[[str], None]


@dataclass(frozen=True)
class PlannedTarget:
    """A target and the coupled weight-decay coefficient to compensate for (0.0: none)."""

    target: Target
    decay: float = 0.0


class GCPlan:
    """The gradients GC touches for one optimizer (or one set of parameters), and how.

    Build it with :meth:`for_optimizer` or :meth:`for_params`; call :meth:`apply` after every backward.
    Everything that does not depend on the gradients' values is decided here, once: the dims to average
    over, the memory budget, and which small gradients of equal shape are stacked together.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> plan = GCPlan.for_params(model.parameters(), Selector(), mode="channel")
        >>> model(torch.randn(4, 3)).sum().backward()
        >>> stats = plan.apply()
        >>> bool(model.weight.grad.sum(dim=1).abs().max() < 1e-6)
        True
    """

    def __init__(
        self,
        targets: list[PlannedTarget],
        mode: Mode,
        warn: Warn,
        strategy_name: str = "",
        compile: bool | str = False,
    ) -> None:
        self.targets = targets
        self.mode = mode
        self._warn = warn
        self._strategy_name = strategy_name
        self._sparse_warned = False
        self._params = [planned.target.param for planned in targets]
        self._shapes = [param.shape for param in self._params]
        self._executor = Executor([_unit(planned, mode) for planned in targets], compile=compile, warn=warn)

    @classmethod
    def for_config(
        cls,
        optimizer: Optimizer,
        module: nn.Module | None,
        config: GCConfig,
        warn: Warn = print,
        strategy_name: str = "",
        only: set[int] | None = None,
    ) -> GCPlan:
        """:meth:`for_optimizer` with every option taken from a validated :class:`~lightning_gc.config.GCConfig`."""
        return cls.for_optimizer(
            optimizer,
            config.selector(),
            config.mode,
            module=module,
            centralize_weight_decay=config.centralize_weight_decay,
            warn=warn,
            strategy_name=strategy_name,
            only=only,
            compile=config.compile,
        )

    @classmethod
    def for_optimizer(
        cls,
        optimizer: Optimizer,
        selector: Selector,
        mode: Mode,
        module: nn.Module | None = None,
        centralize_weight_decay: bool = False,
        warn: Warn = print,
        strategy_name: str = "",
        only: set[int] | None = None,
        compile: bool | str = False,
    ) -> GCPlan:
        """Plan for the parameters in ``optimizer.param_groups`` (owners looked up in ``module`` if given).

        ``only`` restricts the plan to parameters with these ``id``s. ``compile`` tries the
        ``torch.compile`` route first (:mod:`lightning_gc.compiled`): ``True`` for Inductor, or a backend name.
        """
        planned: list[PlannedTarget] = []
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if only is None or id(p) in only]
            targets = (
                selector.select_from_module(module, params)
                if module is not None
                else selector.select_from_params(params)
            )
            decay = _decay_for_group(optimizer, group, warn) if centralize_weight_decay and targets else 0.0
            planned.extend(PlannedTarget(t, decay) for t in targets)
        _warn_about_selection(selector, planned, f"{type(optimizer).__name__} optimizer", warn)
        return cls(planned, mode, warn, strategy_name, compile=compile)

    @classmethod
    def for_module(
        cls, module: nn.Module, selector: Selector, mode: Mode, warn: Warn = print, compile: bool | str = False
    ) -> GCPlan:
        """Plan for all parameters of ``module``, with module types known."""
        planned = [PlannedTarget(t) for t in selector.select_from_module(module)]
        _warn_about_selection(selector, planned, type(module).__name__, warn)
        return cls(planned, mode, warn, compile=compile)

    @classmethod
    def for_params(
        cls,
        params: Iterable[nn.Parameter],
        selector: Selector,
        mode: Mode,
        warn: Warn = print,
        compile: bool | str = False,
    ) -> GCPlan:
        """Plan for bare parameters: only the dimension rule and ``exclude`` patterns apply."""
        planned = [PlannedTarget(t) for t in selector.select_from_params(params)]
        _warn_about_selection(selector, planned, "given parameters", warn)
        return cls(planned, mode, warn, compile=compile)

    def apply(self, compute_stats: bool = False, grad_scale: float = 1.0) -> GCStats:
        """Centralize every planned gradient in place; skip those whose ``.grad`` is None.

        Gradients are read afresh on every call (``zero_grad(set_to_none=True)`` makes new tensors); only
        their expected layout is planned.

        Args:
            compute_stats: also measure the gradient norm and what GC removed (one extra read pass).
            grad_scale: the loss scale the gradients still carry (fused optimizers unscale themselves);
                stats are reported unscaled and the weight-decay compensation is scaled to match.
        """
        grads = self._checked_gradients()
        live = [g for g in grads if g is not None]
        stats = GCStats(tensors=len(live), elements=sum(map(Tensor.numel, live)))
        if not live:
            return stats
        removed: list[Tensor] | None = [] if compute_stats else None
        if compute_stats:
            stats.grad_sq = _sum_of_squares(live) / grad_scale**2
        self._executor.run(grads, grad_scale, removed)
        if removed is not None:
            stats.removed_sq = torch.stack([r.float() for r in removed]).sum() / grad_scale**2
        return stats

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
            target = self.targets[index].target
            if grad.is_sparse:
                self._warn_sparse(target)
                grads[index] = None
                continue
            check_dense_gradient(target, grad, self._strategy_name)
        return grads

    def _warn_sparse(self, target: Target) -> None:
        if not self._sparse_warned:
            self._sparse_warned = True
            self._warn(
                f"GradientCentralization skips sparse gradients (first seen: `{target.name}`, e.g. from"
                " `nn.Embedding(sparse=True)`): GC needs every entry of a row. Exclude the parameter to silence this."
            )


def _unit(planned: PlannedTarget, mode: Mode) -> Unit:
    param, layout = planned.target.param, planned.target.layout
    dims = layout.reduce_dims(param.ndim, mode)
    return unit_of(param, layout.view, layout.groups, planned.decay, dims, layout.unit_dim(mode))


def plan_signature(optimizer: Optimizer) -> Hashable:
    """Changes whenever the optimizer's parameters or decay settings do, so a cached plan can be reused."""
    return tuple(
        (
            tuple(map(id, g["params"])),
            tuple(p.requires_grad for p in g["params"]),  # the selector skips frozen parameters
            g.get("weight_decay"),
            g.get("maximize"),
            g.get("decoupled_weight_decay"),
        )
        for g in optimizer.param_groups
    )


def _decay_for_group(optimizer: Optimizer, group: dict[str, Any], warn: Warn) -> float:
    kind = decay_kind(optimizer, group)
    name = type(optimizer).__name__
    if kind is DecayKind.COUPLED:
        return compensation(group)
    if kind is DecayKind.DECOUPLED:
        warn(
            f"`centralize_weight_decay=True` does not apply to {name}: its weight decay is decoupled (it never"
            " enters the gradient), so only the gradient is centralized. Use a coupled-decay optimizer (SGD, Adam"
            " with weight_decay) for the paper's GC(g + lambda * w)."
        )
    elif kind is DecayKind.UNKNOWN:
        warn(
            f"`centralize_weight_decay=True`: lightning-gc does not know whether {name} couples its weight decay"
            " into the gradient, so its decay is not centralized. Supported: "
            "SGD, Adam, Adamax, Adagrad, Adadelta, RMSprop, ASGD, NAdam, RAdam."
        )
    return 0.0


def _warn_about_selection(selector: Selector, planned: list[PlannedTarget], what: str, warn: Warn) -> None:
    if selector.unmatched_patterns:
        warn(f"GradientCentralization `exclude` patterns matched no parameter: {selector.unmatched_patterns}")
    if not planned:
        warn(
            f"GradientCentralization found nothing to centralize in the {what}: GC applies to weights with"
            " ndim >= 2 (conv, linear, RNN), minus `exclude`/`exclude_modules` (and non-conv layers if `conv_only`)."
        )


def _sum_of_squares(grads: list[Tensor]) -> Tensor:
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for group in by_dtype.values():
        norms = torch._foreach_norm(group)
        total = total + torch.stack([n.float() for n in norms]).square().sum()
    return total
