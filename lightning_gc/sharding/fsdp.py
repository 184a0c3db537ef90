"""FSDP1 (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``): exact GC from the flat shards.

FSDP1 flattens the parameters of each wrapped module into one ``FlatParameter`` (storage order, with
alignment padding) and gives rank ``r`` of the shard group the range ``[r * S, (r + 1) * S)`` of it. At the
hook each rank holds that range of the reduced gradient: ``flat_param.grad`` (``use_orig_params=False``,
the optimizer holds ``FlatParameter`` s), or 1-D views of it as the original parameters' ``.grad``
(``use_orig_params=True``; ``None`` where the parameter is not in the rank's range). Rows cut by a range
boundary get their sum from every rank that holds a piece (:mod:`~lightning_gc.sharding.row_reduce`): the
partial sums of the cut rows (and, for ``centralize_weight_decay``, of the weights; and two scalars for the
diagnostics) travel in **one** all-reduce per shard group per step, and each rank subtracts locally. Rows
a rank holds whole never leave it. ``HYBRID_SHARD`` reduces over the shard group only (replicas hold the
same shards). ``NO_SHARD``, and a shard group of one rank (which FSDP runs as ``NO_SHARD``), need no
communication at all.

The row geometry comes from PyTorch's private flat-parameter metadata (``_shard_param_infos``, ``_shapes``,
``_strides``, ``_numels_with_padding``, ...). It is checked for presence when a plan is built, and the
ranges this module derives are checked against ``_shard_param_infos`` on every rank, so a change in PyTorch
raises instead of centralizing wrong rows. Verified on the torch versions in :data:`TESTED_TORCH_VERSIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_gc.config import GCConfig
from lightning_gc.diagnostics import GCStats
from lightning_gc.errors import UnsupportedGradientLayoutError
from lightning_gc.errors import warn as warn_user
from lightning_gc.plan import GCPlan
from lightning_gc.selection import OwnerIndex, Selection, Selector, select, warn_about_selection
from lightning_gc.sharding.flat_rows import FlatRows, RowSlice
from lightning_gc.sharding.row_reduce import PieceShardPlan, PieceTarget, ReduceGroup, row_sum_dtype
from lightning_gc.weight_decay import decay_for_group

Warn = Callable[[str], None]

#: ``major.minor`` torch versions whose ``FlatParameter`` metadata this module was verified against.
TESTED_TORCH_VERSIONS: tuple[str, ...] = ("2.13",)

#: The ``FlatParameter`` attributes this module reads.
FLAT_PARAM_METADATA: tuple[str, ...] = (
    "_fqns",
    "_shapes",
    "_strides",
    "_numels",
    "_numels_with_padding",
    "_is_padding_mask",
    "_param_infos",
    "_param_extensions",
    "_shard_param_infos",
    "_sharded_size",
)
_SHARD_PARAM_INFO_FIELDS = (
    "in_shard",
    "offset_in_shard",
    "numel_in_shard",
    "intra_param_start_idx",
    "intra_param_end_idx",
)


@dataclass(frozen=True)
class FSDPAdapter:
    """Plans exact GC for parameters managed by FSDP1 handles, dense GC for any others.

    Args:
        strategy_name: named in errors.
        root: returns the outermost FSDP-wrapped module (Lightning: ``strategy.model``); when it returns
            ``None`` the ``module`` given to :meth:`build_plan` is searched instead.
    """

    strategy_name: str = "FSDPStrategy"
    root: Callable[[], nn.Module | None] = field(default=lambda: None)
    dense: ClassVar[bool] = False

    def build_plan(
        self,
        config: GCConfig,
        *,
        optimizer: Optimizer | None = None,
        module: nn.Module | None = None,
        params: list[nn.Parameter] | None = None,
        warn: Warn = warn_user,
    ) -> FlatShardPlan:
        root = self.root() or module
        if module is None or root is None:
            raise UnsupportedGradientLayoutError(
                f"GradientCentralization under {self.strategy_name} needs the FSDP-wrapped module, not bare"
                " parameters: the flat shards are mapped back to weights through it."
            )
        return FlatShardPlan.for_optimizer(optimizer, module, root, config, warn, self.strategy_name)


@dataclass
class _FSDPTarget(PieceTarget):
    """A weight inside an FSDP1 ``FlatParameter``: its piece is ``[offset, offset + n)`` of the local shard."""

    handle: Any = None  # FlatParamHandle
    orig: nn.Parameter | None = None  # the optimizer's parameter under use_orig_params=True
    offset: int = 0

    def counts(self) -> bool:
        if self.handle.flat_param.grad is None:
            return False
        return self.orig is None or self.orig.requires_grad

    def grad(self) -> Tensor | None:
        flat_grad = self.handle.flat_param.grad
        if self.piece is None or flat_grad is None:
            return None
        piece = flat_grad.narrow(0, self.offset, self.piece.numel)
        if self.orig is not None:
            grad = self.orig.grad
            if grad is None:
                return None
            if grad.data_ptr() != piece.data_ptr():
                raise UnsupportedGradientLayoutError(
                    f"GradientCentralization cannot centralize `{self.name}`: its `.grad` is no longer a view of"
                    " FSDP's sharded flat gradient (was it replaced between backward and the optimizer step?)."
                )
        return piece  # type: ignore[no-any-return]  # FSDP's handle is untyped

    def weight(self) -> Tensor | None:
        if self.piece is None:
            return None
        return self.handle.flat_param.detach().narrow(0, self.offset, self.piece.numel)  # type: ignore[no-any-return]


class FlatShardPlan(PieceShardPlan):
    """GC for one optimizer under FSDP1: exact from the flat shards, identical statistics on every rank.

    Build it with :meth:`for_optimizer`; call :meth:`apply` on **every rank** after every backward (it runs
    at most one collective per shard group, the same number on every rank).
    """

    def __init__(self, groups: list[ReduceGroup], dense: GCPlan | None, selection: Selection | None = None) -> None:
        super().__init__(groups, selection)
        self.dense = dense

    @classmethod
    def for_optimizer(
        cls,
        optimizer: Optimizer | None,
        module: nn.Module,
        root: nn.Module,
        config: GCConfig,
        warn: Warn,
        strategy_name: str = "",
    ) -> FlatShardPlan:
        """Plan for ``optimizer``'s parameters (all of ``module``'s if None); ``root`` holds the FSDP handles.

        Raises:
            UnsupportedGradientLayoutError: on torch versions without the flat-parameter metadata, for FSDP
                with tensor-parallel extensions, and for an FSDP-flattened parameter no handle owns.
        """
        handles = fsdp_handles(root)
        for handle in handles:
            check_flat_param_metadata(handle.flat_param, strategy_name)
        if handles and not torch_version_tested():
            warn(
                f"GradientCentralization under FSDP1 reads PyTorch's flat-parameter metadata, verified on torch"
                f" {', '.join(TESTED_TORCH_VERSIONS)}; this is torch {torch.__version__}. Shard ranges are"
                " cross-checked against that metadata on every rank, and a mismatch raises."
            )
        owner_index = OwnerIndex(module, root)
        selector = Selector.of(config)
        param_groups = optimizer.param_groups if optimizer is not None else [{"params": list(module.parameters())}]
        candidates, leftovers = _candidates(param_groups, handles, strategy_name)
        choices = []
        groups: dict[int, ReduceGroup] = {}
        decays: dict[int, float] = {}
        for handle, index, orig, param_group in candidates:
            flat_param = handle.flat_param
            param_name, owner_module, _ = flat_param._param_infos[index]
            owner = owner_index.owner(owner_module, param_name)
            requires_grad = (orig if orig is not None else flat_param).requires_grad
            choice = selector.decide(owner, flat_param._shapes[index], requires_grad)
            choices.append(choice)
            if not choice.selected or choice.layout is None:
                continue
            if config.centralize_weight_decay and optimizer is not None and id(param_group) not in decays:
                decays[id(param_group)] = decay_for_group(optimizer, param_group, warn)
            rows = FlatRows(choice.shape, tuple(flat_param._strides[index]), choice.layout, config.mode)
            target = _target(handle, index, orig, choice.name, rows, decays.get(id(param_group), 0.0))
            key = -1 if _replicated(handle) else id(handle.process_group)
            if key not in groups:
                dtype = row_sum_dtype(handle.flat_param.dtype)
                groups[key] = ReduceGroup(handle.process_group, handle.device, dtype, _replicated(handle))
            groups[key].targets.append(target)
        dense = _dense_plan(optimizer, module, config, leftovers, strategy_name)
        if dense is not None and dense.selection is not None:
            choices += dense.selection.choices
        names = [c.name for c in choices]
        selection = Selection([], choices, selector.unmatched_patterns(names), selector.unmatched_modules(module))
        what = f"{type(optimizer).__name__} optimizer" if optimizer is not None else type(module).__name__
        warn_about_selection(selection, what, warn)
        for group in groups.values():
            group.assign_slots()
        return cls(list(groups.values()), dense, selection)

    def apply(self, compute_stats: bool = False, grad_scale: float = 1.0) -> GCStats:
        """Centralize every planned gradient piece in place; call on every rank.

        Args:
            compute_stats: also measure the gradient norm and what GC removed, over all ranks' pieces (two
                scalars join the all-reduce); identical on every rank.
            grad_scale: the loss scale the gradients still carry, as in :meth:`GCPlan.apply`.
        """
        counted = [t for t in self.targets if t.counts()]
        stats = GCStats(tensors=len(counted), elements=sum(t.rows.numel for t in counted))
        parts = [group.apply(compute_stats, grad_scale) for group in self.groups]
        if self.dense is not None:
            dense = self.dense.apply(compute_stats, grad_scale)
            stats.tensors += dense.tensors
            stats.elements += dense.elements
            if dense.grad_sq is not None and dense.removed_sq is not None:
                parts.append((dense.grad_sq * grad_scale**2, dense.removed_sq * grad_scale**2))
        return self.with_totals(stats, parts, compute_stats, grad_scale)


def fsdp_handles(root: nn.Module) -> list[Any]:
    """The ``FlatParamHandle`` of every FSDP1 module in ``root`` (``root`` included), in module order."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    handles = []
    for fsdp_module in FullyShardedDataParallel.fsdp_modules(root):
        handle = getattr(fsdp_module, "_handle", None)
        if handle is not None and handle.flat_param is not None:
            handles.append(handle)
    return handles


