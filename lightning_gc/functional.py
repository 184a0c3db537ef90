"""Gradient Centralization for plain PyTorch and Lightning Fabric loops."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_gc.config import GCConfig, check_bool
from lightning_gc.diagnostics import GCStats
from lightning_gc.errors import warn
from lightning_gc.layouts import Mode
from lightning_gc.plan_cache import PlanCache
from lightning_gc.selection import DEFAULT_EXCLUDED_MODULES, ModuleSpec
from lightning_gc.sharding import AppliesGC, adapter_for_model, warn_if_compile_unused


def centralize_gradients(
    model_or_params: nn.Module | Iterable[nn.Parameter],
    *,
    optimizer: Optimizer | None = None,
    conv_only: bool = False,
    mode: Mode = "channel",
    centralize_weight_decay: bool = False,
    exclude: Sequence[str] | str = (),
    exclude_modules: Sequence[ModuleSpec] = DEFAULT_EXCLUDED_MODULES,
    compute_stats: bool = False,
    compile: bool | str = False,
) -> GCStats:
    """Centralize gradients in place: call it after ``backward()`` and before ``optimizer.step()``.

    The plan (which tensors, along which dims) is cached per model or optimizer and options, and rebuilt
    when their parameters change; pass the model rather than ``model.parameters()`` to benefit from it.

    Given a module, module types are known: the layout registry (:mod:`lightning_gc.layouts`),
    ``conv_only``, the embedding exclusion (``exclude_modules``) and transposed convolutions work as in the
    callback. Given an iterable of parameters, only the dimension rule (``ndim >= 2``) and ``exclude``
    patterns (matched against ``param_<i>``) apply; ``conv_only=True`` is then an error. Parameters whose
    layout had to be assumed (dim 0, no registered layer) are named in one warning;
    :func:`lightning_gc.describe` shows every decision.

    DTensor parameters (FSDP2 ``fully_shard``, tensor parallel, e.g. under Fabric's ``ModelParallelStrategy``),
    FSDP1-wrapped modules and DeepSpeed engines are centralized exactly in their sharded layout; then every
    rank must make the call (it communicates).

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
        ValueError: for invalid options (naming the argument), or ``centralize_weight_decay`` without ``optimizer``.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
        >>> model(torch.randn(2, 1, 28, 28)).sum().backward()
        >>> stats = centralize_gradients(model)
        >>> stats.tensors
        2
    """
    check_bool(compute_stats, "compute_stats")
    options = (conv_only, mode, centralize_weight_decay, exclude, exclude_modules, compile)
    plan = plan_for(model_or_params, optimizer, _config(*options))
    return plan.apply(compute_stats=compute_stats)


def plan_for(
    model_or_params: nn.Module | Iterable[nn.Parameter],
    optimizer: Optimizer | None = None,
    config: GCConfig | None = None,
) -> AppliesGC:
    """The plan :func:`centralize_gradients` applies for these arguments, from the shared cache.

    Plans are reused while the parameters (and the optimizer's groups) stay the same; the adapter
    (dense, DTensor, FSDP1 flat shards, ZeRO partitions) is read from the model. Sharded plans communicate:
    call their ``apply`` on every rank.

    Raises:
        ValueError: for a ``model_or_params`` or ``optimizer`` of the wrong type, or
            ``centralize_weight_decay`` without ``optimizer``.
        UnsupportedGradientLayoutError: for bare FSDP-flattened parameters (pass the wrapped module instead).

    Example:
        >>> model = nn.Linear(3, 2)
        >>> plan_for(model) is plan_for(model)
        True
    """
    config = config if config is not None else GCConfig()
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise ValueError(f"`optimizer` must be a torch.optim.Optimizer or None, got {optimizer!r}")
    if config.centralize_weight_decay and optimizer is None:
        raise ValueError("`centralize_weight_decay=True` needs `optimizer=`: the decay is read from its param groups")
    if isinstance(model_or_params, nn.Module):
        target: nn.Module | list[nn.Parameter] = model_or_params
    elif isinstance(model_or_params, Iterable) and not isinstance(model_or_params, (str, bytes)):
        target = list(model_or_params)  # read twice: for the cache signature and for planning
    else:
        raise ValueError(
            f"`model_or_params` must be an nn.Module or an iterable of parameters, got {model_or_params!r}"
        )
    repeated = _PLANS.repeated(config, target, optimizer)  # the step-after-step case: not even the adapter to decide
    if repeated is not None:
        return repeated
    adapter = adapter_for_model(target)
    before = _PLANS.builds
    plan = _PLANS.plan(adapter, config, target, optimizer, warn)
    if _PLANS.builds != before:  # a new plan: say what it could not know
        warn_if_compile_unused(config, adapter, warn)
        _warn_assumed(plan)
    return plan


_PLANS = PlanCache()
_ASSUMED_WARNED: set[tuple[str, ...]] = set()


def _warn_assumed(plan: AppliesGC) -> None:
    selection = getattr(plan, "selection", None)
    assumed = tuple(c.name for c in selection.assumed) if selection is not None else ()
    if not assumed or assumed in _ASSUMED_WARNED:
        return
    _ASSUMED_WARNED.add(assumed)
    shown = ", ".join(assumed[:5]) + (f" and {len(assumed) - 5} more" if len(assumed) > 5 else "")
    warn(
        f"GradientCentralization assumed dim 0 is the output dim of {len(assumed)} parameter(s) no registered layer"
        f" owns ({shown}). lightning_gc.describe(model) lists them; exclude them with exclude=[...] or register"
        " their layer with lightning_gc.register_layout(...)."
    )


def _config(*options: Any) -> GCConfig:
    """``GCConfig(*options)``, validated once per distinct options: this runs on every training step."""
    try:
        return _validated_config(*options)
    except TypeError:  # unhashable options (say, a list inside `exclude`): validate them every time
        return GCConfig(*options)


@functools.lru_cache(maxsize=32, typed=True)  # typed: `1` is no valid `True`
def _validated_config(*options: Any) -> GCConfig:
    return GCConfig(*options)
