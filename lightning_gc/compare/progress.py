"""Progress over a whole comparison: which run, how far it is, how far the comparison is, time left."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from lightning_gc.compare.summary import DIVERGED, FAILED, RunRecord


class Progress:
    """Prints one line per event of a comparison of ``total`` runs.

    On a terminal the line of the running run is rewritten in place (epoch, step, overall percentage, time
    left); elsewhere (a log, CI) a line is printed at the start of each run, at each new epoch and at the end.

    Args:
        total: how many runs the comparison has.
        stream: where to write; ``sys.stdout`` by default.
        tty: force terminal (``True``) or line (``False``) output; default: ``stream.isatty()``.

    Example:
        >>> import io
        >>> p = Progress(2, stream=io.StringIO(), tty=False)
        >>> p.start(1, "baseline", 0)
        >>> p.update({"epoch": 0, "max_epochs": 2, "step": 5, "total_steps": 10})
        >>> p.fraction
        0.25
    """

    def __init__(self, total: int, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.done = 0
        self._run_fraction = 0.0
        self._label = ""
        self._epoch: int | None = None
        self._started = time.monotonic()
        self._run_seconds: list[float] = []

    @property
    def fraction(self) -> float:
        """The share of the comparison done: finished runs plus the running run's share."""
        return (self.done + self._run_fraction) / max(self.total, 1)

    def start(self, index: int, arm: str, seed: int) -> None:
        """Run ``index`` (1-based) of ``total`` begins."""
        self._label = f"[{index}/{self.total}] {arm} seed_{seed}"
        self._run_fraction, self._epoch = 0.0, None
        self._line(f"{self._label}: starting", final=not self.tty)

    def update(self, status: dict[str, Any]) -> None:
        """The running run reported ``status`` (see :class:`~lightning_gc.compare.monitor.RunMonitor`)."""
        epoch, max_epochs = status.get("epoch"), status.get("max_epochs")
        step, total_steps = status.get("step"), status.get("total_steps")
        if total_steps and step is not None:
            self._run_fraction = min(step / total_steps, 1.0)
        elif max_epochs and max_epochs > 0 and epoch is not None:
            self._run_fraction = min(epoch / max_epochs, 1.0)
        limit = max_epochs if max_epochs and max_epochs > 0 else None
        # `epoch` is 0-based and reaches `max_epochs` once the last epoch is over
        shown = "?" if epoch is None else epoch + 1 if limit is None else min(epoch + 1, limit)
        where = f"epoch {shown}/{limit or '?'}"
        if step is not None:
            where += f", step {step}" + (f"/{total_steps}" if total_steps else "")
        text = f"{self._label}: {where} | comparison {self.fraction:.0%}{self._eta()}"
        if self.tty:
            self._line(text, final=False)
        elif epoch != self._epoch:
            self._line(text, final=True)
        self._epoch = epoch

    def finish(self, record: RunRecord, log_shown: str) -> None:
        """The running run ended as ``record`` says."""
        self.done += 1
        self._run_fraction = 0.0
        self._run_seconds.append(record.seconds)
        if record.status == DIVERGED:
            outcome = f"DIVERGED at step {record.diverged_at_step} (non-finite loss), stopped early"
        elif record.status == FAILED:
            outcome = f"FAILED (exit code {record.returncode}), see {log_shown}; continuing"
        else:
            outcome = "finished"
        self._line(
            f"{self._label}: {outcome} in {record.seconds:.0f} s | comparison {self.fraction:.0%}{self._eta()}",
            final=True,
        )

    def skip(self, index: int, record: RunRecord) -> None:
        """Run ``index`` is already done (``--resume``)."""
        self.done += 1
        self._line(
            f"[{index}/{self.total}] {record.arm} seed_{record.seed}: {record.status} earlier, skipped (--resume)",
            final=True,
        )

    def _eta(self) -> str:
        elapsed = time.monotonic() - self._started
        if not self._run_seconds:
            return f" | {_clock(elapsed)} elapsed"
        remaining = (self.total - self.fraction * self.total) * (sum(self._run_seconds) / len(self._run_seconds))
        return f" | {_clock(elapsed)} elapsed, ~{_clock(remaining)} left"

    def _line(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
