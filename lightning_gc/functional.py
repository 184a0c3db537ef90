"""Gradient Centralization for plain PyTorch and Lightning Fabric loops."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_gc.centralize import Mode
from lightning_gc.config import GCConfig
from lightning_gc.diagnostics import GCStats
from lightning_gc.plan import GCPlan
from lightning_gc.plan_cache import PlanCache
from lightning_gc.selection import DEFAULT_EXCLUDED_MODULES, ModuleSpec
from lightning_gc.sharding import AppliesGC
from lightning_gc.sharding.dtensor import DTensorPlan, has_dtensors
from lightning_gc.sharding.guard import UnsupportedGradientLayoutError


def centralize_gradients(
    model_or_params: nn.Module | Iterable[nn.Parameter],
    *,
    optimizer: Optimizer | None = None,
    conv_only: bool = False,
    mode: Mode = "channel",
    centralize_weight_decay: bool = False,
    exclude: Sequence[str] = (),
    exclude_modules: Sequence[ModuleSpec] = DEFAULT_EXCLUDED_MODULES,
    compute_stats: bool = False,
    compile: bool | str = False,
) -> GCStats:
    """Centralize gradients in place: call it after ``backward()`` and before ``optimizer.step()``.

    The plan (which tensors, along which dims) is cached per model or optimizer and options, and rebuilt
    when their parameters change; pass the model rather than ``model.parameters()`` to benefit from it.

    Given a module, module types are known: ``conv_only``, the embedding exclusion (``exclude_modules``) and
    transposed convolutions (centralized per output channel, dim 1) work as in the callback. Given an
    iterable of parameters, only the dimension rule (``ndim >= 2``) and ``exclude`` patterns (matched
    against ``param_<i>``) apply; ``conv_only=True`` is then an error.

    DTensor parameters (FSDP2 ``fully_shard``, tensor parallel, e.g. under Fabric's ``ModelParallelStrategy``)
    are centralized exactly in their sharded layout; then every rank must make the call (it communicates).

    Args:
        model_or_params: the model, or the parameters to consider.
        optimizer: restrict to this optimizer's parameters; needed for ``centralize_weight_decay``.
        conv_only, mode, centralize_weight_decay, exclude, exclude_modules: as in
            :class:`~lightning_gc.GradientCentralization`.
        compute_stats: also measure the gradient norm and the removed-norm ratio (one extra read pass).
        compile: as in :class:`~lightning_gc.GradientCentralization` (dense gradients only).

    Returns:
        :class:`~lightning_gc.diagnostics.GCStats` for the tensors centralized.

    Raises:
        ValueError: for invalid options, or ``centralize_weight_decay`` without ``optimizer``.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
        >>> model(torch.randn(2, 1, 28, 28)).sum().backward()
        >>> stats = centralize_gradients(model)
        >>> stats.tensors
        2
    """
    config = _config(conv_only, mode, centralize_weight_decay, tuple(exclude), tuple(exclude_modules), compile)
    if centralize_weight_decay and optimizer is None:
        raise ValueError("`centralize_weight_decay=True` needs `optimizer=`: the decay is read from its param groups")
    if not isinstance(model_or_params, nn.Module):
        model_or_params = list(model_or_params)  # read twice: for the cache signature and for planning
    plan = _PLANS.get(model_or_params, config, optimizer, lambda: build_plan(model_or_params, config, optimizer))
    return plan.apply(compute_stats=compute_stats)


def build_plan(
    model_or_params: nn.Module | Iterable[nn.Parameter], config: GCConfig, optimizer: Optimizer | None = None
) -> AppliesGC:
    """The plan for ``config``; keep it to skip re-planning on every step.

    A :class:`~lightning_gc.plan.GCPlan` for dense gradients; a
    :class:`~lightning_gc.sharding.dtensor.DTensorPlan` when parameters are DTensors (FSDP2 / tensor
    parallel, e.g. Fabric's ``ModelParallelStrategy``); a :class:`~lightning_gc.sharding.fsdp.FlatShardPlan`
    for a module wrapped in FSDP1 (``FullyShardedDataParallel``). Sharded plans communicate: call their
    ``apply`` on every rank.

    Raises:
        UnsupportedGradientLayoutError: for bare FSDP-flattened parameters (pass the wrapped module instead).
    """
    selector = config.selector()
    module = model_or_params if isinstance(model_or_params, nn.Module) else None
    if module is not None and _is_fsdp1(module):
        from lightning_gc.sharding.fsdp import FlatShardPlan

        _warn_compile_unused(config, "FSDP-wrapped modules")
        return FlatShardPlan.for_optimizer(optimizer, module, module, config, _warn, "FullyShardedDataParallel")
    if module is None:
        model_or_params = list(model_or_params)
        _refuse_flattened(model_or_params)
    if optimizer is not None:
        only = None if module is not None else {id(p) for p in model_or_params}
        plan = GCPlan.for_config(optimizer, module, config, _warn, only=only)
    elif module is not None:
        plan = GCPlan.for_module(module, selector, config.mode, warn=_warn, compile=config.compile)
    else:
        plan = GCPlan.for_params(model_or_params, selector, config.mode, warn=_warn, compile=config.compile)
    if has_dtensors(t.target.param for t in plan.targets):  # Fabric's ModelParallelStrategy: FSDP2, TP
        _warn_compile_unused(config, "DTensor parameters")
        return DTensorPlan(plan.targets, plan.mode, warn=_warn)
    return plan


def _warn_compile_unused(config: GCConfig, what: str) -> None:
    if config.compile is not False:
        _warn(
            f"`compile={config.compile!r}` has no effect on {what}: their sharded gradients take their own exact routes"
        )


def _is_fsdp1(module: nn.Module) -> bool:
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in module.modules())


def _refuse_flattened(params: list[nn.Parameter]) -> None:
    if any(getattr(p, "_fsdp_flattened", False) for p in params):
        raise UnsupportedGradientLayoutError(
            "centralize_gradients got parameters flattened by FSDP: their gradients are 1-D shards. Pass the"
            " FSDP-wrapped module (with `optimizer=` to restrict to its parameters) so the shards can be mapped back."
        )


_PLANS = PlanCache()


def _config(*options: Any) -> GCConfig:
    """``GCConfig(*options)``, validated once per distinct options: this runs on every training step."""
    try:
        return _validated_config(*options)
    except TypeError:  # unhashable options (say, a list inside `exclude`): validate them every time
        return GCConfig(*options)


@functools.lru_cache(maxsize=32, typed=True)  # typed: `1` is no valid `True`
def _validated_config(*options: Any) -> GCConfig:
    return GCConfig(*options)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _warn(message: str) -> None:
    """Warn on the caller's line: plans are built lazily, at varying depths, so no fixed ``stacklevel`` fits."""
    warnings.warn(message, UserWarning, stacklevel=_stacklevel_outside_package())


def _stacklevel_outside_package() -> int:
    """The ``stacklevel`` for :func:`_warn` that names the first frame outside ``lightning_gc``.

    ``warnings.warn(skip_file_prefixes=...)`` does this on Python 3.12+ only.
    """
    frame = sys._getframe(2)  # the caller of `_warn`; level 1 is `_warn` itself
    level = 2
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level
