"""DeepSpeed ZeRO stages 1 and 2: exact GC from the partitioned gradients, without gathering them.

ZeRO-1/2 flatten each parameter group and give each data-parallel rank one contiguous partition of it;
``p.grad`` is ``None`` at the hook. DeepSpeed links every parameter to the piece of it this rank owns
(``p._hp_mapping``: the gradient fragment, its range inside the flattened parameter, and the fp32 master
fragment). Those pieces go through :mod:`~lightning_gc.sharding.row_reduce`: partial sums of the rows
that partition boundaries cut travel in one all-reduce per data-parallel group per step, and each rank
subtracts exact row means from its fragment in place, which is what the optimizer then reads. The
fragment ranges of all ranks are exchanged once, when the plan is built.

With gradient accumulation DeepSpeed, not Lightning, accumulates: the hook runs after every micro-batch,
and GC applies only at the accumulation boundary (GC of a partial sum plus later gradients is not GC of
the sum). ZeRO-3 partitions parameters too and is refused at ``setup``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_gc.config import GCConfig
from lightning_gc.diagnostics import GCStats
from lightning_gc.plan import _decay_for_group, _warn_about_selection
from lightning_gc.selection import Owner
from lightning_gc.sharding.flat_rows import FlatRows, RowSlice
from lightning_gc.sharding.guard import UnsupportedGradientLayoutError
from lightning_gc.sharding.row_reduce import PieceTarget, ReduceGroup, accumulation_dtype

Warn = Callable[[str], None]
SUPPORTED_ZERO_STAGES: tuple[int, ...] = (1, 2)


def zero_stage(strategy: Any) -> int:
    """The ZeRO stage in a ``DeepSpeedStrategy``'s config (0 when none is set)."""
    config = getattr(strategy, "config", None) or {}
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def check_zero_stage(strategy: Any) -> None:
    """Raise unless ``strategy`` runs a ZeRO stage GC is exact under.

    Raises:
        UnsupportedGradientLayoutError: for ZeRO-3 and for stage 0, saying what to use instead.
    """
    stage = zero_stage(strategy)
    if stage in SUPPORTED_ZERO_STAGES:
        return
    name = type(strategy).__name__
    if stage == 3:
        raise UnsupportedGradientLayoutError(
            f"GradientCentralization does not support DeepSpeed ZeRO stage 3 ({name}): it partitions parameters"
            " and gradients per parameter, and lightning-gc has no exact route there that does not gather every"
            " gradient. Use DeepSpeed ZeRO stage 1 or 2 (`strategy='deepspeed_stage_2'`), FSDPStrategy"
            " (FULL_SHARD shards parameters like ZeRO-3), or ModelParallelStrategy (FSDP2): GC is exact under those."
        )
    raise UnsupportedGradientLayoutError(
        f"GradientCentralization supports DeepSpeed ZeRO stages {SUPPORTED_ZERO_STAGES} ({name} runs stage {stage}):"
        " use `strategy='deepspeed_stage_1'` or `'deepspeed_stage_2'`, or plain data parallel (`strategy='ddp'`)."
    )


@dataclass(frozen=True)
class DeepSpeedAdapter:
    """Plans exact GC over ZeRO-1/2 gradient partitions.

    Args:
        strategy_name: named in errors.
        engine: returns the ``DeepSpeedEngine`` (Lightning: ``strategy.model``) once it exists.
    """

    strategy_name: str = "DeepSpeedStrategy"
    engine: Callable[[], Any] = field(default=lambda: None)

    def build_plan(self, optimizer: Optimizer, module: nn.Module, config: GCConfig, warn: Warn) -> ZeroPlan:
        engine = self.engine()
        if engine is None or not hasattr(engine, "is_gradient_accumulation_boundary"):
            raise UnsupportedGradientLayoutError(
                f"GradientCentralization found no DeepSpeed engine under {self.strategy_name} at the optimizer step."
            )
        return ZeroPlan.for_engine(engine, module, config, warn, self.strategy_name)


@dataclass
class _ZeroTarget(PieceTarget):
    """A weight in a ZeRO-1/2 partition: its piece is the gradient fragment DeepSpeed maps it to."""

    param: nn.Parameter | None = None

    def counts(self) -> bool:
        return True

    def grad(self) -> Tensor | None:
        mapping = getattr(self.param, "_hp_mapping", None)
        if self.piece is None or mapping is None:
            return None
        fragment = mapping.get_lp_grad_fragment(self.param._index_in_param_group)  # type: ignore[union-attr]
        flat = fragment.view(-1)
        if flat.numel() != self.piece.numel:  # the whole parameter's gradient kept on every rank (bf16 optimizer)
            flat = flat.narrow(0, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)
        return flat

    def weight(self) -> Tensor | None:
        mapping = getattr(self.param, "_hp_mapping", None)
        return None if self.piece is None or mapping is None else mapping.hp_fragment.detach().view(-1)


