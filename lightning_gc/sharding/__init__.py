"""Gradient layouts, one adapter per layout, chosen from the strategy or from the parameters.

Single-device and DDP-style strategies leave every rank a full, dense gradient of each parameter's
logical shape (:mod:`~lightning_gc.sharding.dense`). FSDP2/tensor parallel leave DTensors
(:mod:`~lightning_gc.sharding.dtensor`). FSDP1 leaves each rank a range of flattened parameters
(:mod:`~lightning_gc.sharding.fsdp`) and DeepSpeed ZeRO-1/2 a partition of flattened parameter groups
(:mod:`~lightning_gc.sharding.deepspeed`): both share :mod:`~lightning_gc.sharding.row_reduce`, which
reduces only the rows that shard boundaries cut, over the row geometry of
:mod:`~lightning_gc.sharding.flat_rows`. Every adapter selects with :func:`lightning_gc.selection.select`
or :meth:`~lightning_gc.selection.Selector.decide` and uses the same :class:`~lightning_gc.layouts.RowLayout`.
A layout no adapter handles is refused by :mod:`~lightning_gc.sharding.guard`.

The callback picks the adapter from the trainer's strategy (:func:`adapter_for`); the functional API,
which has no strategy, from the model and its parameters (:func:`adapter_for_model`). Adapter modules are
imported only when picked, so torch.distributed and DeepSpeed stay unimported on a single device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from lightning_gc.errors import UnsupportedGradientLayoutError
from lightning_gc.sharding.guard import check_dense_gradient

if TYPE_CHECKING:
    from torch import Tensor, nn
    from torch.optim import Optimizer

    from lightning_gc.config import GCConfig
    from lightning_gc.diagnostics import GCStats

Warn = Callable[[str], None]


class AppliesGC(Protocol):
    """A per-optimizer plan: centralizes that optimizer's gradients in place."""

    def apply(self, compute_stats: bool = False, grad_scale: float = 1.0) -> GCStats: ...


class LayoutAdapter(Protocol):
    """Builds plans for one gradient layout.

    ``dense`` says whether its plans run the dense routes (where ``compile`` applies).
    """

    @property
    def dense(self) -> bool: ...

    @property
    def strategy_name(self) -> str: ...

    def build_plan(
        self,
        config: GCConfig,
        *,
        optimizer: Optimizer | None = None,
        module: nn.Module | None = None,
        params: list[nn.Parameter] | None = None,
        warn: Warn = ...,
    ) -> AppliesGC: ...


def adapter_for(strategy: object) -> LayoutAdapter:
    """The adapter for a Lightning (Trainer or Fabric) ``strategy``'s gradient layout.

    Raises:
        UnsupportedGradientLayoutError: when no adapter handles the strategy (DeepSpeed ZeRO-3 included).
    """
    name = type(strategy).__name__
    bases = {cls.__name__ for cls in type(strategy).__mro__}  # by name: Trainer and Fabric each define these
    if "ModelParallelStrategy" in bases:
        from lightning_gc.sharding.dtensor import DTensorAdapter

        return DTensorAdapter(strategy_name=name)
    if "FSDPStrategy" in bases:
        from lightning_gc.sharding.fsdp import FSDPAdapter

        return FSDPAdapter(strategy_name=name, root=lambda: getattr(strategy, "model", None))
    if "DeepSpeedStrategy" in bases:
        from lightning_gc.sharding.deepspeed import DeepSpeedAdapter, check_zero_stage

        check_zero_stage(strategy)
        return DeepSpeedAdapter(strategy_name=name, engine=lambda: getattr(strategy, "model", None))
    from lightning_gc.sharding.dense import DenseAdapter

    return DenseAdapter(strategy_name=name)


def adapter_for_model(model_or_params: nn.Module | Iterable[Tensor]) -> LayoutAdapter:
    """The adapter for the gradients of ``model_or_params``, read from the model itself (no strategy at hand).

    A module holding FSDP1 modules gets the flat-shard adapter, one holding a ``DeepSpeedEngine`` the ZeRO
    adapter, DTensor parameters (FSDP2, tensor parallel) the DTensor adapter; anything else is dense.

    Raises:
        UnsupportedGradientLayoutError: for bare FSDP-flattened parameters (pass the wrapped module instead).

    Example:
        >>> from torch import nn
        >>> type(adapter_for_model(nn.Linear(2, 2))).__name__
        'DenseAdapter'
    """
    from torch import nn

    if isinstance(model_or_params, nn.Module):
        every_module = list(model_or_params.modules())
        modules = {type(m).__name__: m for m in every_module}
        if "FullyShardedDataParallel" in modules:
            from lightning_gc.sharding.fsdp import FSDPAdapter

            return FSDPAdapter(strategy_name="FullyShardedDataParallel")
        if "DeepSpeedEngine" in modules:
            from lightning_gc.sharding.deepspeed import DeepSpeedAdapter

            engine = modules["DeepSpeedEngine"]
            return DeepSpeedAdapter(strategy_name="DeepSpeedEngine", engine=lambda: engine)
        # each module's own parameter dict: `parameters()` walks the tree again per module (this runs per call)
        params: Iterable[Tensor] = [p for m in every_module for p in m._parameters.values() if p is not None]
    else:
        params = model_or_params
        if any(getattr(p, "_fsdp_flattened", False) for p in params):
            raise UnsupportedGradientLayoutError(
                "centralize_gradients got parameters flattened by FSDP: their gradients are 1-D shards. Pass the"
                " FSDP-wrapped module (with `optimizer=` to restrict to its parameters) so the shards can be mapped back."
            )
    from lightning_gc.sharding.dtensor import has_dtensors

    if has_dtensors(params):
        from lightning_gc.sharding.dtensor import DTensorAdapter

        return DTensorAdapter(strategy_name="DTensor parameters")
    from lightning_gc.sharding.dense import DenseAdapter

    return DenseAdapter()


def warn_if_compile_unused(config: GCConfig, adapter: LayoutAdapter, warn: Warn) -> None:
    """Say once that ``compile`` does nothing where the adapter's plans take their own (sharded) routes."""
    if config.compile is not False and not adapter.dense:
        warn(
            f"GradientCentralization(compile={config.compile!r}) has no effect under {adapter.strategy_name}: the"
            " compiled route is for dense gradients; sharded gradients take their own exact routes."
        )


__all__ = [
    "AppliesGC",
    "LayoutAdapter",
    "UnsupportedGradientLayoutError",
    "adapter_for",
    "adapter_for_model",
    "check_dense_gradient",
    "warn_if_compile_unused",
]
