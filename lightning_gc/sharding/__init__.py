"""Gradient layouts, one adapter per layout, chosen from the strategy.

Single-device and DDP-style strategies leave every rank a full, dense gradient of each parameter's
logical shape: :mod:`lightning_gc.centralize` applies directly (:mod:`~lightning_gc.sharding.dense`).
FSDP1 leaves each rank a range of flattened parameters (:mod:`~lightning_gc.sharding.fsdp`, with the row
geometry of flat ranges in :mod:`~lightning_gc.sharding.flat_rows`); DeepSpeed ZeRO-1/2 a partition of
flattened parameter groups (:mod:`~lightning_gc.sharding.deepspeed`). Both reduce only the rows that
shard boundaries cut (:mod:`~lightning_gc.sharding.row_reduce`).
Sharded strategies (FSDP, FSDP2/tensor parallel, DeepSpeed) each hand the hook a different layout; each
gets an adapter module here. A layout no adapter handles is refused by :mod:`~lightning_gc.sharding.guard`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from lightning_gc.sharding.guard import UnsupportedGradientLayoutError, check_dense_gradient

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer

    from lightning_gc.config import GCConfig
    from lightning_gc.diagnostics import GCStats


class AppliesGC(Protocol):
    """A per-optimizer plan: centralizes that optimizer's gradients in place."""

    def apply(self, compute_stats: bool = False, grad_scale: float = 1.0) -> GCStats: ...


class LayoutAdapter(Protocol):
    """Builds plans for one gradient layout."""

    def build_plan(
        self, optimizer: Optimizer, module: nn.Module, config: GCConfig, warn: Callable[[str], None]
    ) -> AppliesGC: ...


def adapter_for(strategy: object) -> LayoutAdapter:
    """The adapter for ``strategy``'s gradient layout.

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


__all__ = [
    "AppliesGC",
    "LayoutAdapter",
    "UnsupportedGradientLayoutError",
    "adapter_for",
    "check_dense_gradient",
]
