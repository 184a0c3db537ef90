"""One training run of a comparison: its command line, its log, its record, and whether it still runs."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lightning_gc.compare.events import read_scalars
from lightning_gc.compare.project import Project
from lightning_gc.compare.summary import DIVERGED, FAILED, FINISHED, TRAIN_LOSS, RunRecord

LOG_FILE, STATUS_FILE, RECORD_FILE = "train.log", "status.json", "run.json"
# Who runs the run while it runs: {"pid", "started"} of a local process, or {"job_id"} of a SLURM job.
PROCESS_FILE, JOB_FILE = "process.json", "job.json"
MONITOR = "lightning_gc.compare.RunMonitor"


@dataclass(frozen=True)
class RunPlan:
    """What to run for one sweep point, arm and seed.

    Args:
        project: the project.
        arm: the arm, ``configs/<arm>.yaml``.
        seed: passed as ``--seed_everything``; the same in every arm, so all start from the same weights
            and see the batches in the same order.
        out: the comparison's output folder; the run logs to ``out/[<point>/]<arm>/seed_<seed>``.
        max_epochs: ``--trainer.max_epochs``, or ``None`` for the config's.
        lightning_args: extra LightningCLI arguments, appended after the monitor's.
        point: the sweep point's folder name (``"model.lr=0.1"``); ``""`` without a sweep.
        point_args: the point's LightningCLI arguments (``("--model.lr", "0.1")``), appended last.
        trainer_devices: ``--trainer.devices`` (``--devices-per-run``), or ``None`` for the config's.
    """

    project: Project
    arm: str
    seed: int
    out: Path
    max_epochs: int | None = None
    lightning_args: tuple[str, ...] = ()
    point: str = ""
    point_args: tuple[str, ...] = ()
    trainer_devices: int | None = None

    @property
    def run_dir(self) -> Path:
        """``OUT/[<point>/]<arm>/seed_<seed>``: the TensorBoard run folder, with the log and status files."""
        return self.arm_dir / f"seed_{self.seed}"

    @property
    def arm_dir(self) -> Path:
        """``OUT/[<point>/]<arm>``: the logger's ``save_dir``."""
        return (self.out / self.point if self.point else self.out) / self.arm

    @property
    def key(self) -> str:
        """``"[<point>/]<arm>/seed_<seed>"``: unique within the study."""
        return self.run_dir.relative_to(self.out).as_posix()

    @property
    def label(self) -> str:
        """``"[<point> ]<arm> seed_<seed>"``, as progress lines name the run."""
        return f"{self.point + ' ' if self.point else ''}{self.arm} seed_{self.seed}"

    def command(self, python: str = sys.executable) -> list[str]:
        """The training command (run in the project folder), following the template convention."""
        configs = [a for c in (self.project.arm_config(self.arm), *self.project.overlays) for a in ("--config", str(c))]
        epochs = [] if self.max_epochs is None else ["--trainer.max_epochs", str(self.max_epochs)]
        devices = [] if self.trainer_devices is None else ["--trainer.devices", str(self.trainer_devices)]
        monitor_args = {
            "status_file": str(self.run_dir / STATUS_FILE),
            "arm": self.arm,
            "seed": str(self.seed),
        }
        return [
            python, "train.py", "fit", *configs,
            "--seed_everything", str(self.seed), *epochs, *devices,
            "--trainer.logger.init_args.save_dir", str(self.arm_dir),
            "--trainer.logger.init_args.name", "",
            "--trainer.logger.init_args.version", f"seed_{self.seed}",
            f"--trainer.callbacks+={MONITOR}",
            *(a for k, v in monitor_args.items() for a in (f"--trainer.callbacks.init_args.{k}", v)),
            *self.lightning_args,
            *self.point_args,
        ]  # fmt: skip

    def shell_line(self, env: Mapping[str, str] = {}) -> str:
        """A shell line that reruns this run from anywhere: ``cd PROJECT && VAR=value ... python train.py ...``."""
        assignments = [f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())]
        return " ".join(["cd", shlex.quote(str(self.project.root)), "&&", *assignments, shlex.join(self.command())])


