"""Dense gradients: one full tensor of the parameter's logical shape on every rank (single device, DDP)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import nn
from torch.optim import Optimizer

from lightning_gc.config import GCConfig
from lightning_gc.errors import warn as warn_user
from lightning_gc.plan import GCPlan, dense_plan


@dataclass(frozen=True)
class DenseAdapter:
    """Plans straight from the selection; after DDP's all-reduce every rank agrees.

    Example:
        >>> plan = DenseAdapter().build_plan(GCConfig(), module=nn.Linear(3, 2))
        >>> [t.name for t in plan.targets]
        ['weight']
    """

    strategy_name: str = ""
    dense: ClassVar[bool] = True

    def build_plan(
        self,
        config: GCConfig,
        *,
        optimizer: Optimizer | None = None,
        module: nn.Module | None = None,
        params: list[nn.Parameter] | None = None,
        warn: Callable[[str], None] = warn_user,
    ) -> GCPlan:
        plan = dense_plan(module if module is not None else params or [], config, optimizer, warn=warn)
        plan.strategy_name = self.strategy_name
        return plan
