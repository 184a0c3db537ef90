"""Gradient Centralization of the update: after each optimizer step, ``w = w_before + GC(w_after - w_before)``.

The whole change the optimizer made (momentum, adaptive scaling, coupled and decoupled weight decay) is
centralized per output unit, so every unit's mean is exactly what it was before the step, whatever the
optimizer. This is the placement the paper's authors recommend for adaptive optimizers (their
``gc_loc=False``), for any ``torch.optim.Optimizer``.

No copy of the weights is needed: GC of the change only needs each unit's mean before the step. A step
pre-hook records every unit's sum (float64 accumulation; float32 for half-precision weights, without a
float32 copy of them), and a step post-hook subtracts ``rowmean(w_after) - rowmean(w_before)`` from every
unit in one pass: a block of units is summed and corrected while it is in cache. Extra memory: one sum per
unit plus a scratch buffer of at most 1% of the weight bytes (at least ``SCRATCH_MIN_BYTES``).

The hooks are the optimizer's own (``register_step_pre_hook``/``register_step_post_hook``), so manual
optimization, several optimizers, LBFGS (the change over all its inner iterations) and gradient
accumulation behave alike, and a step the AMP ``GradScaler`` skips changes nothing.

DTensor parameters (FSDP2 ``fully_shard``, tensor parallel) are corrected in their sharded layout: where a
shard cuts units, the change of each unit's partial sum is all-reduced over the mesh dims that cut it
(``O(units)`` values, once per step). FSDP1 flat shards use the gradient route's row geometry
(:mod:`lightning_gc.sharding.flat_rows`): only the rows that shard boundaries cut travel. DeepSpeed is refused
(:func:`check_strategy`): its inner optimizer steps the fp32 master partitions one param group at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from lightning_gc.config import GCConfig
from lightning_gc.errors import UnsupportedGradientLayoutError
from lightning_gc.layouts import Mode, RowLayout
from lightning_gc.plan_cache import plan_signature
from lightning_gc.selection import DEFAULT_EXCLUDED_MODULES, ModuleSpec, Target, select
from lightning_gc.sharding.dtensor import has_dtensors

Warn = Callable[[str], None]

SCRATCH_MAX_BYTES = 1 << 20
"""Most bytes of the scratch a block of units is summed in: a block stays in L2 between sum and correction."""
SCRATCH_MIN_BYTES = 64 << 10
"""Least scratch bytes, so that small models are not corrected in slivers."""
BUDGET_FRACTION = 100
"""Unit sums and scratch together stay within 1/100 of the planned weights' bytes (above ``SCRATCH_MIN_BYTES``)."""

