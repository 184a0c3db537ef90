"""What GC did to the gradients, in numbers that are cheap to get and mean the same on every rank."""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # diagnostics stay importable without Lightning's trainer machinery loaded
    import lightning.pytorch as pl


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
    _host_sums: tuple[float, float] | None = field(default=None, init=False, repr=False, compare=False)

    @staticmethod
    def from_host_sums(tensors: int, elements: int, grad_sq: float, removed_sq: float) -> GCStats:
        """Stats whose squared norms are host floats (the CPU kernel's own sums); tensors made only if read.

        Example:
            >>> stats = GCStats.from_host_sums(tensors=1, elements=4, grad_sq=4.0, removed_sq=1.0)
            >>> stats.norms()
            (2.0, 0.5)
            >>> stats.removed_norm_ratio
            tensor(0.5000)
        """
        return _HostSums(tensors, elements, grad_sq, removed_sq)

    def norms(self) -> tuple[float, float] | None:
        """``(grad_norm, removed_norm_ratio)`` as floats, with at most one host synchronisation; ``None`` if not measured.

        Example:
            >>> GCStats(tensors=1, elements=4, grad_sq=torch.tensor(4.0), removed_sq=torch.tensor(1.0)).norms()
            (2.0, 0.5)
        """
        if self._host_sums is not None:
            grad_sq, removed_sq = self._host_sums
        elif self.grad_sq is None or self.removed_sq is None:
            return None
        else:
            if _capturing(self.grad_sq.device):
                raise RuntimeError(
                    "GradientCentralization(log_diagnostics=True) cannot log inside a CUDA graph capture: reading the"
                    " norms needs a host synchronisation, which capture forbids. Pass log_diagnostics=False (or"
                    " compute_stats=False) for captured steps; GC itself is captured and replayed."
                )
            grad_sq, removed_sq = torch.stack([self.grad_sq.float(), self.removed_sq.float()]).tolist()
        return math.sqrt(grad_sq), math.sqrt(removed_sq / max(grad_sq, _TINY))

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


class _HostSums(GCStats):
    """:class:`GCStats` whose squared norms the CPU kernel summed on the host, as floats.

    Their 0-dim tensors are made on first read: making two costs 50-75 us right after backward (the
    allocator's and dispatcher's code and data out of cache), as much as GC itself on a small model, and
    the callback's writer reads only the floats (:meth:`norms`).
    """

    def __init__(self, tensors: int, elements: int, grad_sq: float, removed_sq: float) -> None:
        self.tensors, self.elements, self.skipped = tensors, elements, False
        self._host_sums = (grad_sq, removed_sq)
        self._tensors: list[Tensor | None] | None = None

    @property
    def grad_sq(self) -> Tensor | None:
        return self._as_tensors()[0]

    @grad_sq.setter
    def grad_sq(self, value: Tensor | None) -> None:
        self._as_tensors()[0] = value
        self._host_sums = None  # the floats no longer describe what was set

    @property
    def removed_sq(self) -> Tensor | None:
        return self._as_tensors()[1]

    @removed_sq.setter
    def removed_sq(self, value: Tensor | None) -> None:
        self._as_tensors()[1] = value
        self._host_sums = None

    def _as_tensors(self) -> list[Tensor | None]:
        if self._tensors is None:
            grad_sq, removed_sq = self._host_sums  # type: ignore[misc]  # set until a tensor is
            self._tensors = [torch.tensor(grad_sq, dtype=torch.float32), torch.tensor(removed_sq, dtype=torch.float32)]
        return self._tensors