def check_flat_param_metadata(flat_param: Any, strategy_name: str = "FSDPStrategy") -> None:
    """Raise unless ``flat_param`` carries the metadata exact GC reads, in the layout it expects.

    Raises:
        UnsupportedGradientLayoutError: naming what is missing, the torch version and the tested versions.
    """
    missing = [a for a in FLAT_PARAM_METADATA if not hasattr(flat_param, a)]
    infos = getattr(flat_param, "_shard_param_infos", ())
    if not missing and infos and tuple(getattr(infos[0], "_fields", ())) != _SHARD_PARAM_INFO_FIELDS:
        missing.append("_shard_param_infos fields " + str(_SHARD_PARAM_INFO_FIELDS))
    if missing:
        raise UnsupportedGradientLayoutError(
            f"GradientCentralization cannot read FSDP's flat-parameter metadata under {strategy_name} with torch"
            f" {torch.__version__}: missing {missing}. Exact GC under FSDP1 is verified on torch"
            f" {', '.join(TESTED_TORCH_VERSIONS)}; use one of those, or FSDP2 (ModelParallelStrategy / fully_shard)."
        )
    if any(ext is not None for ext in flat_param._param_extensions):
        raise UnsupportedGradientLayoutError(
            f"GradientCentralization does not support FSDP1 over tensor-parallel (DTensor) parameters under"
            f" {strategy_name} (`{flat_param._fqns[0]}` ...): use ModelParallelStrategy (FSDP2 + tensor parallel)."
        )