def plans(
    project: Project,
    seeds: Sequence[int],
    out: Path,
    max_epochs: int | None,
    lightning_args: Sequence[str],
    points: Sequence[tuple[str, tuple[str, ...]]] = (("", ()),),
    trainer_devices: int | None = None,
) -> list[RunPlan]:
    """Every run of the study: point by point, seed by seed, every arm of a seed in a row, so that an
    interrupted study has all arms of the seeds it finished.

    Args:
        points: ``(folder name, LightningCLI arguments)`` of each sweep point; one unnamed point without a sweep.
    """
    return [
        RunPlan(project, arm, seed, out, max_epochs, tuple(lightning_args), point, args, trainer_devices)
        for point, args in points
        for seed in seeds
        for arm in project.arms
    ]


def outcome(
    plan: RunPlan,
    returncode: int | None,
    seconds: float,
    command: str,
    job_id: str | None = None,
) -> RunRecord:
    """The record of a run that ended with ``returncode``, from its status and event files; saved as ``run.json``.

    A run whose training loss turned non-finite is ``diverged`` whatever its exit code; otherwise exit code 0
    is ``finished`` and anything else ``failed``.
    """
    run_dir = plan.run_dir
    status = _read_json(run_dir / STATUS_FILE) or {}
    diverged_at = status.get("diverged_at_step") if status.get("state") == "diverged" else _first_non_finite(run_dir)
    if diverged_at is not None:
        result = DIVERGED
    else:
        result = FINISHED if returncode == 0 else FAILED
    record = RunRecord(
        plan.arm,
        plan.seed,
        result,
        run_dir,
        run_dir / LOG_FILE,
        returncode,
        diverged_at,
        seconds,
        point=plan.point,
        job_id=job_id,
        command=command,
        chance=majority_share(status.get("val_class_counts")),
    )
    save_record(record)
    (run_dir / PROCESS_FILE).unlink(missing_ok=True)
    return record


def majority_share(counts: Sequence[int] | None) -> float | None:
    """The accuracy of always predicting the most frequent class, from per-class label counts.

    Example:
        >>> majority_share([30, 50, 20]), majority_share(None)
        (0.5, None)
    """
    if not counts or sum(counts) <= 0:
        return None
    return max(counts) / sum(counts)


def load_record(run_dir: Path) -> RunRecord | None:
    """The record of a run an earlier invocation finished, or ``None``; paths point into ``run_dir`` (the
    output folder may have moved since)."""
    data = _read_json(run_dir / RECORD_FILE)
    if data is None:
        return None
    known = {f.name for f in fields(RunRecord)}
    try:
        return RunRecord(
            **{**{k: v for k, v in data.items() if k in known}, "run_dir": run_dir, "log": run_dir / LOG_FILE}
        )
    except TypeError:
        return None


def save_record(record: RunRecord) -> RunRecord:
    """Write ``record`` to ``run_dir/run.json``."""
    data: dict[str, Any] = {**asdict(record), "run_dir": str(record.run_dir), "log": str(record.log)}
    (record.run_dir / RECORD_FILE).write_text(json.dumps(data, indent=1), encoding="utf-8")
    return record


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The run's latest progress report (see :class:`~lightning_gc.compare.monitor.RunMonitor`), or ``None``."""
    return _read_json(run_dir / STATUS_FILE)


def note_process(run_dir: Path, pid: int) -> None:
    """Record that the local process ``pid`` runs in ``run_dir`` (so a later ``--resume`` leaves it alone)."""
    (run_dir / PROCESS_FILE).write_text(json.dumps({"pid": pid, "started": _start_time(pid)}), encoding="utf-8")


def running_process(run_dir: Path) -> int | None:
    """The pid of a local process still running this run (started by an earlier comparison), or ``None``."""
    data = _read_json(run_dir / PROCESS_FILE)
    if not data or not isinstance(data.get("pid"), int):
        return None
    pid = int(data["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, another user's
    started = _start_time(pid)
    if data.get("started") is not None and started is not None and started != data["started"]:
        return None  # the pid was reused by an unrelated process
    return pid


def recorded_job(run_dir: Path) -> str | None:
    """The SLURM job id recorded for this run when it was submitted, or ``None``."""
    data = _read_json(run_dir / JOB_FILE)
    job = data.get("job_id") if data else None
    return str(job) if job else None


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), telling a pid from a later reuse of it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _first_non_finite(run_dir: Path) -> int | None:
    """Divergence seen in the event files, for runs the monitor could not stop (e.g. it was not loaded)."""
    loss = read_scalars(run_dir).get(TRAIN_LOSS)
    if loss is None:
        return None
    bad = [int(s) for s, v in zip(loss.steps, loss.values) if not math.isfinite(v)]
    return bad[0] if bad else None
