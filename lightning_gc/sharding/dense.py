"""Dense gradients: one full tensor of the parameter's logical shape on every rank (single device, DDP)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.optim import Optimizer

from lightning_gc.config import GCConfig
from lightning_gc.plan import GCPlan


@dataclass(frozen=True)
class DenseAdapter:
    """Plans straight from the optimizer's parameters; after DDP's all-reduce every rank agrees."""

    strategy_name: str = ""

    def build_plan(
        self, optimizer: Optimizer, module: nn.Module, config: GCConfig, warn: Callable[[str], None]
    ) -> GCPlan:
        return GCPlan.for_config(optimizer, module, config, warn, self.strategy_name)
