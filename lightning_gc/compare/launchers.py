"""Where the runs of a study run: on this machine, several at once (``--jobs``), or as SLURM jobs.

A launcher starts runs and hands back one :class:`Running` per run; the scheduler polls them. Every local run
is its own process group, ended with the comparison (also when the comparison is killed: on Linux the run
gets SIGTERM when its parent dies, ``prctl(PR_SET_PDEATHSIG)``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from lightning_gc.compare.project import ProjectError
from lightning_gc.compare.runner import JOB_FILE, LOG_FILE, RunPlan, note_process

LAUNCHERS = ("local", "slurm")
# Variables of the user's environment that a run's recorded command repeats (they change how it runs).
_RECORDED = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH")
# SLURM states of a job that has not ended yet (`squeue`'s long names).
SLURM_ACTIVE = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "STAGE_OUT", "UNKNOWN"}
)


class Running(Protocol):
    """One run that was started (or found still running): poll it until it ends, or stop it."""

    plan: RunPlan
    command: str
    started: float

    @property
    def job_id(self) -> str | None:
        """The SLURM job id, ``None`` for a local run."""
        ...

    def poll(self) -> tuple[bool, int | None]:
        """``(ended, exit code)``; the exit code is ``None`` while running or when unknown."""
        ...

    def stop(self) -> None:
        """End the run now (Ctrl-C, SIGTERM of the comparison)."""
        ...


class Launcher(Protocol):
    """Starts runs; ``parallel`` is how many can run at once (for the time-left estimate)."""

    parallel: int

    def free_slots(self) -> int: ...

    def start(self, plans: Sequence[RunPlan]) -> list[Running]: ...

    def release(self, run: Running) -> None: ...


# -- on this machine ------------------------------------------------------------------------------------------


@dataclass
class LocalRun:
    """A run as a local process in its own process group, its console output in ``train.log``."""

    plan: RunPlan
    command: str
    process: subprocess.Popen[bytes]
    log: IO[str]
    slot: int
    started: float = field(default_factory=time.monotonic)

    @property
    def job_id(self) -> str | None:
        return None

    def poll(self) -> tuple[bool, int | None]:
        code = self.process.poll()
        if code is None:
            return False, None
        self.log.close()
        return True, code

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the run's process group, SIGKILL after ``grace`` seconds."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait()
        _signal_group(self.process.pid, signal.SIGKILL)  # what the run left behind in its group (data workers)
        self.log.close()


class LocalLauncher:
    """Runs ``jobs`` runs at once on this machine.

    With GPUs (``CUDA_VISIBLE_DEVICES``, else every device torch sees) each run gets ``devices_per_run`` of
    its own, through ``CUDA_VISIBLE_DEVICES``; two runs share a device only with ``share_devices``. The CPU
    threads are split between the runs (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``), unless the environment
    sets ``OMP_NUM_THREADS`` already.

    Args:
        jobs: runs at once, >= 1.
        devices_per_run: GPUs per run (default 1 when there are GPUs); requires GPUs.
        share_devices: allow more runs than GPU groups (runs share devices, round robin).
        gpus: the GPU ids to use; default: detected.
        cpus: the CPU cores to split; default: those this process may run on.
        environ: the environment the runs inherit; default ``os.environ``.

    Raises:
        ProjectError: for an invalid combination, naming the option and what the machine has.

    Example:
        >>> launcher = LocalLauncher(jobs=2, gpus=[], cpus=4, environ={})
        >>> launcher.slot_env
        [{'OMP_NUM_THREADS': '2', 'MKL_NUM_THREADS': '2'}, {'OMP_NUM_THREADS': '2', 'MKL_NUM_THREADS': '2'}]
    """

    def __init__(
        self,
        jobs: int = 1,
        devices_per_run: int | None = None,
        share_devices: bool = False,
        gpus: Sequence[str] | None = None,
        cpus: int | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        gpus = list(visible_gpus(self.environ) if gpus is None else gpus)
        self.slot_env = [
            {**gpu, **threads}
            for gpu, threads in zip(
                _gpu_slots(jobs, devices_per_run, share_devices, gpus),
                _thread_slots(jobs, cpus if cpus is not None else _cpu_count(), self.environ),
            )
        ]
        self.parallel = jobs
        self._free = list(range(jobs))

    def free_slots(self) -> int:
        return len(self._free)

    def start(self, plans: Sequence[RunPlan]) -> list[Running]:
        return [self._start(plan) for plan in plans]

    def release(self, run: Running) -> None:
        if isinstance(run, LocalRun):
            self._free.append(run.slot)

    def _start(self, plan: RunPlan) -> LocalRun:
        slot = self._free.pop(0)
        env = {**self.environ, "PYTHONUNBUFFERED": "1", **self.slot_env[slot]}
        chosen = {k: self.environ[k] for k in _RECORDED if k in self.environ}  # what the user set shapes the run too
        command = plan.shell_line({**chosen, **self.slot_env[slot]})
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(plan.run_dir / LOG_FILE, "w", encoding="utf-8")  # noqa: SIM115 - closed when the run ends
        log.write(f"$ {command}\n\n")
        log.flush()
        try:
            process = subprocess.Popen(
                plan.command(),
                cwd=plan.project.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: ended as a whole, and not by the terminal's ^C
                preexec_fn=die_with_parent(os.getpid()),
            )
        except OSError as err:
            log.write(f"could not start: {err}\n")
            log.close()
            self._free.append(slot)
            raise RunStartError(plan, str(err)) from err
        note_process(plan.run_dir, process.pid)
        return LocalRun(plan, command, process, log, slot)


class RunStartError(RuntimeError):
    """A run's process could not be started (the record says failed, exit code None)."""

    def __init__(self, plan: RunPlan, reason: str) -> None:
        super().__init__(f"{plan.label}: could not start: {reason}")
        self.plan = plan


