"""The subtraction at the heart of Gradient Centralization, on dense tensors: this is where the mean goes.

For a weight gradient ``g`` GC subtracts, from every output unit's slice of ``g``, that slice's mean
(Yong et al., ECCV 2020): ``g <- g - g.mean(dim=reduce_dims, keepdim=True)``, where an output unit is
defined by :class:`lightning_gc.layouts.RowLayout`. :func:`centralize_` and :func:`row_mean` are the
reference implementation; every other route computes the same thing, faster, for many tensors at once:

- the fused C kernel (:mod:`lightning_gc.native`, CPU): each output unit summed and centralized while in cache;
- the compiled route (:mod:`lightning_gc.compiled`, opt-in): one ``torch.compile``'d kernel per tensor;
- the stacked route (:mod:`lightning_gc.stacking`): small same-shape gradients a stack at a time;
- the sharded routes (:mod:`lightning_gc.sharding`): row sums completed across ranks, then subtracted.

:mod:`lightning_gc.executor` picks a route per gradient, once per plan.

Big tensors are processed in blocks of output units: each block's mean is taken and subtracted while the
block is still in cache, and temporaries never exceed one block. On CPU, ATen materializes a float32 copy
of any half-precision operand it promotes (``bf16.mean(dtype=float32)``, ``bf16.sub_(float32)``), so half
tensors there go through a float32 scratch buffer of one block instead: float32 accumulation without a
float32 copy of the tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gc.layouts import DIM0, MODES, Mode, RowLayout

__all__ = ["MODES", "Mode", "accumulation_dtype", "centralize_", "removed_sq_norm", "row_mean"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

DEFAULT_BLOCK_BYTES = 4 << 20
"""Block size for big tensors: per-op overhead stays a few percent of a block's pass, and a block fits in L2/L3."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype means are accumulated in: float32 for half-precision tensors, the tensor's own otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def needs_scratch(tensor: Tensor) -> bool:
    """Whether ``tensor`` is half precision on CPU, where promoting it would copy it to float32 (see module doc)."""
    return tensor.dtype in _LOW_PRECISION and tensor.device.type == "cpu"


def row_mean(
    tensor: Tensor, layout: RowLayout = DIM0, mode: Mode = "channel", *, block_bytes: int = DEFAULT_BLOCK_BYTES
) -> Tensor:
    """Mean of ``tensor`` over everything but its output units, keepdims, on :meth:`RowLayout.view`.

    Half-precision inputs are reduced in float32 without a float32 copy of ``tensor``.

    Args:
        tensor: a dense tensor of any strides.
        layout: where its output units are.
        mode: ``"channel"`` (one mean per output unit) or ``"tensor"`` (one mean).
        block_bytes: bound on the float32 temporaries for half-precision tensors on CPU.

    Raises:
        ValueError: in channel mode, for a tensor with a single dim (no entries to average over).
    """
    dims = _checked_dims(tensor, layout, mode)
    viewed = layout.view(tensor)
    scratch = _scratch_for(viewed, block_bytes)
    if scratch is None:
        return viewed.mean(dim=dims, keepdim=True, dtype=accumulation_dtype(tensor.dtype))
    return _blocked_mean(viewed, dims, layout.unit_dim(mode), scratch)