class ZeroPlan:
    """GC for the ZeRO optimizer of one ``DeepSpeedEngine``; call :meth:`apply` on every rank."""

    def __init__(self, engine: Any, groups: list[ReduceGroup]) -> None:
        self.engine = engine
        self.groups = groups

    @property
    def targets(self) -> list[PieceTarget]:
        """Every parameter GC applies to."""
        return [t for g in self.groups for t in g.targets]

    @classmethod
    def for_engine(
        cls, engine: Any, module: nn.Module, config: GCConfig, warn: Warn, strategy_name: str = ""
    ) -> ZeroPlan:
        """Plan for the parameters of ``engine``'s ZeRO optimizer (owners looked up in ``module``).

        Collective: exchanges every rank's fragment ranges once.

        Raises:
            UnsupportedGradientLayoutError: when the engine's optimizer is not a ZeRO-1/2 optimizer.
        """
        zero = engine.optimizer
        lp_groups = getattr(zero, "bit16_groups", None)
        if lp_groups is None:
            raise UnsupportedGradientLayoutError(
                f"GradientCentralization needs DeepSpeed's ZeRO stage 1/2 optimizer under {strategy_name}, got"
                f" {type(zero).__name__}."
            )
        owners = _named_owners(module)
        selector = config.selector()
        names, chosen = [], []
        for index, params in enumerate(lp_groups):
            base_group = zero.optimizer.param_groups[index]
            decay = _decay_for_group(zero.optimizer, base_group, warn) if config.centralize_weight_decay else 0.0
            for param in params:
                name, owner, attr = owners.get(id(param), (f"param_{len(names)}", None, ""))
                names.append(name)
                layout = selector.layout_for(Owner(name, owner, attr), param.ndim)
                if layout is not None and param.requires_grad:
                    chosen.append(
                        (
                            param,
                            name,
                            FlatRows(tuple(param.shape), tuple(param.stride()), layout, config.mode),
                            decay,
                            index,
                        )
                    )
        selector.track_names(names)
        _warn_about_selection(selector, chosen, f"DeepSpeed {type(zero.optimizer).__name__} optimizer", warn)  # type: ignore[arg-type]
        groups: dict[int, ReduceGroup] = {}
        for param, name, rows, decay, index in chosen:
            group = zero.real_dp_process_group[index]
            if id(group) not in groups:
                groups[id(group)] = ReduceGroup(group, param.device, accumulation_dtype(param.dtype))
            groups[id(group)].targets.append(_ZeroTarget(name, rows, decay, None, [], param=param))
        for group in groups.values():
            _locate_fragments(group, strategy_name)
            group.assign_slots()
        return cls(engine, list(groups.values()))

    def apply(self, compute_stats: bool = False, grad_scale: float = 1.0) -> GCStats:
        """Centralize this rank's gradient fragments in place, at accumulation boundaries only.

        Elsewhere it returns ``GCStats(skipped=True)``: the gradients are a partial sum, GC waits for the boundary.

        Args:
            compute_stats: also measure the gradient norm and what GC removed, over all ranks' fragments.
            grad_scale: a loss scale the trainer leaves in the gradients; DeepSpeed's own fp16 loss scale
                is read from the optimizer and accounted for too.
        """
        if not self.engine.is_gradient_accumulation_boundary():
            return GCStats(skipped=True)
        scale = grad_scale * float(getattr(self.engine.optimizer, "loss_scale", 1.0) or 1.0)
        stats = GCStats(tensors=len(self.targets), elements=sum(t.rows.numel for t in self.targets))
        parts = [p for p in (g.apply(compute_stats, scale) for g in self.groups) if p is not None]
        if compute_stats and parts:
            stats.grad_sq = sum(p[0].float().cpu() for p in parts) / scale**2  # type: ignore[assignment]
            stats.removed_sq = sum(p[1].float().cpu() for p in parts) / scale**2  # type: ignore[assignment]
        return stats

    def bytes_per_step(self, compute_stats: bool = False) -> int:
        """Bytes each rank contributes to this plan's all-reduces per optimizer step."""
        return sum(g.buffer_numel(compute_stats) * torch.finfo(g.dtype).bits // 8 for g in self.groups)


def _locate_fragments(group: ReduceGroup, strategy_name: str) -> None:
    """Exchange every rank's fragment ranges; set each target's piece and the rows boundaries cut."""
    mine = []
    for target in group.targets:
        mapping = getattr(target.param, "_hp_mapping", None)  # type: ignore[attr-defined]
        address = None if mapping is None else mapping.lp_fragment_address
        mine.append(None if address is None or address.numel == 0 else (int(address.start), int(address.numel)))
    everyone: list[list[tuple[int, int] | None]] = [[] for _ in range(dist.get_world_size(group.process_group))]
    dist.all_gather_object(everyone, mine, group=group.process_group)
    for k, target in enumerate(group.targets):
        ranges = sorted(r[k] for r in everyone if r[k] is not None)  # type: ignore[type-var]
        covered = 0
        for start, numel in ranges:
            if start != covered:
                raise UnsupportedGradientLayoutError(
                    f"GradientCentralization: DeepSpeed's gradient fragments of `{target.name}` under {strategy_name}"
                    f" do not tile it ({ranges} for {target.rows.numel} entries)."
                )
            covered += numel
        if covered != target.rows.numel:
            raise UnsupportedGradientLayoutError(
                f"GradientCentralization: DeepSpeed's gradient fragments of `{target.name}` under {strategy_name}"
                f" cover {covered} of its {target.rows.numel} entries."
            )
        target.cut_rows = target.rows.cut_rows(start for start, _ in ranges)
        if mine[k] is not None:
            start, numel = mine[k]  # type: ignore[misc]
            target.piece = RowSlice(target.rows, start, start + numel, group.device)


def _named_owners(module: nn.Module) -> dict[int, tuple[str, nn.Module, str]]:
    """``id(param) -> (qualified name, owning module, attribute)``, first owner wins."""
    owners: dict[int, tuple[str, nn.Module, str]] = {}
    for module_name, sub in module.named_modules(remove_duplicate=False):
        for attr, param in sub.named_parameters(recurse=False):
            owners.setdefault(id(param), (f"{module_name}.{attr}" if module_name else attr, sub, attr))
    return owners
