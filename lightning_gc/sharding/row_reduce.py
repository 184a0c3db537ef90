"""Exact GC over pieces of flattened weights spread across ranks: one all-reduce of cut rows per group.

Each rank holds contiguous pieces of some weights (FSDP1 flat shards, DeepSpeed ZeRO partitions). A
:class:`PieceTarget` is one weight: its :class:`~lightning_gc.sharding.flat_rows.FlatRows`, the
:class:`~lightning_gc.sharding.flat_rows.RowSlice` this rank holds, and the rows that *any* rank boundary
cuts (the same list on every rank). A :class:`ReduceGroup` centralizes the targets that share a process
group: each rank sums its pieces per row; the partial sums of cut rows (and of the weights, for
decay compensation; and two scalars for the diagnostics) go into one buffer, all-reduced once; each rank
then subtracts exact row means from its pieces. Rows held whole by one rank never travel, and row sizes
are static, so no counts travel either. The buffer's layout depends only on global metadata, so every
rank issues the same collective even where it holds no piece of some weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gc.sharding.flat_rows import FlatRows, RowSlice

if TYPE_CHECKING:
    from lightning_gc.diagnostics import GCStats
    from lightning_gc.selection import Selection


def _no_slots() -> Tensor:
    return torch.zeros(0, dtype=torch.long)


@dataclass
class PieceTarget:
    """One centralized weight: its rows, the piece this rank holds, and the rows rank boundaries cut.

    Subclasses say where this rank's gradient and weight pieces live (:meth:`grad`, :meth:`weight`).

    Args:
        name: the parameter's qualified name.
        rows: its row geometry.
        decay: coupled weight-decay coefficient to compensate (0.0: none).
        piece: the flat range this rank holds, or None.
        cut_rows: rows with entries on more than one rank, sorted; identical on every rank.
    """

    name: str
    rows: FlatRows
    decay: float
    piece: RowSlice | None
    cut_rows: list[int]
    grad_slots: Tensor = field(default_factory=_no_slots)
    weight_slots: Tensor = field(default_factory=_no_slots)
    local_cut: Tensor = field(default_factory=_no_slots)  # the cut rows this rank touches, as local rows

    def grad(self) -> Tensor | None:
        """This rank's piece of the gradient, 1-D and writable in place, or None."""
        raise NotImplementedError

    def weight(self) -> Tensor | None:
        """This rank's piece of the weight, 1-D, or None."""
        raise NotImplementedError

    def counts(self) -> bool:
        """Whether the weight has a gradient this step (the same answer on every rank)."""
        raise NotImplementedError