def die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when its parent dies (Linux); ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork: the child only calls it
    set_parent_death_signal = 1  # PR_SET_PDEATHSIG, <linux/prctl.h>

    def preexec() -> None:
        prctl(set_parent_death_signal, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return preexec


def visible_gpus(environ: Mapping[str, str]) -> list[str]:
    """The GPUs runs may use: ``CUDA_VISIBLE_DEVICES`` when set, else every CUDA device torch counts."""
    given = environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _gpu_slots(jobs: int, per_run: int | None, share: bool, gpus: list[str]) -> list[dict[str, str]]:
    if not gpus:
        if per_run is not None:
            raise ProjectError(f"`--devices-per-run` {per_run}: no GPU is visible (CUDA_VISIBLE_DEVICES, torch.cuda)")
        return [{} for _ in range(jobs)]
    per_run = per_run or 1
    groups = [gpus[i : i + per_run] for i in range(0, len(gpus) - per_run + 1, per_run)]
    if not groups:
        raise ProjectError(f"`--devices-per-run` {per_run}: only {len(gpus)} GPU(s) visible ({','.join(gpus)})")
    if jobs > len(groups) and not share:
        raise ProjectError(
            f"`--jobs` {jobs} x `--devices-per-run` {per_run} needs {jobs * per_run} GPUs, {len(gpus)} visible"
            f" ({','.join(gpus)}): lower `--jobs`, or pass `--share-devices` to put several runs on a device"
        )
    return [{"CUDA_VISIBLE_DEVICES": ",".join(groups[i % len(groups)])} for i in range(jobs)]


def _thread_slots(jobs: int, cpus: int, environ: Mapping[str, str]) -> list[dict[str, str]]:
    if "OMP_NUM_THREADS" in environ:
        return [{} for _ in range(jobs)]  # the user's choice, inherited as is
    threads = str(max(1, cpus // jobs))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(jobs)]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(pid, sig)


# -- SLURM, through lightning_gc.compare.slurm (submitit) -----------------------------------------------------


@dataclass
class SlurmRunning:
    """A run submitted as (or found to be) a SLURM job."""

    plan: RunPlan
    command: str
    job: Any  # lightning_gc.compare.slurm.SlurmJob
    started: float = field(default_factory=time.monotonic)

    @property
    def job_id(self) -> str | None:
        return str(self.job.job_id)

    def poll(self) -> tuple[bool, int | None]:
        if not self.job.done():
            return False, None
        return True, self.job.returncode()

    def stop(self) -> None:
        self.job.cancel()


class SlurmBackend:
    """Submits every run as a SLURM job (one job array per batch) through ``cluster``'s ``SlurmLauncher``.

    Args:
        folder: submitit's folder for this study (``OUT/slurm``).
        options: ``lightning_gc.compare.slurm.SlurmOptions``.
    """

    def __init__(self, folder: Path, options: Any) -> None:
        self.parallel = 1_000_000  # SLURM decides; progress estimates from the runs actually running
        self.options = options
        self._launcher = _slurm_module().SlurmLauncher(folder, options)

    def free_slots(self) -> int:
        return self.parallel

    def start(self, plans: Sequence[RunPlan]) -> list[Running]:
        slurm = _slurm_module()
        env = _slurm_env(self.options)
        runs = []
        for plan in plans:
            plan.run_dir.mkdir(parents=True, exist_ok=True)
            runs.append(
                slurm.SlurmRun(
                    key=plan.key, argv=plan.command(), cwd=plan.project.root, env=env, log=plan.run_dir / LOG_FILE
                )
            )
        try:
            jobs = self._launcher.submit(runs) if runs else []
        except Exception as err:  # sbatch refused them (submitit raises several kinds): nothing was submitted
            raise ProjectError(f"`--launcher slurm`: the jobs could not be submitted: {err}") from err
        started: list[Running] = []
        for plan, job in zip(plans, jobs):
            (plan.run_dir / JOB_FILE).write_text(f'{{"job_id": "{job.job_id}"}}\n', encoding="utf-8")
            started.append(SlurmRunning(plan, plan.shell_line(env), job))
        return started

    def attach(self, plan: RunPlan, job_id: str) -> SlurmRunning | None:
        """The job an earlier comparison submitted for ``plan``, if it is still queued or running."""
        job = self._launcher.attach(job_id)
        if job.done() or job.state() not in SLURM_ACTIVE:
            return None
        return SlurmRunning(plan, plan.shell_line(_slurm_env(self.options)), job)

    def release(self, run: Running) -> None:
        pass


def slurm_options(
    partition: str | None, time: str | None, gpus_per_run: int, cpus_per_run: int, sbatch_args: Sequence[str]
) -> Any:
    """``SlurmOptions`` from compare's ``--slurm-*`` options."""
    return _slurm_module().SlurmOptions(
        partition=partition, time=time, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run,
        sbatch_args=tuple(sbatch_args),
    )  # fmt: skip


def _slurm_env(options: Any) -> dict[str, str]:
    # Overrides only: the job keeps the environment SLURM gives it (its own CUDA_VISIBLE_DEVICES above all).
    threads = str(max(1, int(getattr(options, "cpus_per_run", 1))))
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def _slurm_module() -> Any:
    try:
        from lightning_gc.compare import slurm
    except ImportError as err:
        raise ProjectError(
            f"`--launcher slurm` needs lightning_gc.compare.slurm and submitit (pip install 'lightning-gc[slurm]'): {err}"
        ) from err
    return slurm


def describe(launcher: Launcher) -> str:
    """One line on how the runs are spread: ``2 at once, OMP_NUM_THREADS=1 each``."""
    if isinstance(launcher, LocalLauncher):
        shared = (
            {k: v for k, v in launcher.slot_env[0].items() if k != "CUDA_VISIBLE_DEVICES"} if launcher.slot_env else {}
        )
        gpus = [e["CUDA_VISIBLE_DEVICES"] for e in launcher.slot_env if "CUDA_VISIBLE_DEVICES" in e]
        parts = [f"{launcher.parallel} at once on this machine"]
        if gpus:
            parts.append("GPUs " + " | ".join(gpus))
        if shared:
            parts.append(" ".join(f"{k}={shlex.quote(v)}" for k, v in shared.items()) + " each")
        return ", ".join(parts)
    return "as SLURM jobs"
