"""What GC did to the gradients, in numbers that are cheap to get and mean the same on every rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GCStats:
    """Totals over the tensors centralized in one call.

    Args:
        tensors: how many gradient tensors were centralized.
        elements: how many gradient entries they hold.
        grad_sq: squared L2 norm of those gradients before GC (unscaled), or ``None`` if not computed.
        removed_sq: squared L2 norm of what GC subtracted (``g - GC(g)``), or ``None`` if not computed.
        skipped: no GC step happened, e.g. DeepSpeed between gradient accumulation boundaries: the zeros say
            nothing about the plan, so these stats are neither logged nor counted as a step. A plan that
            selects no tensor still runs a step and reports ``tensors=0`` with ``skipped=False``.

    Example:
        >>> s = GCStats(tensors=1, elements=4, grad_sq=torch.tensor(4.0), removed_sq=torch.tensor(1.0))
        >>> s.removed_norm_ratio
        tensor(0.5000)
    """

    tensors: int = 0
    elements: int = 0
    grad_sq: Tensor | None = None
    removed_sq: Tensor | None = None
    skipped: bool = False

    @property
    def grad_norm(self) -> Tensor | None:
        """L2 norm of the centralized tensors' gradients before GC."""
        return None if self.grad_sq is None else self.grad_sq.sqrt()

    @property
    def removed_norm_ratio(self) -> Tensor | None:
        """``||g - GC(g)|| / ||g||`` over all centralized tensors: 0 means GC changed nothing."""
        if self.grad_sq is None or self.removed_sq is None:
            return None
        return (self.removed_sq / self.grad_sq.clamp_min(torch.finfo(self.grad_sq.dtype).tiny)).sqrt()

    def metrics(self, prefix: str = "gc/") -> dict[str, Tensor | float]:
        """The values logged to the trainer's loggers, keyed by metric name."""
        out: dict[str, Tensor | float] = {
            f"{prefix}centralized_tensors": float(self.tensors),
            f"{prefix}centralized_elements": float(self.elements),
        }
        if self.grad_sq is not None and self.removed_sq is not None:
            out[f"{prefix}removed_norm_ratio"] = self.removed_norm_ratio  # type: ignore[assignment]
            out[f"{prefix}grad_norm"] = self.grad_norm  # type: ignore[assignment]
        return out