def centralize_(
    tensor: Tensor, layout: RowLayout = DIM0, mode: Mode = "channel", *, block_bytes: int = DEFAULT_BLOCK_BYTES
) -> Tensor:
    """Centralize ``tensor`` in place and return the (keepdim) mean that was removed.

    The mean is subtracted in its accumulation precision and rounded once into ``tensor``'s dtype. On CPU,
    tensors bigger than ``block_bytes`` are processed a block of output units at a time, so the second pass
    over a block hits cache and temporaries stay within one block.

    Raises:
        ValueError: in channel mode, for a tensor with a single dim.

    Example:
        >>> g = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
        >>> _ = centralize_(g)
        >>> g
        tensor([[-1.,  1.],
                [ 0.,  0.]])
    """
    dims = _checked_dims(tensor, layout, mode)
    viewed = layout.view(tensor)
    scratch = _scratch_for(viewed, block_bytes)
    if scratch is not None:
        block_elements = scratch.numel()
    elif tensor.device.type == "cpu":
        block_elements = max(1, block_bytes // viewed.element_size())
    else:  # GPUs have no cache to keep a block in between the passes; blocks would only add launches
        block_elements = viewed.numel()
    return centralize_view_(viewed, dims, layout.unit_dim(mode), block_elements, scratch)


def centralize_view_(
    viewed: Tensor,
    dims: tuple[int, ...],
    unit_dim: int | None,
    block_elements: int,
    scratch: Tensor | None = None,
    weight: Tensor | None = None,
    coefficient: float = 0.0,
) -> Tensor:
    """Centralize ``viewed`` over ``dims`` in place, ``block_elements`` at a time; return the removed mean.

    The engine behind :func:`centralize_` and :class:`~lightning_gc.plan.GCPlan`, for callers that planned
    the dims once.

    Args:
        viewed: the tensor as seen through :meth:`RowLayout.view`.
        dims: the dims to average over.
        unit_dim: a kept dim to cut blocks along, or ``None`` for one mean over the whole tensor.
        block_elements: most entries per block.
        scratch: a float32 buffer of at least ``block_elements`` entries; required when
            :func:`needs_scratch` holds for ``viewed``, where all arithmetic goes through it.
        weight: the parameter, same shape as ``viewed``: ``coefficient * mean(weight)`` is subtracted too
            (weight-decay compensation); the returned mean is the gradient's alone.
        coefficient: the weight-mean coefficient.
    """
    if unit_dim is None:
        return _centralize_block_(viewed, dims, None, scratch, weight, coefficient)
    size = viewed.shape[unit_dim]
    per_block = max(1, block_elements // max(1, viewed.numel() // max(1, size)))
    if per_block >= size:
        return _centralize_block_(viewed, dims, None, scratch, weight, coefficient)
    mean = viewed.new_empty(_keepdim_shape(viewed, dims), dtype=accumulation_dtype(viewed.dtype))
    weights = torch.split(weight, per_block, unit_dim) if weight is not None else None
    blocks = zip(torch.split(viewed, per_block, unit_dim), torch.split(mean, per_block, unit_dim))
    for index, (block, out) in enumerate(blocks):
        _centralize_block_(block, dims, out, scratch, weights[index] if weights is not None else None, coefficient)
    return mean


def removed_sq_norm(mean: Tensor, numel: int) -> Tensor:
    """Squared L2 norm of what :func:`centralize_` removed, from its returned mean alone.

    The removed part is ``mean`` broadcast over ``numel // mean.numel()`` entries per unit, so no pass over
    the gradient is needed. An empty mean (a shard holding no output unit) removed nothing.
    """
    if mean.numel() == 0:
        return mean.new_zeros((), dtype=torch.promote_types(mean.dtype, torch.float32))
    return mean.to(torch.promote_types(mean.dtype, torch.float32)).square().sum() * (numel // mean.numel())


def _checked_dims(tensor: Tensor, layout: RowLayout, mode: Mode) -> tuple[int, ...]:
    dims = layout.reduce_dims(tensor.ndim, mode)
    if not dims:  # torch reads `dim=()` as "all dims"; a unit of one entry has no mean to remove
        raise ValueError(f"per-channel GC needs a tensor with ndim >= 2, got shape {tuple(tensor.shape)}")
    return dims


def _scratch_for(tensor: Tensor, block_bytes: int) -> Tensor | None:
    if not needs_scratch(tensor):
        return None
    return torch.empty(max(1, min(tensor.numel(), block_bytes // 4)), dtype=torch.float32)


def _keepdim_shape(tensor: Tensor, dims: tuple[int, ...]) -> list[int]:
    return [1 if d in dims else s for d, s in enumerate(tensor.shape)]


def _in_scratch(block: Tensor, scratch: Tensor) -> Tensor:
    """``block``'s values in float32, in ``scratch`` laid out like ``block`` so both copies stream."""
    if block.numel() > scratch.numel():  # one slice bigger than the budget (huge units): a one-off temporary
        return block.to(torch.float32)
    order = sorted(range(block.ndim), key=lambda d: block.stride(d), reverse=True)
    if order == list(range(block.ndim)):
        return scratch[: block.numel()].view(block.shape).copy_(block)
    staged = scratch[: block.numel()].view([block.shape[d] for d in order])
    return staged.permute([order.index(d) for d in range(block.ndim)]).copy_(block)


def _mean_into(block: Tensor, dims: tuple[int, ...], out: Tensor | None, scratch: Tensor | None) -> Tensor:
    source = _in_scratch(block, scratch) if scratch is not None else block
    if out is None:
        return source.mean(dim=dims, keepdim=True, dtype=accumulation_dtype(source.dtype))
    return torch.mean(source, dim=dims, keepdim=True, dtype=out.dtype, out=out)


def _centralize_block_(
    block: Tensor,
    dims: tuple[int, ...],
    out: Tensor | None,
    scratch: Tensor | None,
    weight: Tensor | None,
    coefficient: float,
) -> Tensor:
    if scratch is not None and block.numel() > scratch.numel():
        return _centralize_sliced_(block, dims, out, scratch, weight, coefficient)
    shift = None
    if weight is not None:  # before the gradient is staged: the scratch holds one block at a time
        shift = _mean_into(weight, dims, None, scratch).mul_(coefficient)
    if scratch is None:
        mean = _mean_into(block, dims, out, None)
        block.sub_(mean if shift is None else shift.add_(mean))
        return mean
    staged = _in_scratch(block, scratch)
    mean = _mean_into(staged, dims, out, None)
    staged.sub_(mean if shift is None else shift.add_(mean))
    block.copy_(staged)
    return mean


def _centralize_sliced_(
    block: Tensor,
    dims: tuple[int, ...],
    out: Tensor | None,
    scratch: Tensor,
    weight: Tensor | None,
    coefficient: float,
) -> Tensor:
    """Two passes over slices that fit ``scratch``, for units too big for it (and tensor mode)."""
    mean = _sliced_mean(block, dims, scratch)
    shift = mean.clone() if weight is None else _sliced_mean(weight, dims, scratch).mul_(coefficient).add_(mean)
    for chunk in _slices(block, dims, scratch.numel()):
        staged = _in_scratch(chunk, scratch)
        staged.sub_(shift)
        chunk.copy_(staged)
    return mean if out is None else out.copy_(mean)


def _sliced_mean(tensor: Tensor, dims: tuple[int, ...], scratch: Tensor) -> Tensor:
    total = torch.zeros(_keepdim_shape(tensor, dims), dtype=torch.float32)
    for chunk in _slices(tensor, dims, scratch.numel()):
        total += _in_scratch(chunk, scratch).sum(dim=dims, keepdim=True)
    return total.div_(tensor.numel() // total.numel())


def _slices(tensor: Tensor, dims: tuple[int, ...], block_elements: int) -> tuple[Tensor, ...]:
    """``tensor`` cut along its longest reduced dim into slices of at most ``block_elements`` entries."""
    dim = max(dims, key=lambda d: tensor.shape[d])
    per = max(1, block_elements // max(1, tensor.numel() // max(1, tensor.shape[dim])))
    return torch.split(tensor, per, dim)


def _blocked_mean(viewed: Tensor, dims: tuple[int, ...], unit_dim: int | None, scratch: Tensor) -> Tensor:
    if unit_dim is None:
        return _sliced_mean(viewed, dims, scratch)
    size = viewed.shape[unit_dim]
    per_block = max(1, scratch.numel() // max(1, viewed.numel() // max(1, size)))
    mean = torch.empty(_keepdim_shape(viewed, dims), dtype=torch.float32)
    for block, out in zip(torch.split(viewed, per_block, unit_dim), torch.split(mean, per_block, unit_dim)):
        if block.numel() > scratch.numel():
            out.copy_(_sliced_mean(block, dims, scratch))
        else:
            _mean_into(block, dims, out, scratch)
    return mean