_HALF = (torch.float16, torch.bfloat16)
_REFUSED_STRATEGIES = {
    "DeepSpeedStrategy": (
        "DeepSpeed",
        "use ModelParallelStrategy (FSDP2) or DDP, where the update placement is exact, or apply_to='gradient',"
        " which is exact under DeepSpeed ZeRO-1/2",
    ),
}


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype unit sums accumulate in: float32 for half-precision weights, float64 otherwise.

    Example:
        >>> sum_dtype(torch.bfloat16), sum_dtype(torch.float32)
        (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in _HALF else torch.float64


# --- the selection seam: the only code that reads selection and layout objects ----------------------------


@dataclass(frozen=True)
class _Geometry:
    """How a weight's units are laid out, read once from its :class:`RowLayout`."""

    layout: RowLayout
    dims: tuple[int, ...]
    unit_dim: int | None

    @classmethod
    def of(cls, layout: RowLayout, ndim: int, mode: Mode) -> _Geometry:
        dims = layout.reduce_dims(ndim, mode)
        if not dims:
            raise ValueError(f"per-channel GC needs a tensor with ndim >= 2, got ndim {ndim}")
        return cls(layout, dims, layout.unit_dim(mode))

    def view(self, tensor: Tensor) -> Tensor:
        return self.layout.view(tensor)

    def units(self, viewed_shape: Sequence[int]) -> int:
        return math.prod(n for d, n in enumerate(viewed_shape) if d not in self.dims)

    def groups_split_dim0(self) -> bool:
        """Whether units are blocks of dim 0 (a grouped transposed convolution, channel mode)."""
        return self.layout.groups > 1 and self.unit_dim is not None


def _selected(
    optimizer: Optimizer,
    module: nn.Module | None,
    config: GCConfig,
    warn: Warn | None,
    params: list[nn.Parameter] | None = None,
) -> list[Target]:
    """The parameters of ``optimizer`` (only ``params`` if given) that gradient GC would centralize, with layouts."""
    if module is not None:
        return select(module, config, optimizer, warn=warn).targets
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    return select(params, config, optimizer, warn=warn).targets


# --- the math on one weight ----------------------------------------------------------------------------------


class _Scratch:
    """One buffer per accumulation dtype, ``elements`` long, shared by every weight of a plan."""

    def __init__(self, elements: int) -> None:
        self.elements = max(1, elements)
        self._buffers: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def get(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (dtype, device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(self.elements, dtype=dtype, device=device)
        return self._buffers[key]


def _stage(block: Tensor, buffer: Tensor) -> Tensor:
    """``block``'s values in ``buffer``'s dtype, laid out in ``block``'s stride order so that copies stream."""
    order = sorted(range(block.ndim), key=lambda d: block.stride(d), reverse=True)
    staged = buffer[: block.numel()].view([block.shape[d] for d in order])
    return staged.permute([order.index(d) for d in range(block.ndim)]).copy_(block)


def _chunks(tensor: Tensor, dims: tuple[int, ...], elements: int) -> tuple[Tensor, ...]:
    """``tensor`` cut along its longest reduced dim into pieces of at most ``elements`` entries (where possible)."""
    dim = max(dims, key=lambda d: tensor.shape[d])
    per = max(1, elements // max(1, tensor.numel() // max(1, tensor.shape[dim])))
    return torch.split(tensor, per, dim)


class _Weight:
    """One selected weight: records its unit sums before a step, corrects its units after it.

    Args:
        name: the parameter's qualified name.
        local: returns the tensor to read and write in place (the parameter, or a DTensor's local shard).
        geometry: where its units are.
        count: entries per unit in the logical (unsharded) weight: what a unit mean divides by.
        groups: process groups over which partial unit sums are all-reduced (empty: units are whole here).
    """

    def __init__(
        self,
        name: str,
        local: Callable[[], Tensor],
        geometry: _Geometry,
        count: int,
        groups: tuple[Any, ...] = (),
    ) -> None:
        self.name = name
        self.local = local
        self.geometry = geometry
        self.count = count
        self.groups = groups
        viewed = geometry.view(local())
        self.dtype = viewed.dtype
        self.acc = sum_dtype(viewed.dtype)
        self.nbytes = viewed.numel() * viewed.element_size()
        self.staged = viewed.device.type == "cpu" and viewed.dtype != self.acc  # CPU promotion would copy
        keep = [1 if d in geometry.dims else n for d, n in enumerate(viewed.shape)]
        self.before = torch.zeros(keep, dtype=self.acc, device=viewed.device)  # one sum per unit
        self._per_unit = viewed.numel() // max(1, geometry.units(viewed.shape))

    def record(self, scratch: _Scratch) -> None:
        """Store the sum of every unit (this rank's part of it, for units cut by shards)."""
        viewed = self.geometry.view(self.local())
        for block, out in self._blocks(viewed, self.before, scratch):
            out.copy_(self._sums(block, scratch))

    def correct(self, scratch: _Scratch) -> None:
        """Whole units: sum each block of units and subtract the change of their means, in one pass."""
        viewed = self.geometry.view(self.local())
        buffer = scratch.get(self.acc, viewed.device) if self.staged else None
        for block, before in self._blocks(viewed, self.before, scratch):
            if buffer is not None and block.numel() <= buffer.numel():
                staged = _stage(block, buffer)
                delta = self._delta(staged.sum(dim=self.geometry.dims, keepdim=True), before)
                if self.dtype in _HALF:  # one rounding: the subtraction in float32, then into the weight
                    block.copy_(staged.sub_(delta))
                else:  # float32: the change of the mean rounded to float32 costs eps32 * |delta|, far below the
                    block.sub_(delta.to(self.dtype))  # rounding of w itself, and saves two passes over the block
            elif buffer is None:
                block.sub_(self._delta(block.sum(dim=self.geometry.dims, keepdim=True, dtype=self.acc), before))
            else:  # units bigger than the scratch: two passes over slices of them
                self._shift(block, self._delta(self._sums(block, scratch), before), scratch)

    def change(self, scratch: _Scratch) -> Tensor:
        """This rank's part of each unit's change of sum since :meth:`record` (for units cut by shards)."""
        viewed = self.geometry.view(self.local())
        after = torch.empty_like(self.before)
        for block, out in self._blocks(viewed, after, scratch):
            out.copy_(self._sums(block, scratch))
        return after.sub_(self.before)

    def shift(self, total_change: Tensor, scratch: _Scratch) -> None:
        """Subtract ``total_change / count`` (each unit's whole change of sum) from every entry of the unit."""
        viewed = self.geometry.view(self.local())
        delta = total_change.div_(self.count)
        for block, part in self._blocks(viewed, delta, scratch):
            self._shift(block, part, scratch)

    def _delta(self, after: Tensor, before: Tensor) -> Tensor:
        return after.sub_(before).div_(self.count)

    def _blocks(self, viewed: Tensor, sums: Tensor, scratch: _Scratch) -> Iterator[tuple[Tensor, Tensor]]:
        """Pairs of (a block of units, their slice of ``sums``), blocks small enough for the scratch."""
        if viewed.numel() == 0:
            return iter(())
        unit_dim = self.geometry.unit_dim
        per_block = max(1, scratch.elements // max(1, self._per_unit))
        if unit_dim is None or per_block >= viewed.shape[unit_dim]:
            return iter(((viewed, sums),))
        return zip(torch.split(viewed, per_block, unit_dim), torch.split(sums, per_block, unit_dim))

    def _sums(self, block: Tensor, scratch: _Scratch) -> Tensor:
        dims = self.geometry.dims
        if not self.staged:
            return block.sum(dim=dims, keepdim=True, dtype=self.acc)
        buffer = scratch.get(self.acc, block.device)
        if block.numel() <= buffer.numel():
            return _stage(block, buffer).sum(dim=dims, keepdim=True)
        total: Tensor | None = None
        for chunk in _chunks(block, dims, buffer.numel()):
            part = (
                self._sums(chunk, scratch) if chunk.numel() <= buffer.numel() else chunk.sum(dims, True, dtype=self.acc)
            )
            total = part if total is None else total.add_(part)
        assert total is not None
        return total

    def _shift(self, block: Tensor, delta: Tensor, scratch: _Scratch) -> None:
        if not self.staged:
            block.sub_(delta)
            return
        if self.dtype not in _HALF:  # float32 under float64 sums: see `correct`
            block.sub_(delta.to(self.dtype))
            return
        buffer = scratch.get(self.acc, block.device)
        for chunk in (
            (block,) if block.numel() <= buffer.numel() else _chunks(block, self.geometry.dims, buffer.numel())
        ):
            if chunk.numel() > buffer.numel():  # one slice bigger than the scratch (a huge unit): a one-off temporary
                chunk.copy_(chunk.to(self.acc).sub_(delta))
                continue
            staged = _stage(chunk, buffer)
            chunk.copy_(staged.sub_(delta))


# --- plans -----------------------------------------------------------------------------------------------------


class UpdatePlan:
    """GC of one optimizer's updates: :meth:`record` before its step, :meth:`correct` after it.

    Build it with :meth:`for_optimizer`. Under sharded DTensor layouts :meth:`correct` is a collective: every
    rank must step (it does, under FSDP2 and tensor parallel).

    Example:
        >>> model = nn.Linear(3, 2)
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        >>> plan = UpdatePlan.for_optimizer(optimizer, model, GCConfig())
        >>> before = model.weight.detach().double().mean(dim=1)
        >>> model(torch.randn(4, 3)).sum().backward()
        >>> plan.record(); optimizer.step(); plan.correct()
        >>> torch.allclose(model.weight.detach().double().mean(dim=1), before, atol=1e-7)
        True
    """

    def __init__(self, weights: list[_Weight], pieces: list[_PieceGroup] | None = None) -> None:
        self.weights = weights
        self.pieces = pieces or []
        weight_bytes = sum(w.nbytes for w in weights)
        sum_bytes = sum(w.before.numel() * w.before.element_size() for w in weights)
        budget = weight_bytes // BUDGET_FRACTION - sum_bytes  # sums and scratch together within the budget
        scratch_bytes = min(SCRATCH_MAX_BYTES, max(SCRATCH_MIN_BYTES, budget))
        self._scratch = _Scratch(scratch_bytes // 8)  # in entries of the widest accumulation dtype
        self._recorded = False

    @classmethod
    def for_optimizer(
        cls,
        optimizer: Optimizer,
        module: nn.Module | None,
        config: GCConfig,
        warn: Warn | None = None,
        root: nn.Module | None = None,
        params: list[nn.Parameter] | None = None,
    ) -> UpdatePlan:
        """Plan for the parameters of ``optimizer`` that gradient GC would select (owners looked up in ``module``).

        ``root`` (default ``module``) is searched for FSDP1 modules: their flat shards are corrected in place
        with the row geometry of the gradient route. Without a module, ``params`` restricts the plan to them.

        Raises:
            UnsupportedGradientLayoutError: for FSDP1-flattened parameters no FSDP module owns, and DTensor
                layouts it cannot correct.
        """
        root = root if root is not None else module
        if module is not None and root is not None and _has_fsdp1(root):
            return _fsdp1_plan(optimizer, module, root, config, warn)
        targets = _selected(optimizer, module, config, warn, params)
        return cls([_weight_for(target, config.mode) for target in targets])

    @property
    def extra_bytes(self) -> int:
        """Memory this plan holds: one sum per unit, and the scratch."""
        sums = sum(w.before.numel() * w.before.element_size() for w in self.weights)
        dtypes = {(w.acc, w.before.device) for w in self.weights if w.staged}
        return sums + sum(self._scratch.elements * torch.finfo(d).bits // 8 for d, _ in dtypes)

    def record(self) -> None:
        """Remember every unit's sum; call right before the optimizer step."""
        with torch.no_grad():
            for weight in self.weights:
                weight.record(self._scratch)
            for group in self.pieces:
                group.record()
        self._recorded = True

    def correct(self) -> None:
        """Make every unit's mean what :meth:`record` saw; call right after the optimizer step."""
        if not self._recorded:
            return
        self._recorded = False
        with torch.no_grad():
            cut: dict[tuple[Any, ...], list[tuple[_Weight, Tensor]]] = {}
            for weight in self.weights:
                if weight.groups:
                    cut.setdefault(weight.groups, []).append((weight, weight.change(self._scratch)))
                else:
                    weight.correct(self._scratch)
            for groups, changes in cut.items():
                _all_reduce_sum([c for _, c in changes], groups)
                for weight, change in changes:
                    weight.shift(change, self._scratch)
            for group in self.pieces:
                group.correct()


def _all_reduce_sum(parts: list[Tensor], groups: tuple[Any, ...]) -> None:
    """Sum every tensor of ``parts`` over each process group of ``groups``: one flat buffer, one call per group."""
    flat = torch.cat([p.reshape(-1) for p in parts])
    for group in groups:
        torch.distributed.all_reduce(flat, group=group)
    for part, reduced in zip(parts, torch.split(flat, [p.numel() for p in parts])):
        part.copy_(reduced.view_as(part))


def _weight_for(target: Target, mode: Mode) -> _Weight:
    param = target.param
    geometry = _Geometry.of(target.layout, param.ndim, mode)
    if getattr(param, "_fsdp_flattened", False) or getattr(param, "_is_flat_param", False):
        raise UnsupportedGradientLayoutError(
            f"GC of the update (apply_to='update') cannot correct `{target.name}`: FSDP1 flattened it into 1-D"
            " shards and no FullyShardedDataParallel module it was given owns them: pass the FSDP-wrapped model."
        )
    if has_dtensors([param]):
        return _dtensor_weight(target, geometry, mode)
    detached = param.detach()
    viewed = geometry.view(detached)
    count = viewed.numel() // max(1, geometry.units(viewed.shape))
    return _Weight(target.name, lambda: param.detach(), geometry, count)


def _dtensor_weight(target: Target, geometry: _Geometry, mode: Mode) -> _Weight:
    """A DTensor weight: its local shard, and the process groups of the mesh dims that cut its units."""
    param: Any = target.param
    mesh, layout = param.device_mesh, target.layout
    groups, dim0_sharded = [], False
    for mesh_dim, placement in enumerate(param.placements):
        if mesh.size(mesh_dim) == 1 or placement.is_replicate():
            continue
        dim = getattr(placement, "dim", None)  # Shard and _StridedShard
        if not isinstance(dim, int):
            raise UnsupportedGradientLayoutError(
                f"GC of the update cannot correct `{target.name}`: its DTensor placement {placement!r} is not one it"
                " knows (Shard, _StridedShard, Replicate)."
            )
        dim0_sharded = dim0_sharded or dim == 0
        if mode == "tensor" or dim not in layout.out_dims:
            groups.append(mesh.get_group(mesh_dim))
    logical = geometry.view(torch.empty(param.shape, device="meta"))
    count = logical.numel() // max(1, geometry.units(logical.shape))
    if geometry.groups_split_dim0() and dim0_sharded:
        return _SplitGroupsWeight.build(target.name, param, count, tuple(groups), layout.groups)
    return _Weight(target.name, lambda: param.to_local(), geometry, count, tuple(groups))


class _SplitGroupsWeight(_Weight):
    """A grouped transposed convolution whose dim 0 (``groups`` blocks of input channels) is sharded.

    A rank may hold part of a block, so its local rows are not whole groups: sums are taken per (input row,
    output channel) pair on the local shard, added up per group (``index_add``), all-reduced, and each unit's
    change of mean is handed back to the rows of its group (``index_select``).
    """

    group_of_row: Tensor
    conv_groups: int

    @classmethod
    def build(cls, name: str, param: Any, count: int, groups: tuple[Any, ...], conv_groups: int) -> _SplitGroupsWeight:
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if not all(p.is_replicate() or isinstance(p, Shard) for p in param.placements):
            raise UnsupportedGradientLayoutError(
                f"GC of the update cannot correct `{name}`: a grouped transposed convolution whose dim 0 is split"
                f" with {tuple(param.placements)} (only Shard and Replicate are supported there). Exclude it."
            )
        _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        local = param.to_local()
        per_pair = _Geometry(RowLayout(), tuple(range(2, local.ndim)), 0)  # units: (input row, output channel)
        weight = cls(name, lambda: param.to_local(), per_pair, count, groups)
        rows = torch.arange(local.shape[0], device=local.device) + int(offset[0])
        weight.group_of_row = torch.div(rows, param.shape[0] // conv_groups, rounding_mode="floor")
        weight.conv_groups = conv_groups
        return weight

    def change(self, scratch: _Scratch) -> Tensor:
        per_pair = super().change(scratch)
        per_unit = per_pair.new_zeros((self.conv_groups, *per_pair.shape[1:]))
        return per_unit.index_add_(0, self.group_of_row, per_pair)

    def shift(self, total_change: Tensor, scratch: _Scratch) -> None:
        super().shift(total_change.index_select(0, self.group_of_row), scratch)


class _PieceGroup:
    """FSDP1 flat-shard pieces sharing one process group (the gradient route's :class:`ReduceGroup` geometry).

    Each rank holds contiguous pieces of some weights. Before the step it records each piece's per-row sums
    (float64; rows are output units); after it, the change of the sums of rows that shard boundaries cut is
    all-reduced (one buffer, the same layout on every rank), and each rank subtracts every row's change of
    mean from its piece. Rows held whole by one rank never travel.
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.before: dict[int, Tensor] = {}

    def record(self) -> None:
        for target in self.group.targets:
            weight = target.weight()
            if weight is not None:
                self.before[id(target)] = target.piece.sums(weight, torch.float64)

    def correct(self) -> None:
        live = [(t, w) for t in self.group.targets if (w := t.weight()) is not None and id(t) in self.before]
        changes = [t.piece.sums(w, torch.float64).sub_(self.before[id(t)]) for t, w in live]
        reduced = None
        if not self.group.replicated and self.group.grad_slots:  # the same on every rank: a collective
            reduced = torch.zeros(self.group.grad_slots, dtype=torch.float64, device=self.group.device)
            slots = [t.grad_slots for t, _ in live]
            parts = [c.index_select(0, t.local_cut.to(c.device)).to(reduced.device) for (t, _), c in zip(live, changes)]
            if any(s.numel() for s in slots):
                reduced.index_copy_(0, torch.cat(slots), torch.cat(parts))
            torch.distributed.all_reduce(reduced, group=self.group.process_group)
        for (target, weight), change in zip(live, changes):
            if reduced is not None and target.grad_slots.numel():
                local = target.local_cut.to(change.device)
                change = change.index_copy(0, local, reduced.index_select(0, target.grad_slots).to(change.device))
            target.piece.subtract_(weight, change.div_(target.rows.row_numel).to(weight.dtype))


def _has_fsdp1(module: nn.Module) -> bool:
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in module.modules())


def _fsdp1_plan(
    optimizer: Optimizer, module: nn.Module, root: nn.Module, config: GCConfig, warn: Warn | None
) -> UpdatePlan:
    """The flat-shard targets of the gradient route (same selection, same row geometry), corrected as updates."""
    from lightning_gc.sharding.fsdp import FlatShardPlan

    shards = FlatShardPlan.for_optimizer(optimizer, module, root, config, warn or (lambda message: None))
    dense = [_weight_for(t, config.mode) for t in (shards.dense.targets if shards.dense is not None else [])]
    return UpdatePlan(dense, [_PieceGroup(group) for group in shards.groups])


# --- hooks -----------------------------------------------------------------------------------------------------

_ACTIVE: WeakIdKeyDictionary = WeakIdKeyDictionary()  # optimizer -> its UpdateHandle


class UpdateHandle:
    """GC of ``optimizer``'s updates through its step hooks, until :meth:`remove`.

    The plan is rebuilt when the optimizer's parameters change (an added param group, an unfrozen layer).

    Attributes:
        optimizer: the optimizer whose steps are centralized.
        steps: optimizer steps corrected so far (a step the GradScaler skips is not one).
    """

    def __init__(self, optimizer: Optimizer, build: Callable[[], UpdatePlan]) -> None:
        if optimizer in _ACTIVE:
            raise ValueError(
                f"the updates of this {type(optimizer).__name__} are already centralized (GradientCentralization"
                " with apply_to='update', or centralize_updates): call `.remove()` on the first handle first"
            )
        self.optimizer = optimizer
        self.steps = 0
        self._build = build
        self._signature = plan_signature(optimizer)
        self.plan = build()
        self._hooks = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        _ACTIVE[optimizer] = self

    @property
    def active(self) -> bool:
        """Whether the hooks are still registered."""
        return bool(self._hooks)

    def remove(self) -> None:
        """Unregister the hooks; later steps are plain optimizer steps. Idempotent."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.optimizer in _ACTIVE and _ACTIVE[self.optimizer] is self:
            del _ACTIVE[self.optimizer]

    def __enter__(self) -> UpdateHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        signature = plan_signature(optimizer)
        if signature != self._signature:
            self.plan, self._signature = self._build(), signature
        self.plan.record()

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.plan.correct()
        self.steps += 1


def centralize_updates(
    model: nn.Module | Iterable[nn.Parameter],
    optimizer: Optimizer,
    *,
    conv_only: bool = False,
    mode: Mode = "channel",
    exclude: Sequence[str] = (),
    exclude_modules: Sequence[ModuleSpec] = DEFAULT_EXCLUDED_MODULES,
    centralize_weight_decay: bool = False,
    warn: Warn | None = None,
) -> UpdateHandle:
    """Centralize every update of ``optimizer``: after each step, ``w = w_before + GC(w_after - w_before)``.

    Call it once, before training; every later ``optimizer.step()`` (plain, Fabric, a ``GradScaler``) is
    centralized until ``handle.remove()``. The selection (``conv_only``, ``exclude``, ``exclude_modules``,
    layouts) and ``mode`` are those of :func:`~lightning_gc.centralize_gradients`. Unlike GC of the gradient,
    every unit's mean stays fixed for every optimizer (Adam's per-entry scaling included).

    DTensor parameters (FSDP2, tensor parallel) and FSDP1-wrapped modules (pass the wrapped model) are
    corrected exactly in their sharded layout; every rank steps, as those strategies require anyway.

    Args:
        model: the model (module types known) or its parameters.
        optimizer: the optimizer to hook (a Fabric-wrapped optimizer is unwrapped).
        conv_only, mode, exclude, exclude_modules: as in :class:`~lightning_gc.GradientCentralization`.
        centralize_weight_decay: must stay False: the decay is already part of the change.
        warn: where selection warnings go (default: ``warnings.warn``).

    Returns:
        :class:`UpdateHandle`; ``handle.remove()`` unregisters the hooks.

    Raises:
        ValueError: for invalid options, ``centralize_weight_decay=True``, or an optimizer already hooked.
        UnsupportedGradientLayoutError: for FSDP1-flattened parameters without their FSDP module.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        >>> handle = centralize_updates(model, optimizer)
        >>> means = model[0].weight.detach().double().mean(dim=1)
        >>> model(torch.randn(5, 4)).sum().backward()
        >>> optimizer.step()
        >>> torch.allclose(model[0].weight.detach().double().mean(dim=1), means, atol=1e-7)
        True
        >>> handle.remove()
    """
    config = update_config(
        conv_only=conv_only,
        mode=mode,
        exclude=exclude,
        exclude_modules=exclude_modules,
        centralize_weight_decay=centralize_weight_decay,
    )
    if warn is None:
        from lightning_gc.errors import warn
    raw = _unwrap_optimizer(optimizer)
    module = _unwrap_module(model) if isinstance(model, nn.Module) else None
    params = None if isinstance(model, nn.Module) else list(model)
    if params is not None:
        _check_params_in_optimizer(raw, {id(p) for p in params})
    report = warn
    return UpdateHandle(raw, lambda: UpdatePlan.for_optimizer(raw, module, config, report, params=params))


def update_config(
    *,
    conv_only: bool = False,
    mode: Mode = "channel",
    exclude: Sequence[str] | str = (),
    exclude_modules: Sequence[ModuleSpec] | str = DEFAULT_EXCLUDED_MODULES,
    centralize_weight_decay: bool = False,
) -> GCConfig:
    """The validated options of the update placement (``GCConfig(apply_to="update", ...)``).

    Raises:
        ValueError: as :class:`~lightning_gc.config.GCConfig` does, ``centralize_weight_decay=True`` included.
    """
    return GCConfig(
        conv_only=conv_only,
        mode=mode,
        centralize_weight_decay=centralize_weight_decay,
        exclude=cast(Any, exclude),  # GCConfig validates and normalizes
        exclude_modules=cast(Any, exclude_modules),
        apply_to="update",
    )


def check_strategy(strategy: object) -> None:
    """Refuse strategies under which the update placement has no exact route.

    Raises:
        UnsupportedGradientLayoutError: for DeepSpeed (any ZeRO stage), naming the alternatives.
    """
    bases = {cls.__name__ for cls in type(strategy).__mro__}
    for base, (what, alternative) in _REFUSED_STRATEGIES.items():
        if base in bases:
            raise UnsupportedGradientLayoutError(
                f"GradientCentralization(apply_to='update') does not support {what} ({type(strategy).__name__}):"
                f" its optimizer steps flattened parameter shards; {alternative}."
            )


def _check_params_in_optimizer(optimizer: Optimizer, wanted: set[int]) -> None:
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if not wanted <= stepped:
        raise ValueError("`model` lists parameters the optimizer does not step: pass the model the optimizer trains")


def _unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The ``torch.optim.Optimizer`` behind Lightning's and Fabric's wrappers."""
    for attr in ("_optimizer", "optimizer"):
        inner = getattr(optimizer, attr, None)
        if isinstance(inner, Optimizer) and not isinstance(optimizer, Optimizer):
            return _unwrap_optimizer(inner)
    if not isinstance(optimizer, Optimizer):
        raise ValueError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def _unwrap_module(model: nn.Module) -> nn.Module:
    """The user's module behind Fabric's wrapper, so that names and module types are the user's."""
    if type(model).__name__ == "_FabricModule":
        return model.module  # type: ignore[return-value]
    return model


class UpdateHooks:
    """The callback side of the update placement: one :class:`UpdateHandle` per optimizer of a fit.

    Example:
        >>> hooks = UpdateHooks(update_config())
        >>> hooks.handles
        []
    """

    def __init__(self, config: GCConfig) -> None:
        self.config = config
        self.handles: list[UpdateHandle] = []

    def attach(self, optimizers: Iterable[Any], module: nn.Module, warn: Warn, root: nn.Module | None = None) -> None:
        """Hook every optimizer (Lightning's wrappers unwrapped); a second call re-hooks.

        ``root``: the strategy's wrapped model (FSDP1 modules are looked up there).
        """
        self.detach()
        config = self.config
        for optimizer in optimizers:
            raw = _unwrap_optimizer(optimizer)
            self.handles.append(
                UpdateHandle(raw, lambda raw=raw: UpdatePlan.for_optimizer(raw, module, config, warn, root))  # type: ignore[misc]
            )

    def detach(self) -> None:
        """Remove every hook this object registered."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @property
    def steps(self) -> int:
        """Optimizer steps centralized, over all optimizers."""
        return sum(h.steps for h in self.handles)