def torch_version_tested(version: str | None = None) -> bool:
    """Whether ``version`` (default: the running torch) is one of :data:`TESTED_TORCH_VERSIONS`."""
    major_minor = ".".join((version or torch.__version__).split("+")[0].split(".")[:2])
    return major_minor in TESTED_TORCH_VERSIONS


def _candidates(
    param_groups: list[dict[str, Any]], handles: list[Any], strategy_name: str
) -> tuple[list[tuple[Any, int, nn.Parameter | None, dict[str, Any]]], set[int]]:
    """``(handle, index, orig_param_or_None, param_group)`` per FSDP-managed parameter, and the other ids."""
    by_flat = {id(h.flat_param): h for h in handles}
    by_orig = {id(p): (h, i) for h in handles for i, p in enumerate(h.flat_param._params or [])}
    seen: set[tuple[int, int]] = set()
    found: list[tuple[Any, int, nn.Parameter | None, dict[str, Any]]] = []
    leftovers: set[int] = set()
    for group in param_groups:
        for param in group["params"]:
            if id(param) in by_flat:
                handle = by_flat[id(param)]
                pairs = [(handle, i, None) for i in range(handle.flat_param._num_params)]
            elif id(param) in by_orig:
                handle, index = by_orig[id(param)]
                pairs = [(handle, index, param)]
            elif getattr(param, "_fsdp_flattened", False) or getattr(param, "_is_flat_param", False):
                raise UnsupportedGradientLayoutError(
                    f"GradientCentralization found an FSDP-flattened parameter of shape {tuple(param.shape)} under"
                    f" {strategy_name} that belongs to no FSDP module it can see: pass the FSDP-wrapped model."
                )
            else:
                leftovers.add(id(param))
                continue
            for handle, index, orig in pairs:
                if (id(handle), index) not in seen:
                    seen.add((id(handle), index))
                    found.append((handle, index, orig, group))
    return found, leftovers


