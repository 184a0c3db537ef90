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
from typing import Any, ClassVar

import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_gc.config import GCConfig
from lightning_gc.diagnostics import GCStats
from lightning_gc.errors import UnsupportedGradientLayoutError
from lightning_gc.errors import warn as warn_user
from lightning_gc.selection import Choice, Owner, Selection, Selector, owners_of, warn_about_selection
from lightning_gc.sharding.flat_rows import FlatRows, RowSlice
from lightning_gc.sharding.row_reduce import PieceShardPlan, PieceTarget, ReduceGroup, row_sum_dtype
from lightning_gc.weight_decay import decay_for_group

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
    dense: ClassVar[bool] = False

    def build_plan(
        self,
        config: GCConfig,
        *,
        optimizer: Optimizer | None = None,
        module: nn.Module | None = None,
        params: list[nn.Parameter] | None = None,
        warn: Warn = warn_user,
    ) -> ZeroPlan:
        engine = self.engine()
        if engine is None or not hasattr(engine, "is_gradient_accumulation_boundary"):
            raise UnsupportedGradientLayoutError(
                f"GradientCentralization found no DeepSpeed engine under {self.strategy_name} at the optimizer step."
            )
        return ZeroPlan.for_engine(engine, module if module is not None else engine, config, warn, self.strategy_name)


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
        return flat  # type: ignore[no-any-return]  # DeepSpeed is untyped

    def weight(self) -> Tensor | None:
        mapping = getattr(self.param, "_hp_mapping", None)
        return None if self.piece is None or mapping is None else mapping.hp_fragment.detach().view(-1)


class ZeroPlan(PieceShardPlan):
    """GC for the ZeRO optimizer of one ``DeepSpeedEngine``; call :meth:`apply` on every rank."""

    def __init__(self, engine: Any, groups: list[ReduceGroup], selection: Selection | None = None) -> None:
        super().__init__(groups, selection)
        self.engine = engine

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
        owners = owners_of(module)
        selector = Selector.of(config)
        choices: list[Choice] = []
        chosen = []
        for index, params in enumerate(lp_groups):
            base_group = zero.optimizer.param_groups[index]
            decay = decay_for_group(zero.optimizer, base_group, warn) if config.centralize_weight_decay else 0.0
            for param in params:
                owner = owners.get(param) or Owner(f"param_{len(choices)}")
                choice = selector.decide(owner, param.shape, param.requires_grad)
                choices.append(choice)
                if choice.selected and choice.layout is not None:
                    rows = FlatRows(tuple(param.shape), tuple(param.stride()), choice.layout, config.mode)
                    chosen.append((param, choice.name, rows, decay, index))
        names = [c.name for c in choices]
        selection = Selection([], choices, selector.unmatched_patterns(names), selector.unmatched_modules(module))
        warn_about_selection(selection, f"DeepSpeed {type(zero.optimizer).__name__} optimizer", warn)
        groups: dict[int, ReduceGroup] = {}
        for param, name, rows, decay, index in chosen:
            group = zero.real_dp_process_group[index]
            if id(group) not in groups:
                groups[id(group)] = ReduceGroup(group, param.device, row_sum_dtype(param.dtype))
            groups[id(group)].targets.append(_ZeroTarget(name, rows, decay, None, [], param=param))
        for group in groups.values():
            _locate_fragments(group, strategy_name)
            group.assign_slots()
        return cls(engine, list(groups.values()), selection)

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
        parts = [g.apply(compute_stats, scale) for g in self.groups]
        return self.with_totals(stats, parts, compute_stats, scale)


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
        ranges = sorted(r for rank in everyone if (r := rank[k]) is not None)
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
        local = mine[k]
        if local is not None:
            start, numel = local
            target.piece = RowSlice(target.rows, start, start + numel, group.device)
