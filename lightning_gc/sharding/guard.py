"""The guard: refuse, loudly, any gradient layout that no adapter handles, instead of centralizing nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from lightning_gc.errors import UnsupportedGradientLayoutError

if TYPE_CHECKING:
    from lightning_gc.selection import Target

__all__ = ["UnsupportedGradientLayoutError", "check_dense_gradient"]


def check_dense_gradient(target: Target, grad: Tensor, strategy_name: str = "") -> None:
    """Raise unless ``grad`` is a plain tensor of ``target.param``'s logical shape.

    Raises:
        UnsupportedGradientLayoutError: for DTensor gradients, flattened shards and any other shape mismatch.
    """
    if type(grad).__name__ == "DTensor" or grad.shape != target.param.shape:
        where = f" under {strategy_name}" if strategy_name else ""
        raise UnsupportedGradientLayoutError(
            f"GradientCentralization cannot centralize `{target.name}`{where}: its gradient is a"
            f" {type(grad).__name__} of shape {tuple(grad.shape)}, but the parameter's logical shape is"
            f" {tuple(target.param.shape)}. Centralizing a shard would be silently wrong."
        )