def _target(handle: Any, index: int, orig: nn.Parameter | None, name: str, rows: FlatRows, decay: float) -> _FSDPTarget:
    """Locate this rank's piece of parameter ``index`` of ``handle`` and the rows shard boundaries cut."""
    flat_param = handle.flat_param
    start = _unsharded_offset(flat_param, index)
    replicated = _replicated(handle)
    shards, rank = (1, 0) if replicated else (handle.world_size, handle.rank)
    shard_numel = flat_param._sharded_size.numel()
    boundaries = [k * shard_numel - start for k in range(1, shards)]
    lo = max(start, rank * shard_numel) - start
    hi = min(start + rows.numel, (rank + 1) * shard_numel) - start
    info = flat_param._shard_param_infos[index]
    expected = (
        (True, lo + start - rank * shard_numel, hi - lo, lo, hi - 1) if lo < hi else (False, None, None, None, None)
    )
    if tuple(info) != expected:
        raise UnsupportedGradientLayoutError(
            f"GradientCentralization: FSDP's shard metadata for `{name}` ({tuple(info)}) differs from the layout"
            f" derived from it ({expected}) with torch {torch.__version__}; exact GC under FSDP1 is verified on torch"
            f" {', '.join(TESTED_TORCH_VERSIONS)}."
        )
    piece = RowSlice(rows, lo, hi, handle.device) if lo < hi else None
    offset = info.offset_in_shard if piece is not None else 0
    return _FSDPTarget(name, rows, decay, piece, rows.cut_rows(boundaries), handle=handle, orig=orig, offset=offset)


def _unsharded_offset(flat_param: Any, index: int) -> int:
    """Where parameter ``index`` starts in the unsharded flat parameter (alignment padding included)."""
    offset, seen = 0, -1
    for numel, is_padding in zip(flat_param._numels_with_padding, flat_param._is_padding_mask):
        if not is_padding:
            seen += 1
            if seen == index:
                return offset
        offset += numel
    raise IndexError(index)


def _replicated(handle: Any) -> bool:
    return not handle.uses_sharded_strategy or handle.world_size == 1


def _dense_plan(
    optimizer: Optimizer | None, module: nn.Module, config: GCConfig, leftovers: set[int], strategy_name: str
) -> GCPlan | None:
    """Parameters FSDP does not manage (``ignored_states``) keep their full gradients: dense GC."""
    if not leftovers:
        return None
    # the FSDP plan warns about the selection as a whole
    selection = select(module, config, optimizer, only=leftovers)
    return GCPlan(
        selection.targets, config.mode, warn=lambda message: None, strategy_name=strategy_name, selection=selection
    )
