"""One training run of a comparison: its command line, its process, its log and how it ended."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning_gc.compare.events import read_scalars
from lightning_gc.compare.progress import Progress
from lightning_gc.compare.project import Project
from lightning_gc.compare.summary import DIVERGED, FAILED, FINISHED, TRAIN_LOSS, RunRecord

LOG_FILE, STATUS_FILE, RECORD_FILE = "train.log", "status.json", "run.json"
MONITOR = "lightning_gc.compare.RunMonitor"


@dataclass(frozen=True)
class RunPlan:
    """What to run for one arm and seed.

    Args:
        project: the project.
        arm: ``"baseline"`` or ``"gc"``.
        seed: passed as ``--seed_everything``; the same in both arms, so both start from the same weights
            and see the batches in the same order.
        out: the comparison's output folder; the run logs to ``out/<arm>/seed_<seed>``.
        max_epochs: ``--trainer.max_epochs``, or ``None`` for the config's.
        lightning_args: extra LightningCLI arguments, appended last.
    """

    project: Project
    arm: str
    seed: int
    out: Path
    max_epochs: int | None = None
    lightning_args: tuple[str, ...] = ()

    @property
    def run_dir(self) -> Path:
        """``OUT/<arm>/seed_<seed>``: the TensorBoard run folder, which also holds the log and status files."""
        return self.out / self.arm / f"seed_{self.seed}"

    def command(self, python: str = sys.executable) -> list[str]:
        """The training command (run in the project folder), following the template convention."""
        configs = [a for c in (self.project.arm_config(self.arm), *self.project.overlays) for a in ("--config", str(c))]
        epochs = [] if self.max_epochs is None else ["--trainer.max_epochs", str(self.max_epochs)]
        monitor_args = {
            "status_file": str(self.run_dir / STATUS_FILE),
            "arm": self.arm,
            "seed": str(self.seed),
            "metrics": json.dumps(
                [self.project.metric, "val/loss"] if self.project.metric != "val/loss" else ["val/loss"]
            ),
        }
        return [
            python, "train.py", "fit", *configs,
            "--seed_everything", str(self.seed), *epochs,
            "--trainer.logger.init_args.save_dir", str(self.out / self.arm),
            "--trainer.logger.init_args.name", "",
            "--trainer.logger.init_args.version", f"seed_{self.seed}",
            f"--trainer.callbacks+={MONITOR}",
            *(a for k, v in monitor_args.items() for a in (f"--trainer.callbacks.init_args.{k}", v)),
            *self.lightning_args,
        ]  # fmt: skip


def execute(plan: RunPlan, progress: Progress, poll_seconds: float = 0.5) -> RunRecord:
    """Run ``plan`` to its end, writing its console output to ``run_dir/train.log``; never raises for a
    failed or diverged run (the record says so). Ctrl-C stops the run and is re-raised.
    """
    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    log, status_path = run_dir / LOG_FILE, run_dir / STATUS_FILE
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as log_file:
        log_file.write("$ " + shlex.join(plan.command()) + "\n\n")
        log_file.flush()
        try:
            process = subprocess.Popen(
                plan.command(), cwd=plan.project.root, stdout=log_file, stderr=subprocess.STDOUT, env=env
            )
        except OSError as err:
            log_file.write(f"could not start: {err}\n")
            return _save(RunRecord(plan.arm, plan.seed, FAILED, run_dir, log))
        try:
            while process.poll() is None:
                time.sleep(poll_seconds)
                status = _read_status(status_path)
                if status:
                    progress.update(status)
        except BaseException:
            _stop(process)
            raise
    status = _read_status(status_path) or {}
    diverged_at = status.get("diverged_at_step") if status.get("state") == "diverged" else _first_non_finite(run_dir)
    if diverged_at is not None:
        outcome = DIVERGED
    else:
        outcome = FINISHED if process.returncode == 0 else FAILED
    record = RunRecord(
        plan.arm, plan.seed, outcome, run_dir, log, process.returncode, diverged_at, time.monotonic() - started
    )
    return _save(record)


def load_record(run_dir: Path) -> RunRecord | None:
    """The record of a run an earlier invocation finished, or ``None``; paths point into ``run_dir`` (the
    output folder may have moved since)."""
    try:
        data = json.loads((run_dir / RECORD_FILE).read_text(encoding="utf-8"))
        return RunRecord(**{**data, "run_dir": run_dir, "log": run_dir / LOG_FILE})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _save(record: RunRecord) -> RunRecord:
    data: dict[str, Any] = {**asdict(record), "run_dir": str(record.run_dir), "log": str(record.log)}
    (record.run_dir / RECORD_FILE).write_text(json.dumps(data, indent=1), encoding="utf-8")
    return record


def _read_status(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _first_non_finite(run_dir: Path) -> int | None:
    """Divergence seen in the event files, for runs the monitor could not stop (e.g. it was not loaded)."""
    loss = read_scalars(run_dir).get(TRAIN_LOSS)
    if loss is None:
        return None
    bad = [int(s) for s, v in zip(loss.steps, loss.values) if not math.isfinite(v)]
    return bad[0] if bad else None


def _stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def plans(
    project: Project, seeds: Sequence[int], out: Path, max_epochs: int | None, lightning_args: Sequence[str]
) -> list[RunPlan]:
    """Every run of the comparison, seed by seed, baseline then GC, so that an interrupted comparison has
    both arms of the seeds it finished."""
    return [
        RunPlan(project, arm, seed, out, max_epochs, tuple(lightning_args))
        for seed in seeds
        for arm in ("baseline", "gc")
    ]
