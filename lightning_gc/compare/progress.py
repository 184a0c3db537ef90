"""Progress over a whole study: runs done, running and left, how far each running run is, and time left."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from lightning_gc.compare.summary import COLLAPSED, DIVERGED, FAILED, RunRecord


class Progress:
    """Prints the events of a study of ``total`` runs, ``parallel`` of which can run at once.

    Each line ends with the whole study's state: ``3 done, 2 running, 7 left | 0:01:10 elapsed, ~0:02:00 left``
    (time left: the runs still to do, the running ones counted by how far they are, times the mean duration of
    the runs finished so far, over how many can run at once). On a terminal the latest run's progress is one
    line rewritten in place; elsewhere (a log, CI) a line is printed per run event and per new epoch.

    Args:
        total: how many runs the study has.
        stream: where to write; ``sys.stdout`` by default.
        tty: force terminal (``True``) or line (``False``) output; default: ``stream.isatty()``.
        parallel: how many runs can run at once.

    Example:
        >>> import io
        >>> p = Progress(4, stream=io.StringIO(), tty=False, parallel=2)
        >>> p.start("baseline seed_0")
        >>> p.update("baseline seed_0", {"epoch": 0, "max_epochs": 2, "step": 5, "total_steps": 10})
        >>> p.fraction
        0.125
    """

    def __init__(self, total: int, stream: TextIO | None = None, tty: bool | None = None, parallel: int = 1) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.parallel = max(1, parallel)
        self.done = 0
        self._running: dict[str, float] = {}  # label -> share of the run done
        self._epochs: dict[str, int | None] = {}
        self._started = time.monotonic()
        self._run_seconds: list[float] = []

    @property
    def fraction(self) -> float:
        """The share of the study done: ended runs plus the running runs' shares."""
        return (self.done + sum(self._running.values())) / max(self.total, 1)

    def start(self, label: str) -> None:
        """The run ``label`` begins (or is submitted)."""
        self._running[label] = 0.0
        self._epochs[label] = None
        self._line(f"{label}: starting", final=not self.tty)

    def attach(self, label: str, job_id: str) -> None:
        """``--resume`` found the run ``label`` still queued or running as SLURM job ``job_id``."""
        self._running[label] = 0.0
        self._line(f"{label}: still queued or running as SLURM job {job_id}, waiting for it (--resume)", final=True)

    def update(self, label: str, status: dict[str, Any]) -> None:
        """The running run ``label`` reported ``status`` (see :class:`~lightning_gc.compare.monitor.RunMonitor`)."""
        if label not in self._running:
            return
        epoch, max_epochs = status.get("epoch"), status.get("max_epochs")
        step, total_steps = status.get("step"), status.get("total_steps")
        if total_steps and step is not None:
            self._running[label] = min(step / total_steps, 1.0)
        elif max_epochs and max_epochs > 0 and epoch is not None:
            self._running[label] = min(epoch / max_epochs, 1.0)
        limit = max_epochs if max_epochs and max_epochs > 0 else None
        # `epoch` is 0-based and reaches `max_epochs` once the last epoch is over
        shown = "?" if epoch is None else epoch + 1 if limit is None else min(epoch + 1, limit)
        where = f"epoch {shown}/{limit or '?'}"
        if step is not None:
            where += f", step {step}" + (f"/{total_steps}" if total_steps else "")
        if self.tty:
            self._line(f"{label}: {where}", final=False)
        elif epoch != self._epochs.get(label):
            self._line(f"{label}: {where}", final=True)
        self._epochs[label] = epoch

    def finish(self, label: str, record: RunRecord, reason: str = "") -> None:
        """The run ``label`` ended as ``record`` says (``reason``: why it could not start)."""
        self._running.pop(label, None)
        self.done += 1
        if record.seconds:
            self._run_seconds.append(record.seconds)
        if record.status == DIVERGED:
            outcome = f"DIVERGED at step {record.diverged_at_step} (non-finite loss), stopped early"
        elif record.status == FAILED:
            code = reason or f"exit code {record.returncode}"
            outcome = f"FAILED ({code}), see {_shown(record.log)}; continuing"
        elif record.status == COLLAPSED:
            outcome = f"collapsed ({record.collapse})"
        else:
            outcome = "finished"
        took = f" in {record.seconds:.0f} s" if record.seconds else ""
        self._line(f"{label}: {outcome}{took}", final=True)

    def skip(self, label: str, record: RunRecord) -> None:
        """The run ``label`` is already done (``--resume``)."""
        self.done += 1
        self._line(f"{label}: {record.status} earlier, skipped (--resume)", final=True)

    def state(self) -> str:
        """The study's state: ``study 42% | 3 done, 2 running, 7 left | 0:01:10 elapsed, ~0:02:00 left``."""
        running = len(self._running)
        left = self.total - self.done - running
        return f"study {self.fraction:.0%} | {self.done} done, {running} running, {left} left | {self._eta()}"

    def _eta(self) -> str:
        elapsed = time.monotonic() - self._started
        if not self._run_seconds:
            return f"{_clock(elapsed)} elapsed"
        mean = sum(self._run_seconds) / len(self._run_seconds)
        at_once = max(1, min(self.parallel, self.total - self.done))
        remaining = (self.total - self.fraction * self.total) * mean / at_once
        return f"{_clock(elapsed)} elapsed, ~{_clock(remaining)} left"

    def _line(self, text: str, final: bool) -> None:
        text = f"{text} | {self.state()}"
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _shown(path: Any) -> str:
    from pathlib import Path

    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)
