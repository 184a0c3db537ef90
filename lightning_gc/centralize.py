"""The math of Gradient Centralization on dense tensors.

For a weight gradient ``g`` GC subtracts, from every output unit's slice of ``g``, that slice's mean
(Yong et al., ECCV 2020): ``g <- g - g.mean(dim=reduce_dims, keepdim=True)``. Everything here works in
place on plain (dense, strided) tensors; which tensors, and along which dims, is decided in
:mod:`lightning_gc.selection`, and sharded gradient layouts are handled in :mod:`lightning_gc.sharding`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Mode = Literal["channel", "tensor"]
MODES: tuple[str, ...] = ("channel", "tensor")

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class RowLayout:
    """Where the output units of a weight live, so that GC knows what to average over.

    Args:
        out_dim: the dim that indexes output units (0 for linear, conv and RNN weights; 1 for transposed
            convolutions, whose weight is ``(in, out // groups, *kernel)``).
        groups: for a grouped transposed convolution, dim 0 holds ``groups`` blocks of input channels and
            each output channel only sees its own block; the mean is taken within the block.

    Example:
        >>> RowLayout(out_dim=1, groups=2).reduce_dims(ndim=4, mode="channel")
        (1, 3, 4)
    """

    out_dim: int = 0
    groups: int = 1

    def reduce_dims(self, ndim: int, mode: Mode) -> tuple[int, ...]:
        """The dims to average over, for a tensor of ``ndim`` dims viewed through :meth:`view`."""
        ndim = ndim + (1 if self.groups > 1 else 0)
        if mode == "tensor":
            return tuple(range(ndim))
        keep = {0, self.out_dim + 1} if self.groups > 1 else {self.out_dim}
        return tuple(d for d in range(ndim) if d not in keep)

    def view(self, tensor: Tensor) -> Tensor:
        """``tensor`` itself, or (grouped transposed conv) with dim 0 split into ``(groups, in // groups)``.

        Splitting one dim is always a view, whatever the strides, so in-place work on it reaches ``tensor``.
        """
        return tensor.unflatten(0, (self.groups, -1)) if self.groups > 1 else tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype means are accumulated in: float32 for half-precision tensors, the tensor's own otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def row_mean(tensor: Tensor, layout: RowLayout = RowLayout(), mode: Mode = "channel") -> Tensor:
    """Mean of ``tensor`` over everything but its output units, keepdims, on :meth:`RowLayout.view`.

    Half-precision inputs are reduced in float32 without a float32 copy of ``tensor`` (the cast happens
    inside the reduction kernel).
    """
    dims = layout.reduce_dims(tensor.ndim, mode)
    if not dims:  # torch reads `dim=()` as "all dims"; a unit of one entry has no mean to remove
        raise ValueError(f"per-channel GC needs a tensor with ndim >= 2, got shape {tuple(tensor.shape)}")
    return layout.view(tensor).mean(dim=dims, keepdim=True, dtype=accumulation_dtype(tensor.dtype))


def centralize_(tensor: Tensor, layout: RowLayout = RowLayout(), mode: Mode = "channel") -> Tensor:
    """Centralize ``tensor`` in place and return the (keepdim) mean that was removed.

    The mean is subtracted in its accumulation precision and rounded once into ``tensor``'s dtype.

    Example:
        >>> g = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
        >>> _ = centralize_(g)
        >>> g
        tensor([[-1.,  1.],
                [ 0.,  0.]])
    """
    mean = row_mean(tensor, layout, mode)
    layout.view(tensor).sub_(mean)
    return mean


def removed_sq_norm(mean: Tensor, numel: int) -> Tensor:
    """Squared L2 norm of what :func:`centralize_` removed, from its returned mean alone.

    The removed part is ``mean`` broadcast over ``numel // mean.numel()`` entries per unit, so no pass over
    the gradient is needed.
    """
    return mean.to(torch.promote_types(mean.dtype, torch.float32)).square().sum() * (numel // mean.numel())
