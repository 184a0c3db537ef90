"""Run every run of a study through a launcher, as many at once as it allows, keeping what ``--resume`` may keep."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence

from lightning_gc.compare.launchers import Launcher, Running, RunStartError, SlurmBackend
from lightning_gc.compare.output import OutputFolder
from lightning_gc.compare.progress import Progress
from lightning_gc.compare.project import ProjectError
from lightning_gc.compare.runner import (
    RunPlan,
    load_record,
    outcome,
    read_status,
    recorded_job,
    running_process,
    save_record,
)
from lightning_gc.compare.summary import COLLAPSED, DIVERGED, FAILED, FINISHED, RunRecord

_KEPT = (FINISHED, COLLAPSED, DIVERGED)  # results; a failed or interrupted run is run again


def run_all(
    todo: Sequence[RunPlan],
    launcher: Launcher,
    progress: Progress,
    folder: OutputFolder,
    resume: bool = False,
    poll_seconds: float = 0.5,
    on_record: Callable[[RunRecord], None] | None = None,
) -> list[RunRecord]:
    """Run ``todo`` and return their records in its order. With ``resume``, runs an earlier comparison
    finished are kept, and SLURM jobs it submitted that are still queued or running are waited for, not
    submitted again.

    On any exception (Ctrl-C, SIGTERM turned into one) every run still going is stopped before it propagates.

    Raises:
        ProjectError: with ``resume``, when a run of an earlier comparison is still running as a local process.
    """
    records: dict[str, RunRecord] = {}
    running: list[Running] = []
    try:
        pending = _kept_or_attached(todo, launcher, progress, resume, records, running)
        _refuse_live_runs(pending)
        while pending or running:
            batch, pending = pending[: launcher.free_slots()], pending[launcher.free_slots() :]
            for plan in batch:
                if plan.run_dir.exists():
                    shutil.rmtree(plan.run_dir)  # an interrupted attempt: its events must not mix with the new ones
                folder.record(plan.run_dir)
            running += _started(batch, launcher, progress, records)
            for run in list(running):
                status = read_status(run.plan.run_dir)
                if status:
                    progress.update(run.plan.label, status)
                ended, code = run.poll()
                if ended:
                    running.remove(run)
                    launcher.release(run)
                    record = outcome(run.plan, code, time.monotonic() - run.started, run.command, run.job_id)
                    records[run.plan.key] = record
                    progress.finish(run.plan.label, record)
                    if on_record is not None:
                        on_record(record)
            if pending or running:
                time.sleep(poll_seconds)
    except BaseException:
        for run in running:
            run.stop()
        raise
    return [records[plan.key] for plan in todo]


def _kept_or_attached(
    todo: Sequence[RunPlan],
    launcher: Launcher,
    progress: Progress,
    resume: bool,
    records: dict[str, RunRecord],
    running: list[Running],
) -> list[RunPlan]:
    """The plans still to start; fills ``records`` with the kept runs and ``running`` with attached jobs."""
    pending = []
    for plan in todo:
        earlier = load_record(plan.run_dir) if resume else None
        if earlier is not None and earlier.status in _KEPT:
            progress.skip(plan.label, earlier)
            records[plan.key] = earlier
            continue
        job = recorded_job(plan.run_dir) if resume and isinstance(launcher, SlurmBackend) else None
        attached = launcher.attach(plan, job) if job and isinstance(launcher, SlurmBackend) else None
        if attached is not None:
            running.append(attached)
            progress.attach(plan.label, job or "")
        else:
            pending.append(plan)
    return pending


def _started(
    batch: Sequence[RunPlan], launcher: Launcher, progress: Progress, records: dict[str, RunRecord]
) -> list[Running]:
    if isinstance(launcher, SlurmBackend):
        for plan in batch:
            progress.start(plan.label)
        return launcher.start(batch) if batch else []  # one submission: a job array
    started: list[Running] = []
    for plan in batch:
        try:
            started += launcher.start([plan])
        except RunStartError as err:
            record = RunRecord(plan.arm, plan.seed, FAILED, plan.run_dir, plan.run_dir / "train.log", point=plan.point)
            records[plan.key] = save_record(record)
            progress.finish(plan.label, record, reason=str(err))
            continue
        progress.start(plan.label)
    return started


def _refuse_live_runs(pending: Sequence[RunPlan]) -> None:
    for plan in pending:
        pid = running_process(plan.run_dir)
        if pid is not None:
            raise ProjectError(
                f"{plan.key} is still running as process {pid}, started by an earlier comparison; its folder is"
                f" kept: wait for it to end (or `kill {pid}`), then resume"
            )
