"""DTensor gradients: ``ModelParallelStrategy`` (FSDP2 ``fully_shard``, tensor parallel, both; any mesh).

Every gradient is a ``DTensor``: a local tensor plus one placement per mesh dim. GC needs, for each output
unit ("row"), the mean of its entries. Where no placement shards a dim that GC reduces over (FSDP2's
``Shard(0)`` of a linear or conv weight, ``ColwiseParallel``) each rank holds whole rows, and GC is exact on
the local tensor with no communication. Otherwise (``RowwiseParallel``'s ``Shard(1)``, a transposed
convolution's sharded dim 0, ``mode="tensor"``) each rank sums its part of its rows, and the partial sums
are all-reduced over the mesh dims that split the rows: ``O(rows)`` values, one collective per process group
per step. No gradient is ever gathered (DTensor's own ``grad.mean(dims)`` all-gathers the whole gradient
when a reduced dim is sharded unevenly, torch 2.13).

``Partial`` gradients are first reduced to the weight's placements (the reduction the optimizer step would
otherwise do). Diagnostics are summed over the world with replicated copies counted once, so every rank
gets the same global values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_gc.centralize import accumulation_dtype, removed_sq_norm
from lightning_gc.config import GCConfig
from lightning_gc.diagnostics import GCStats
from lightning_gc.errors import UnsupportedGradientLayoutError
from lightning_gc.errors import warn as warn_user
from lightning_gc.layouts import Mode
from lightning_gc.selection import Selection, Target, select
from lightning_gc.sharding.guard import check_dense_gradient

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

Warn = Callable[[str], None]


@dataclass(frozen=True)
class DTensorAdapter:
    """Plans for ``ModelParallelStrategy``: the optimizer's parameters, centralized in their DTensor layout.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> plan = DTensorAdapter().build_plan(GCConfig(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), module=model)
        >>> [t.name for t in plan.targets]
        ['weight']
    """

    strategy_name: str = "ModelParallelStrategy"
    dense: ClassVar[bool] = False

    def build_plan(
        self,
        config: GCConfig,
        *,
        optimizer: Optimizer | None = None,
        module: nn.Module | None = None,
        params: list[nn.Parameter] | None = None,
        warn: Warn = warn_user,
    ) -> DTensorPlan:
        """Select the targets as for dense gradients (same options, same warnings); centralize them sharded."""
        selection = select(module if module is not None else params or [], config, optimizer, warn=warn)
        return DTensorPlan(selection.targets, config.mode, warn, self.strategy_name, selection)


class DTensorPlan:
    """Exact GC of DTensor gradients; plain-tensor gradients are centralized as they are, counted once.

    Every rank must call :meth:`apply` at the same point with the same gradients present (``None`` on
    all ranks or on none): the row-sum and diagnostics reductions are collectives.

    Args:
        targets: what to centralize, with the coupled weight decay to compensate for.
        mode: ``"channel"`` or ``"tensor"``.
        warn: called with a message for skipped sparse gradients.
        strategy_name: named in errors.
    """

    def __init__(
        self,
        targets: list[Target],
        mode: Mode = "channel",
        warn: Warn = warn_user,
        strategy_name: str = "",
        selection: Selection | None = None,
    ) -> None:
        self.targets = targets
        self.selection = selection
        self.mode = mode
        self._warn = warn
        self._strategy_name = strategy_name
        self._sparse_warned = False

    def apply(self, compute_stats: bool = False, grad_scale: float = 1.0) -> GCStats:
        """Centralize every planned gradient in place; skip those whose ``.grad`` is None.

        Args:
            compute_stats: also compute the global gradient norm and what GC removed (one more read of the
                local gradients and one all-reduce of two numbers).
            grad_scale: the loss scale the gradients still carry; see :meth:`lightning_gc.plan.GCPlan.apply`.

        Raises:
            UnsupportedGradientLayoutError: for a placement it does not know, a gradient whose shape is not its
                parameter's, or a decay compensation that would need to move gradients between ranks.
        """
        with torch.no_grad():
            rows = [self._rows(planned, grad, grad_scale) for planned, grad in self._live()]
            stats = GCStats(tensors=len(rows), elements=sum(r.numel for r in rows))
            if not rows:
                return stats
            grad_sq = [r.once(_sq_norm(r.local)) for r in rows] if compute_stats else []
            _complete_row_sums(rows, keep_decay_apart=compute_stats)
            removed = [r.once(r.subtract(measure=compute_stats)) for r in rows]
            if compute_stats:
                totals = torch.stack([torch.stack(grad_sq).sum(), torch.stack(removed).sum()])
                _all_reduce_world(totals)
                stats.grad_sq, stats.removed_sq = totals[0] / grad_scale**2, totals[1] / grad_scale**2
            return stats

    def _live(self) -> list[tuple[Target, Tensor]]:
        live = []
        for planned in self.targets:
            grad = planned.param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                self._warn_sparse(planned)
                continue
            live.append((planned, grad))
        return live

    def _rows(self, target: Target, grad: Tensor, grad_scale: float) -> _Rows:
        weight = target.param.detach() if target.decay else None
        if not _is_dtensor(grad) or grad.shape != target.param.shape:
            check_dense_gradient(target, grad, self._strategy_name)  # raises for a DTensor of the wrong shape
            return _Rows.build(grad, weight, target, _Layout.dense(grad.shape), self.mode, grad_scale)
        sharded = _normalized(target.param, cast("DTensor", grad), match_weight=weight is not None, name=target.name)
        layout = _Layout.of(sharded, target.name, target.layout.out_dims, target.layout.groups, self.mode)
        local_weight = cast("DTensor", weight).to_local() if weight is not None and _is_dtensor(weight) else weight
        return _Rows.build(sharded.to_local(), local_weight, target, layout, self.mode, grad_scale)

    def _warn_sparse(self, target: Target) -> None:
        if not self._sparse_warned:
            self._sparse_warned = True
            self._warn(
                f"GradientCentralization skips sparse gradients (first seen: `{target.name}`): GC needs every"
                " entry of a row. Exclude the parameter to silence this."
            )


@dataclass(frozen=True)
class _Layout:
    """Where a gradient's local tensor sits in the logical one, as far as GC cares.

    Args:
        shape: the logical shape.
        replicas: how many ranks hold each local entry (the ``Replicate`` mesh dims; the world for a plain
            tensor), so that world sums count each entry once.
        groups: process groups of the mesh dims that split rows; row sums are all-reduced over each in turn.
        dim0_offset: logical index of the local tensor's first dim-0 entry (for grouped transposed
            convolutions, whose rows are blocks of dim 0).
    """

    shape: torch.Size
    replicas: int
    groups: tuple[Any, ...] = ()
    dim0_offset: int = 0

    @classmethod
    def dense(cls, shape: torch.Size) -> _Layout:
        """A plain tensor, whole on every rank."""
        world = torch.distributed.get_world_size() if _distributed() else 1
        return cls(shape, replicas=world)

    @classmethod
    def of(cls, grad: DTensor, name: str, out_dims: tuple[int, ...], conv_groups: int, mode: Mode) -> _Layout:
        """The layout of DTensor ``grad`` (no ``Partial`` placements), for rows along ``out_dims``."""
        mesh = grad.device_mesh
        replicas, splitting, sharded = 1, [], set()
        for mesh_dim, placement in enumerate(grad.placements):
            if mesh.size(mesh_dim) == 1:
                continue
            if placement.is_replicate():
                replicas *= mesh.size(mesh_dim)
                continue
            dim = _sharded_dim(placement, name)
            sharded.add(dim)
            if mode == "tensor" or dim not in out_dims:
                splitting.append(mesh_dim)
        offset = 0
        if conv_groups > 1 and mode == "channel" and 0 in sharded:
            offset = _dim0_offset(grad, name)
        return cls(grad.shape, replicas, tuple(mesh.get_group(d) for d in splitting), offset)


@dataclass
class _Rows:
    """One gradient's local tensor and its row sums (float32 for half precision, else its own dtype).

    ``sums`` (and ``decay_sums``: the weight's row sums times the decay coefficient) have the local tensor's
    shape with every reduced dim kept as 1. For a grouped transposed convolution their dim 0 has one entry
    per group and ``group_of_row`` maps each local dim-0 index to its group.
    """

    local: Tensor
    sums: Tensor
    decay_sums: Tensor | None
    count: int
    numel: int
    layout: _Layout
    group_of_row: Tensor | None

    @classmethod
    def build(
        cls,
        local: Tensor,
        weight: Tensor | None,
        planned: Target,
        layout: _Layout,
        mode: Mode,
        grad_scale: float,
    ) -> _Rows:
        """The local row sums of ``local`` (and of ``weight`` for the decay), not yet completed over ranks."""
        row_layout = planned.layout
        conv_groups = row_layout.groups if mode == "channel" else 1
        keep = () if mode == "tensor" else row_layout.out_dims
        group_of_row = None
        if conv_groups > 1:
            index = torch.arange(local.shape[0], device=local.device) + layout.dim0_offset
            group_of_row = torch.div(index, layout.shape[0] // conv_groups, rounding_mode="floor")
        count = math.prod(n for d, n in enumerate(layout.shape) if d not in keep) // conv_groups
        sums = _row_sums(local, keep, group_of_row, conv_groups)
        decay_sums = None
        if weight is not None:
            decay_sums = _row_sums(weight, keep, group_of_row, conv_groups) * (planned.decay * grad_scale)
        return cls(local, sums, decay_sums, count, math.prod(layout.shape), layout, group_of_row)

    def once(self, value: Tensor) -> Tensor:
        """``value`` divided by the number of ranks holding the same entries."""
        return value / self.layout.replicas

    def subtract(self, measure: bool) -> Tensor:
        """Subtract the row means (and the decay compensation) in place.

        Returns the squared norm of the removed gradient mean over the local entries if ``measure``, else 0.
        """
        mean = self._per_row(self.sums / self.count)
        removed = removed_sq_norm(mean, self.local.numel()).float() if measure else mean.new_zeros(())
        if self.decay_sums is not None:
            mean = mean + self._per_row(self.decay_sums / self.count)
        self.local.sub_(mean)
        return removed

    def _per_row(self, per_unit: Tensor) -> Tensor:
        return per_unit if self.group_of_row is None else per_unit.index_select(0, self.group_of_row)


def _row_sums(local: Tensor, keep: Sequence[int], group_of_row: Tensor | None, conv_groups: int) -> Tensor:
    dtype = accumulation_dtype(local.dtype)
    if group_of_row is None:
        return local.sum(dim=tuple(d for d in range(local.ndim) if d not in keep), keepdim=True, dtype=dtype)
    per_index = local.sum(dim=tuple(range(2, local.ndim)), keepdim=True, dtype=dtype)
    return per_index.new_zeros((conv_groups, *per_index.shape[1:])).index_add_(0, group_of_row, per_index)


def _complete_row_sums(rows: list[_Rows], keep_decay_apart: bool) -> None:
    """All-reduce every partial row sum over the ranks that split its rows: one flat buffer per group set."""
    if not keep_decay_apart:  # only the diagnostics need the gradient's own sums: fold the decay in first
        for r in rows:
            if r.decay_sums is not None:
                r.sums, r.decay_sums = r.sums + r.decay_sums, None
    batches: dict[tuple[Any, ...], list[Tensor]] = {}
    for r in rows:
        if r.layout.groups:
            batches.setdefault(r.layout.groups, []).extend(t for t in (r.sums, r.decay_sums) if t is not None)
    for groups, parts in batches.items():
        flat = torch.cat([p.reshape(-1) for p in parts])
        for group in groups:
            torch.distributed.all_reduce(flat, group=group)
        for part, reduced in zip(parts, torch.split(flat, [p.numel() for p in parts])):
            part.copy_(reduced.view_as(part))


def _normalized(param: Tensor, grad: DTensor, match_weight: bool, name: str) -> DTensor:
    """``grad``, redistributed (and assigned back to ``param.grad``) where GC cannot work in its layout.

    ``Partial`` mesh dims are reduced to the weight's placement there. The decay compensation needs the
    gradient laid out like the weight: ``Replicate`` mesh dims are narrowed to the weight's shards (a local
    slice, no communication); any other mismatch is refused rather than moving gradients between ranks.

    Raises:
        UnsupportedGradientLayoutError: when ``match_weight`` and the layouts differ other than by ``Replicate``.
    """
    have, want = tuple(grad.placements), _weight_placements(param, grad)
    target = tuple(w if h.is_partial() or (match_weight and h.is_replicate()) else h for h, w in zip(have, want))
    if match_weight and target != want:
        raise UnsupportedGradientLayoutError(
            f"GradientCentralization cannot compensate the weight decay of `{name}`: its gradient is laid out as"
            f" {have} but the weight as {want}, and matching them would move the gradient between ranks. Use"
            " `centralize_weight_decay=False` or exclude the parameter."
        )
    if target == have:
        return grad
    grad = grad.redistribute(grad.device_mesh, target)
    param.grad = grad
    return grad


def _weight_placements(param: Tensor, grad: DTensor) -> tuple[Any, ...]:
    from torch.distributed.tensor import Replicate

    same_mesh = _is_dtensor(param) and cast("DTensor", param).device_mesh == grad.device_mesh
    source = cast("DTensor", param) if same_mesh else grad
    return tuple(Replicate() if p.is_partial() else p for p in source.placements)


def _sharded_dim(placement: Any, name: str) -> int:
    dim = getattr(placement, "dim", None)  # Shard and _StridedShard (which is not a Shard subclass)
    if placement.is_partial() or not isinstance(dim, int):
        raise UnsupportedGradientLayoutError(
            f"GradientCentralization cannot centralize `{name}`: its gradient has the DTensor placement"
            f" {placement!r}, which it does not know. Known: Shard, _StridedShard, Replicate, Partial."
        )
    return dim


def _dim0_offset(grad: DTensor, name: str) -> int:
    from torch.distributed.tensor import Shard

    if not all(p.is_replicate() or isinstance(p, Shard) for p in grad.placements):
        raise UnsupportedGradientLayoutError(
            f"GradientCentralization cannot centralize `{name}`: a grouped transposed convolution whose dim 0 is"
            f" split with {tuple(grad.placements)} (only Shard and Replicate are supported there). Exclude it."
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(grad.shape, grad.device_mesh, grad.placements)
    return int(offset[0])


def _sq_norm(tensor: Tensor) -> Tensor:
    norm = torch.linalg.vector_norm(tensor, dtype=torch.promote_types(tensor.dtype, torch.float32))
    squared: Tensor = norm.float().square()
    return squared


def _all_reduce_world(tensor: Tensor) -> None:
    if _distributed():
        torch.distributed.all_reduce(tensor)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def has_dtensors(params: Iterable[Tensor]) -> bool:
    """Whether any of ``params`` is a DTensor (checked by class name first, so torch.distributed stays unimported).

    Example:
        >>> has_dtensors([torch.zeros(2)])
        False
    """
    # the distinct types first (C-level): this runs on every functional call, over every parameter
    return any(t.__name__ == "DTensor" and _is_dtensor_type(t) for t in set(map(type, params)))


def _is_dtensor(tensor: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support has no DTensors
        return False
    return isinstance(tensor, DTensor)


def _is_dtensor_type(cls: type) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support has no DTensors
        return False
    return issubclass(cls, DTensor)
