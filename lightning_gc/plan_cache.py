"""Plans (dense or sharded) reused across calls of :func:`~lightning_gc.centralize_gradients`.

Plans are keyed weakly on what owns the parameters (the optimizer if given, else the module), so a cache
entry lives exactly as long as its model or optimizer, plus the options. Each call recomputes a cheap
signature of the parameters (their ids, and ``requires_grad`` for modules, or the optimizer's param groups
and decay settings) and re-plans when it changed: a replaced layer or an unfrozen one is never missed.
A bare iterable of parameters has no owner to key on and is planned on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from operator import attrgetter

from torch import nn
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from lightning_gc.config import GCConfig
from lightning_gc.plan import plan_signature
from lightning_gc.sharding import AppliesGC

Build = Callable[[], AppliesGC]


class PlanCache:
    """Plans by owner (weakly), options and parameter signature.

    Example:
        >>> from lightning_gc.functional import build_plan
        >>> cache, model, config = PlanCache(), nn.Linear(3, 2), GCConfig()
        >>> first = cache.get(model, config, None, lambda: build_plan(model, config))
        >>> first is cache.get(model, config, None, lambda: build_plan(model, config))
        True
    """

    def __init__(self) -> None:
        self._plans: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def get(
        self,
        model_or_params: nn.Module | Iterable[nn.Parameter],
        config: GCConfig,
        optimizer: Optimizer | None,
        build: Build,
    ) -> AppliesGC:
        """The cached plan for these arguments, or ``build()``'s result, cached when it has an owner."""
        module = model_or_params if isinstance(model_or_params, nn.Module) else None
        owner = optimizer if optimizer is not None else module
        if owner is None:
            return build()
        key, signature = _key_and_signature(model_or_params, module, config, optimizer)
        plans = self._plans.setdefault(owner, {})
        cached = plans.get(key)
        if cached is not None and cached[0] == signature:
            return cached[1]
        plan = build()
        plans[key] = (signature, plan)
        return plan

    def clear(self) -> None:
        """Forget every plan."""
        self._plans = WeakIdKeyDictionary()


def _key_and_signature(
    model_or_params: nn.Module | Iterable[nn.Parameter],
    module: nn.Module | None,
    config: GCConfig,
    optimizer: Optimizer | None,
) -> tuple[Hashable, Hashable]:
    if optimizer is None:
        assert module is not None
        return (config.key(),), _module_signature(module)
    if module is not None:
        return (config.key(), id(module)), plan_signature(optimizer)
    # parameters given with an optimizer: the plan is restricted to them, so they are part of the signature
    return (config.key(),), (plan_signature(optimizer), tuple(map(id, model_or_params)))


_REQUIRES_GRAD = attrgetter("requires_grad")


def _module_signature(module: nn.Module) -> Hashable:
    # `module.parameters()` dedups through Python-level tensor hashing; reading each submodule's own
    # parameter dict is several times cheaper, and duplicates only make the signature longer, not wrong.
    params = [p for sub in module.modules() for p in sub._parameters.values() if p is not None]
    return tuple(map(id, params)), tuple(map(_REQUIRES_GRAD, params))