class DiagnosticsWriter:
    """Writes GC's diagnostics straight to a trainer's loggers, as Lightning's ``LearningRateMonitor`` does.

    Going through ``LightningModule.log`` costs Lightning's result-collection bookkeeping per metric
    (milliseconds on a logging step); a logger's ``log_metrics`` call costs what the logger itself does.
    The tensor and element counts, which change only with the plan or the set of gradients present, are
    written when they change (and first for each set of loggers); the two norms are computed on the device
    and read back together: one host synchronisation per logging step. The values also land in
    ``trainer.logged_metrics``, as logged metrics do. A ``TensorBoardLogger`` gets the step's values as one
    event (:class:`TensorBoardScalars`), the others through their ``log_metrics``.

    Example:
        >>> writer = DiagnosticsWriter()
        >>> stats = GCStats(tensors=1, elements=4, grad_sq=torch.tensor(4.0), removed_sq=torch.tensor(1.0))
        >>> writer.metrics(stats, "gc/", loggers_key=())
        {'gc/centralized_tensors': 1.0, 'gc/centralized_elements': 4.0, 'gc/grad_norm': 2.0, 'gc/removed_norm_ratio': 0.5}
        >>> writer.metrics(stats, "gc/", loggers_key=())  # the counts did not change
        {'gc/grad_norm': 2.0, 'gc/removed_norm_ratio': 0.5}
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, tuple[int, ...]], tuple[int, int]] = {}
        self._pending: dict[str, GCStats] = {}
        self._names: dict[str, tuple[str, str, str, str]] = {}  # by prefix: made once, read every logging step
        # by id(logger), with a weak reference to tell a reused id: the logger's one-event writer, if any
        self._scalars: dict[int, tuple[weakref.ref[Any], TensorBoardScalars | None]] = {}

    def flush(self, trainer: pl.Trainer) -> None:
        """Write the stats :meth:`write` held back, once ``trainer`` logs again (call at each batch's end)."""
        if self._pending and not _accumulating(trainer):
            pending, self._pending = self._pending, {}
            for prefix, stats in pending.items():
                self.write(trainer, stats, prefix)

    def flush_events(self) -> None:
        """Hand TensorBoard every event still waiting (see :class:`TensorBoardScalars`)."""
        for _, scalars in self._scalars.values():
            if scalars is not None:
                scalars.flush()

    def metrics(self, stats: GCStats, prefix: str, loggers_key: tuple[int, ...]) -> dict[str, float]:
        """The values to write for ``stats``: the counts when they changed for these loggers, the norms if measured."""
        out: dict[str, float] = {}
        names = self._names.get(prefix) or self._names.setdefault(prefix, _metric_names(prefix))
        counts = (stats.tensors, stats.elements)
        if self._counts.get((prefix, loggers_key)) != counts:
            self._counts[(prefix, loggers_key)] = counts
            out[names[0]], out[names[1]] = float(stats.tensors), float(stats.elements)
        norms = stats.norms()  # the step's one host synchronisation, for both values
        if norms is not None:
            out[names[2]], out[names[3]] = norms
        return out

    def write(self, trainer: pl.Trainer, stats: GCStats, prefix: str = "gc/") -> dict[str, float]:
        """Write ``stats`` to every logger of ``trainer`` at the current step; return what was written.

        On a batch Lightning accumulates (a strategy stepping inside the window, as DeepSpeed does), Lightning
        logs nothing until the window's last batch: the stats wait for :meth:`flush` there, as logged metrics do.
        """
        if _accumulating(trainer):
            self._pending[prefix] = stats
            return {}
        loggers = trainer.loggers
        metrics = self.metrics(stats, prefix, tuple(map(id, loggers)))
        if not metrics:
            return metrics
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning logs this batch's metrics at
        for logger in loggers:
            seen = self._scalars.get(id(logger))
            if seen is None or seen[0]() is not logger:
                seen = self._scalars[id(logger)] = (weakref.ref(logger), TensorBoardScalars.of(logger))
            if seen[1] is not None:
                seen[1].write(metrics, step)
            else:
                logger.log_metrics(metrics, step=step)
        trainer._logger_connector._logged_metrics.update(metrics)  # type: ignore[arg-type]  # floats, as after convert_tensors_to_scalars
        return metrics


_TINY = torch.finfo(torch.float32).tiny


def _metric_names(prefix: str) -> tuple[str, str, str, str]:
    names = ("centralized_tensors", "centralized_elements", "grad_norm", "removed_norm_ratio")
    return tuple(prefix + name for name in names)  # type: ignore[return-value]


BATCH_STEPS = 8
"""Logging steps whose TensorBoard events :class:`TensorBoardScalars` hands over together: fewer than the
10 events TensorBoard's writer queue holds (``SummaryWriter(max_queue=10)``), since a full queue makes the
step wait on the writer thread (16 events at once took 420-530 us of wall clock for 215 us of CPU time)."""


class TensorBoardScalars:
    """Writes a step's scalars as one TensorBoard event, handed to the writer :data:`BATCH_STEPS` steps at a time.

    What ``TensorBoardLogger.log_metrics`` writes (a ``simple_value`` per tag, the logger's prefix, the same
    step and wall time), as one event per step instead of one per scalar, reusing the event object for the
    same tags. Measured right after a backward pass (``benchmarks/template_share.py``), handing TensorBoard
    one event costs 80-100 us (serializing it, then the writer thread's queue), ``log_metrics`` for GC's two
    norms 175 us; eight events handed over together 130-180 us in all. So the events
    wait here for :data:`BATCH_STEPS` logging steps, or until :meth:`flush` (the callback flushes at each
    epoch's end, at validation and when training stops): TensorBoard's own writer holds events in memory
    for up to its ``flush_secs`` (120 s by default) before they reach the file. Only for Lightning's own
    ``TensorBoardLogger`` (subclasses may log differently) on the rank that writes; any other logger gets
    each step's values through its ``log_metrics`` at once.

    Args:
        summary_writer: the logger's ``torch.utils.tensorboard.SummaryWriter``.
        prefix: the logger's prefix with its join character, or ``""``.
    """

    def __init__(self, summary_writer: Any, prefix: str) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._summary_writer = summary_writer
        self._prefix = prefix
        self._event_class, self._summary_class = Event, Summary
        self._events: dict[tuple[str, ...], Any] = {}
        self._waiting: list[tuple[tuple[str, ...], tuple[float, ...], int, float]] = []

    @classmethod
    def of(cls, logger: object) -> TensorBoardScalars | None:
        """The writer for ``logger`` if it is a ``TensorBoardLogger`` writing through ``torch.utils.tensorboard``."""
        from lightning.pytorch.loggers import TensorBoardLogger
        from lightning_utilities.core.rank_zero import rank_zero_only

        if type(logger) is not TensorBoardLogger or getattr(rank_zero_only, "rank", 0) != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboardX only: its own writer
            return None
        experiment = logger.experiment
        if not isinstance(experiment, SummaryWriter):
            return None
        prefix = f"{logger._prefix}{logger.LOGGER_JOIN_CHAR}" if logger._prefix else ""
        return cls(experiment, prefix)

    def write(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step`` (with the wall time now) as one event; hand over a full batch."""
        self._waiting.append((tuple(metrics), tuple(metrics.values()), step, time.time()))
        if len(self._waiting) >= BATCH_STEPS:
            self.flush()

    def flush(self) -> None:
        """Hand every waiting event to TensorBoard's writer."""
        waiting, self._waiting = self._waiting, []
        if not waiting:
            return
        # asked for on every flush, as `add_scalar` does: a closed writer (a finished fit) is reopened
        file_writer = self._summary_writer._get_file_writer()
        for tags, numbers, step, wall_time in waiting:
            event = self._events.get(tags)
            if event is None:
                values = [self._summary_class.Value(tag=self._prefix + tag) for tag in tags]
                event = self._events[tags] = self._event_class(summary=self._summary_class(value=values))
            for value, number in zip(event.summary.value, numbers):
                value.simple_value = number
            file_writer.add_event(event, step, wall_time)


def _accumulating(trainer: pl.Trainer) -> bool:
    """Whether Lightning holds this batch's logged metrics back (it logs at the end of accumulation windows).

    Only a strategy that accumulates itself (DeepSpeed) steps inside a window; elsewhere the optimizer steps,
    and GC's diagnostics are written, on a window's last batch only, so the loop need not be asked.
    """
    if not trainer.strategy.handles_gradient_accumulation:
        return False
    return bool(trainer.fit_loop._should_accumulate() and trainer.lightning_module.automatic_optimization)


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream (never on CPU-only builds)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
