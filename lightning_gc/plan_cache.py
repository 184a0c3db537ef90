"""The one plan cache: plans (dense or sharded) reused across steps by the callback and the functional API.

Plans are keyed weakly on what owns the parameters (the optimizer if given, else the module), so a cache
entry lives exactly as long as its model or optimizer, and on everything that changes a plan: the
options (``compile`` included, :meth:`~lightning_gc.config.GCConfig.plan_key`), the adapter and the
module. Each call recomputes a cheap signature of the parameters (their ids, ``requires_grad`` and dtypes,
and the optimizer's decay settings) and re-plans when it changed: a replaced layer or an unfrozen one is
never missed. A bare iterable of parameters has no owner to key on and is planned on every call.

The last plan returned is remembered beside the table (:class:`_LastPlan`), so the step-after-step case
(one optimizer, the same options) is a few identity checks and the signature read in C, with no key built:
the hook runs right after backward has pushed the interpreter out of the CPU caches, where every
dictionary probe and every object built is a cache miss.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from lightning_gc.native import kernel as native_kernel

if TYPE_CHECKING:
    from lightning_gc.config import GCConfig
    from lightning_gc.sharding import AppliesGC, LayoutAdapter

Warn = Callable[[str], None]


class PlanCache:
    """Plans by owner (weakly), options, adapter and parameter signature.

    Example:
        >>> from lightning_gc.config import GCConfig
        >>> from lightning_gc.sharding.dense import DenseAdapter
        >>> cache, model, config = PlanCache(), nn.Linear(3, 2), GCConfig()
        >>> first = cache.plan(DenseAdapter(), config, model)
        >>> first is cache.plan(DenseAdapter(), config, model)
        True
        >>> first is cache.plan(DenseAdapter(), GCConfig(compile="eager"), model)
        False
    """

    def __init__(self) -> None:
        self._plans: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._last: _LastPlan | None = None
        self._same_signature: Callable[[list[Any], tuple[Any, ...]], bool] | None = None
        self.builds = 0  # plans built so far: what tests and diagnostics read to see reuse

    def plan(
        self,
        adapter: LayoutAdapter,
        config: GCConfig,
        model_or_params: nn.Module | Sequence[nn.Parameter],
        optimizer: Optimizer | None = None,
        warn: Warn | None = None,
    ) -> AppliesGC:
        """The cached plan for these arguments, or a fresh one from ``adapter`` (cached when it has an owner)."""
        plan = self.repeated(config, model_or_params, optimizer, adapter)
        if plan is not None:
            return plan
        last = self._last
        module = model_or_params if isinstance(model_or_params, nn.Module) else None
        params = None if isinstance(model_or_params, nn.Module) else list(model_or_params)
        owner = optimizer if optimizer is not None else module
        if owner is None:
            return self._build(adapter, config, optimizer, module, params, warn)
        key = (config.plan_key(), type(adapter).__name__, id(module) if optimizer is not None else None)
        if optimizer is None:
            signature: Hashable = module_signature(module)  # type: ignore[arg-type]
        elif params is not None:  # restricted to these parameters: they are part of the signature
            signature = (plan_signature(optimizer), tuple(map(id, params)))
        else:
            signature = plan_signature(optimizer)
        if (
            last is not None
            and last.same_call(adapter, config, model_or_params, optimizer)
            and last.signature == signature
        ):
            plan = last.plan()
            if plan is not None:
                return plan
        plans: dict[Hashable, tuple[Hashable, AppliesGC]] = self._plans.setdefault(owner, {})  # type: ignore[no-untyped-call]
        cached = plans.get(key)
        if cached is not None and cached[0] == signature:
            self._remember(adapter, config, module, optimizer, signature, cached[1])
            return cached[1]
        plan = self._build(adapter, config, optimizer, module, params, warn)
        selection = getattr(plan, "selection", None)
        if selection is None or not selection.provisional:  # Lazy layers keep their ids when they get a shape
            plans[key] = (signature, plan)
            self._remember(adapter, config, module, optimizer, signature, plan)
        return plan

    def repeated(
        self,
        config: GCConfig,
        model_or_params: nn.Module | Sequence[nn.Parameter],
        optimizer: Optimizer | None,
        adapter: LayoutAdapter | None = None,
    ) -> AppliesGC | None:
        """The last plan returned, if this call asks for it again, else ``None``: the same module, optimizer,
        options (and adapter type, if given), and the optimizer's parameters unchanged.

        Without ``adapter`` this also stands for the adapter decision: every change of adapter (FSDP's flat
        parameters, a DTensor's, a DeepSpeed engine passed instead of its module) changes the parameters.
        Only with an optimizer, whose param groups the binding reads in C where it is built; a module alone
        would need its tree walked.
        """
        last = self._last
        if last is None or optimizer is None or not last.same_call(adapter, config, model_or_params, optimizer):
            return None
        same = self._same_signature
        if same is None or not same(optimizer.param_groups, last.signature):  # type: ignore[arg-type]
            return None
        return last.plan()

    def _remember(
        self,
        adapter: LayoutAdapter,
        config: GCConfig,
        module: nn.Module | None,
        optimizer: Optimizer | None,
        signature: Hashable,
        plan: AppliesGC,
    ) -> None:
        """The fast path's entry, for the call that returned ``plan`` (none for a call restricted to parameters)."""
        self._last = _LastPlan(adapter, config, module, optimizer, signature, plan) if module is not None else None
        if self._same_signature is None:
            self._same_signature = _same_signature()

    def _build(
        self,
        adapter: LayoutAdapter,
        config: GCConfig,
        optimizer: Optimizer | None,
        module: nn.Module | None,
        params: list[nn.Parameter] | None,
        warn: Warn | None,
    ) -> AppliesGC:
        self.builds += 1
        if warn is None:
            return adapter.build_plan(config, optimizer=optimizer, module=module, params=params)
        return adapter.build_plan(config, optimizer=optimizer, module=module, params=params, warn=warn)

    def plans(self) -> list[AppliesGC]:
        """Every plan cached now (for inspection: which adapter, which targets, bytes communicated)."""
        per_owner: list[dict[Hashable, tuple[Hashable, AppliesGC]]] = list(self._plans.values())  # type: ignore[no-untyped-call]
        return [plan for plans in per_owner for _, plan in plans.values()]

    def clear(self) -> None:
        """Forget every plan."""
        self._plans = WeakIdKeyDictionary()
        self._last = None

    def __getstate__(self) -> dict[str, int]:
        """Pickled empty (``ddp_spawn`` pickles callbacks): plans hold this process's tensors, never another's."""
        return {"builds": self.builds}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__()  # type: ignore[misc]
        self.builds = state.get("builds", 0)

    def __len__(self) -> int:
        """How many owners have plans."""
        return len(self._plans)


class _LastPlan:
    """The last plan returned and the call it answered, matched by identity: it keeps no model alive."""

    __slots__ = ("adapter_type", "config", "module", "optimizer", "plan", "signature")

    def __init__(
        self,
        adapter: LayoutAdapter,
        config: GCConfig,
        module: nn.Module,
        optimizer: Optimizer | None,
        signature: Hashable,
        plan: AppliesGC,
    ) -> None:
        self.adapter_type = type(adapter)
        self.config = config
        self.module = weakref.ref(module)
        self.optimizer = weakref.ref(optimizer) if optimizer is not None else _no_optimizer
        self.signature = signature
        self.plan: weakref.ref[AppliesGC] = weakref.ref(plan)

    def same_call(
        self,
        adapter: LayoutAdapter | None,
        config: GCConfig,
        model_or_params: nn.Module | Sequence[nn.Parameter],
        optimizer: Optimizer | None,
    ) -> bool:
        """Whether a call with these arguments asks for the same plan, if the parameters' signature is unchanged."""
        return (
            self.module() is model_or_params
            and self.optimizer() is optimizer
            and (adapter is None or type(adapter) is self.adapter_type)
            and (config is self.config or config.plan_key() == self.config.plan_key())  # frozen: same object, same key
        )


def _no_optimizer() -> None:
    return None


def plan_signature(optimizer: Optimizer) -> Hashable:
    """Changes whenever the optimizer's parameters or decay settings do, so a cached plan can be reused."""
    # every value is read afresh (a list mutated in place, `requires_grad_()`, a `.data` swap to another
    # dtype keep every object's identity); `map` with one attrgetter reads both at C speed
    signature = []
    for group in optimizer.param_groups:
        params = group["params"]
        signature.append((
            tuple(map(id, params)),
            # the selection skips frozen parameters; `model.double()` keeps the parameters, changes their plans
            tuple(map(_REQUIRES_GRAD_AND_DTYPE, params)),
            group.get("weight_decay"),
            group.get("maximize"),
            group.get("decoupled_weight_decay"),
        ))  # fmt: skip
    return tuple(signature)


def _same_signature() -> Callable[[list[Any], tuple[Any, ...]], bool] | None:
    """The binding's check that :func:`plan_signature` is unchanged, or ``None`` where it is not built."""
    kernel = native_kernel()
    return kernel.same_signature if kernel is not None else None


_REQUIRES_GRAD = attrgetter("requires_grad")
_DTYPE = attrgetter("dtype")
_REQUIRES_GRAD_AND_DTYPE = attrgetter("requires_grad", "dtype")


def module_signature(module: nn.Module) -> Hashable:
    """Changes whenever ``module``'s parameters (or their ``requires_grad`` or dtype) do."""
    # `module.parameters()` dedups through Python-level tensor hashing; reading each submodule's own
    # parameter dict is several times cheaper, and duplicates only make the signature longer, not wrong.
    params = [p for sub in module.modules() for p in sub._parameters.values() if p is not None]
    return tuple(map(id, params)), tuple(map(_REQUIRES_GRAD, params)), tuple(map(_DTYPE, params))