@dataclass
class ReduceGroup:
    """Targets sharing one process group: at most one all-reduce per step for all of them.

    Args:
        process_group: the group whose ranks hold the pieces (``None``: the default group).
        device: where the reduced buffer lives (the communication device).
        dtype: accumulation dtype of row sums.
        replicated: every rank holds every entry, so nothing is reduced.
    """

    process_group: Any
    device: torch.device
    dtype: torch.dtype
    replicated: bool = False
    targets: list[PieceTarget] = field(default_factory=list)
    grad_slots: int = 0
    weight_slots: int = 0
    slot_row_numel: Tensor | None = None

    def assign_slots(self) -> None:
        """Give every cut row of every target a position in the buffer (same on every rank); call once."""
        row_numels: list[int] = []
        for target in self.targets:
            target.grad_slots = torch.arange(self.grad_slots, self.grad_slots + len(target.cut_rows))
            self.grad_slots += len(target.cut_rows)
            row_numels += [target.rows.row_numel] * len(target.cut_rows)
        for target in self.targets:
            if target.decay:
                target.weight_slots = self.grad_slots + torch.arange(
                    self.weight_slots, self.weight_slots + len(target.cut_rows)
                )
                self.weight_slots += len(target.cut_rows)
        self.slot_row_numel = torch.tensor(row_numels, dtype=self.dtype, device=self.device)
        for target in self.targets:
            _localize_slots(target, self.device)

    def buffer_numel(self, compute_stats: bool) -> int:
        """Entries all-reduced per step: partial sums of cut rows, plus two scalars for the diagnostics."""
        if self.replicated:
            return 0
        return self.grad_slots + self.weight_slots + (2 if compute_stats else 0)

    def apply(self, compute_stats: bool, grad_scale: float) -> tuple[Tensor, Tensor] | None:
        """Centralize this group's pieces; return the group-global ``(grad_sq, removed_sq)`` if asked.

        ``grad_scale`` is the loss scale still in the gradients: it scales the decay compensation; the
        returned squares are *not* unscaled.
        """
        live = [(t, g) for t in self.targets if t.piece is not None and (g := t.grad()) is not None]
        sums = [t.piece.sums(g, self.dtype) for t, g in live]  # type: ignore[union-attr]  # narrowed just above
        weight_sums = {
            id(t): t.piece.sums(w, self.dtype)
            for t in self.targets
            if t.decay and t.piece is not None and (w := t.weight()) is not None
        }
        grad_sq = removed_local = None
        if compute_stats:
            grad_sq, removed_local = self._local_stats(live, sums)
        reduced = self._all_reduce(live, sums, weight_sums, grad_sq, removed_local)
        for (target, grad), row_sums in zip(live, sums):
            mean = self._global(target, row_sums, target.grad_slots, reduced) / target.rows.row_numel
            if target.decay:
                weight_mean = (
                    self._global(target, weight_sums[id(target)], target.weight_slots, reduced) / target.rows.row_numel
                )
                mean = mean + (target.decay * grad_scale) * weight_mean
            target.piece.subtract_(grad, mean.to(grad.device))  # type: ignore[union-attr]
        if not compute_stats:
            return None
        if reduced is None:
            return grad_sq, removed_local  # type: ignore[return-value]
        cut = reduced[: self.grad_slots]
        removed_cut = (cut.square() / self.slot_row_numel).sum()  # type: ignore[operator]
        return reduced[-2], reduced[-1] + removed_cut

    def _local_stats(self, live: list[tuple[PieceTarget, Tensor]], sums: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Squared norm of this rank's pieces, and what GC removes from the rows only this rank holds."""
        grad_sq = torch.zeros((), dtype=self.dtype, device=self.device)
        removed = torch.zeros((), dtype=self.dtype, device=self.device)
        for (target, grad), row_sums in zip(live, sums):
            grad_sq = grad_sq + torch.linalg.vector_norm(grad, dtype=self.dtype).to(self.device).square()
            cut = row_sums.index_select(0, target.local_cut.to(row_sums.device))
            removed = removed + ((row_sums.square().sum() - cut.square().sum()) / target.rows.row_numel).to(self.device)
        return grad_sq, removed

    def _all_reduce(
        self,
        live: list[tuple[PieceTarget, Tensor]],
        sums: list[Tensor],
        weight_sums: dict[int, Tensor],
        grad_sq: Tensor | None,
        removed_local: Tensor | None,
    ) -> Tensor | None:
        size = self.buffer_numel(grad_sq is not None)
        if size == 0:
            return None
        slots, values = [], []
        for (target, _), row_sums in zip(live, sums):
            slots.append(target.grad_slots)
            values.append(row_sums.index_select(0, target.local_cut.to(row_sums.device)).to(self.device))
        for target in self.targets:
            if id(target) in weight_sums:
                row_sums = weight_sums[id(target)]
                slots.append(target.weight_slots)
                values.append(row_sums.index_select(0, target.local_cut.to(row_sums.device)).to(self.device))
        buffer = torch.zeros(size, dtype=self.dtype, device=self.device)
        if any(s.numel() for s in slots):
            buffer.index_copy_(0, torch.cat(slots), torch.cat(values))
        if grad_sq is not None and removed_local is not None:
            buffer[-2] = grad_sq
            buffer[-1] = removed_local
        dist.all_reduce(buffer, group=self.process_group)
        return buffer

    def _global(self, target: PieceTarget, row_sums: Tensor, slots: Tensor, reduced: Tensor | None) -> Tensor:
        """``row_sums`` with the cut rows' local partial sums replaced by their all-reduced totals."""
        if reduced is None or not slots.numel():
            return row_sums
        return row_sums.index_copy(
            0, target.local_cut.to(row_sums.device), reduced.index_select(0, slots).to(row_sums.device)
        )


def _localize_slots(target: PieceTarget, device: torch.device) -> None:
    """Keep the slots of the cut rows this rank touches, with their local row numbers."""
    if target.piece is None or not target.cut_rows:
        target.grad_slots = target.grad_slots[:0]
        target.weight_slots = target.weight_slots[:0]
        return
    first, count = target.piece.first_row, target.piece.local_rows
    keep = torch.tensor([k for k, row in enumerate(target.cut_rows) if first <= row < first + count], dtype=torch.long)
    target.local_cut = (torch.tensor(target.cut_rows, dtype=torch.long).index_select(0, keep) - first).to(device)
    target.grad_slots = target.grad_slots.index_select(0, keep).to(device)
    if target.decay:
        target.weight_slots = target.weight_slots.index_select(0, keep).to(device)


def row_sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Row sums of ``dtype`` pieces accumulate in float64 for float64, float32 otherwise (they cross ranks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class PieceShardPlan:
    """The base of FSDP1's and ZeRO's plans: reduce groups of pieces, totals identical on every rank.

    Args:
        groups: the reduce groups (one all-reduce each per step at most).
        selection: what the selection decided, for the report.
    """

    def __init__(self, groups: list[ReduceGroup], selection: Selection | None = None) -> None:
        self.groups = groups
        self.selection = selection

    @property
    def targets(self) -> list[PieceTarget]:
        """Every parameter GC applies to through the pieces."""
        return [t for g in self.groups for t in g.targets]

    def bytes_per_step(self, compute_stats: bool = False) -> int:
        """Bytes each rank contributes to this plan's all-reduces per step (0 when nothing is cut)."""
        return sum(g.buffer_numel(compute_stats) * torch.finfo(g.dtype).bits // 8 for g in self.groups)

    @staticmethod
    def with_totals(
        stats: GCStats, parts: list[tuple[Tensor, Tensor] | None], compute_stats: bool, scale: float
    ) -> GCStats:
        """``stats`` with the groups' ``(grad_sq, removed_sq)`` parts summed and unscaled, when measured."""
        present = [p for p in parts if p is not None]
        if compute_stats and present:
            stats.grad_sq = sum(p[0].float().cpu() for p in present) / scale**2  # type: ignore[assignment]
            stats.removed_sq = sum(p[1].float().cpu() for p in present) / scale**2  # type: ignore[assignment]
        return stats
