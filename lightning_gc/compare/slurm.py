"""Runs of a comparison as SLURM jobs, submitted with submitit (the optional ``slurm`` extra).

Each run is one task of a job array: submitit pickles a call of :func:`run_command` with the run's command,
folder, environment and log, and ``sbatch`` submits one array for all of them. The job's state comes from
SLURM itself (``scontrol``, then ``sacct``), its return code from a file the task writes when the command
ends, so a new process can :meth:`SlurmLauncher.attach` to a job by its id (``compare --resume``).

Example:
    >>> SlurmOptions(partition="gpu", time="02:00:00", gpus_per_run=1).sbatch_time_minutes
    120
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INSTALL_HINT = 'pip install "lightning-gc[slurm]"'
RETURNCODES = "returncodes"  # under the launcher's folder: one file per job id, the run's exit code

# SLURM job states after which the job never runs again (squeue/scontrol/sacct spelling)
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
        "NOT_FOUND",  # not SLURM's: the controller, accounting and the job's files all do not know the id
    }
)
# variables SLURM sets for the allocation: the job's own values win over the submitting shell's
ALLOCATION_VARIABLES = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "HIP_VISIBLE_DEVICES")
ALLOCATION_PREFIXES = ("SLURM_", "SLURMD_", "SUBMITIT_")
_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")
_SBATCH_ARG = re.compile(r"^--(?P<name>[A-Za-z][A-Za-z0-9-]*)(?:=(?P<value>.*))?$")


@dataclass(frozen=True)
class SlurmOptions:
    """Resources each run asks SLURM for.

    Args:
        partition: ``--partition``; ``None`` for the cluster's default partition.
        time: ``--time`` of each run, in sbatch syntax (``"90"`` minutes, ``"02:00:00"``, ``"1-12:00:00"``);
            ``None`` for the partition's default time limit.
        gpus_per_run: ``--gpus-per-task`` (0: no GPU requested).
        cpus_per_run: ``--cpus-per-task``.
        sbatch_args: other sbatch options passed through as they are, each ``--name=value`` or ``--flag``,
            e.g. ``("--qos=high", "--account=ml")``.

    Example:
        >>> SlurmOptions(sbatch_args=("--qos=high", "--exclusive")).sbatch_parameters
        {'qos': 'high', 'exclusive': True}
        >>> SlurmOptions(cpus_per_run=0)
        Traceback (most recent call last):
        ...
        ValueError: cpus_per_run must be an integer >= 1, got 0
    """

    partition: str | None = None
    time: str | None = None
    gpus_per_run: int = 0
    cpus_per_run: int = 1
    sbatch_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.partition is not None and (not isinstance(self.partition, str) or not self.partition.strip()):
            raise ValueError(f"partition must be a non-empty partition name or None, got {self.partition!r}")
        if self.time is not None and _minutes(self.time) is None:
            raise ValueError(
                f"time must be in sbatch --time syntax (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS) "
                f"and longer than 0, got {self.time!r}"
            )
        if not _is_int(self.gpus_per_run) or self.gpus_per_run < 0:
            raise ValueError(f"gpus_per_run must be an integer >= 0, got {self.gpus_per_run!r}")
        if not _is_int(self.cpus_per_run) or self.cpus_per_run < 1:
            raise ValueError(f"cpus_per_run must be an integer >= 1, got {self.cpus_per_run!r}")
        if isinstance(self.sbatch_args, str):
            raise ValueError(
                f"sbatch_args must be a tuple of '--name=value' or '--flag' strings, got {self.sbatch_args!r}"
            )
        for arg in self.sbatch_args:
            if not isinstance(arg, str) or not _SBATCH_ARG.match(arg):
                raise ValueError(
                    f"sbatch_args: each must be '--name=value' or '--flag' (e.g. '--qos=high'), got {arg!r}"
                )

    @property
    def sbatch_time_minutes(self) -> int | None:
        """``time`` in whole minutes (rounded up, as submitit's ``timeout_min`` wants it), or ``None``."""
        return None if self.time is None else _minutes(self.time)

    @property
    def sbatch_parameters(self) -> dict[str, str | bool]:
        """``sbatch_args`` as submitit's ``slurm_additional_parameters``: ``{name: value}``, ``True`` for flags."""
        parameters: dict[str, str | bool] = {}
        for arg in self.sbatch_args:
            match = _SBATCH_ARG.match(arg)
            assert match is not None  # checked in __post_init__
            parameters[match["name"]] = True if match["value"] is None else match["value"]
        return parameters

    def executor_parameters(self) -> dict[str, Any]:
        """The parameters of :meth:`submitit.SlurmExecutor.update_parameters` for these options.

        ``SlurmExecutor`` rather than ``AutoExecutor``: only there ``time=None`` leaves ``--time`` out
        (AutoExecutor drops ``None`` and submitit would then ask for its default of 5 minutes).

        Example:
            >>> SlurmOptions(partition="gpu", time="1:30:00", gpus_per_run=1).executor_parameters()["time"]
            90
        """
        parameters: dict[str, Any] = {
            "job_name": "lightning-gc",
            "partition": self.partition,
            "time": self.sbatch_time_minutes,
            "nodes": 1,
            "ntasks_per_node": 1,
            "cpus_per_task": self.cpus_per_run,
            "stderr_to_stdout": True,
        }
        if self.gpus_per_run:
            parameters["gpus_per_task"] = self.gpus_per_run
        if self.sbatch_args:
            parameters["additional_parameters"] = self.sbatch_parameters
        return parameters


@dataclass(frozen=True)
class SlurmRun:
    """One command to run as a SLURM job.

    Args:
        key: unique within the study, e.g. ``"lr=0.1/gc/seed_0"``.
        argv: the command.
        cwd: the folder it runs in.
        env: variables set for the command on top of the job's environment (which sbatch copies from the
            submitting shell); the variables SLURM sets for the job's allocation (``SLURM_*``,
            ``CUDA_VISIBLE_DEVICES``, ...) keep the job's values even when ``env`` names them.
        log: the command's stdout and stderr are appended to this file (created with its folder).
    """

    key: str
    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(repr=False)
    log: Path


class SlurmJob:
    """A job submitted by :class:`SlurmLauncher` (or attached to by its id).

    Args:
        job_id: SLURM's id, ``"<array>_<task>"`` for a task of a job array.
        folder: the launcher's folder, where the task writes its return code.
    """

    def __init__(self, job_id: str, folder: Path) -> None:
        self.job_id = job_id
        self.folder = Path(folder)

    def __repr__(self) -> str:
        return f"SlurmJob({self.job_id!r})"

    def state(self) -> str:
        """SLURM's state of the job: ``PENDING``, ``RUNNING``, ``COMPLETED``, ``FAILED``, ``CANCELLED``, ...

        ``UNKNOWN`` while the controller does not answer; ``NOT_FOUND`` (final) when it answers that it does
        not know the id and neither the accounting database nor the job's files do (a job that ended before
        the controller's ``MinJobAge`` on a cluster without accounting, without recording a return code).
        """
        return self._lookup().state

    def done(self) -> bool:
        """Whether the job has ended (in any way) and will not run again."""
        return self._lookup().state in FINAL_STATES

    def returncode(self) -> int | None:
        """The run's exit code once its command ended, as :mod:`subprocess` reports it (``-15``: ended by
        SIGTERM, e.g. from ``scancel``); ``None`` before, or when the task could not record one (killed with
        its command, its node failed)."""
        recorded = _read_returncode(self.folder, self.job_id)
        if recorded is not None:
            return recorded
        found = self._lookup()
        if found.state in FINAL_STATES and found.exit_code is not None:
            code, signal = found.exit_code
            # a job that failed before its command started (e.g. the python on the node could not import
            # lightning_gc) reports that failure; one ended by a signal has no code of its own
            return code if signal == 0 and code != 0 else None
        return None

    def cancel(self) -> None:
        """``scancel`` the job (nothing happens for a job that already ended)."""
        result = subprocess.run(["scancel", self.job_id], capture_output=True, text=True, check=False)
        if result.returncode != 0 and not self.done():
            raise RuntimeError(f"scancel {self.job_id} failed: {result.stderr.strip() or result.stdout.strip()}")

    def _lookup(self) -> _JobInfo:
        live = _scontrol_info(self.job_id)
        if isinstance(live, _JobInfo):
            return live
        info = _sacct_info(self.job_id)
        if info is not None:
            return info
        recorded = _read_returncode(self.folder, self.job_id)
        if recorded is not None:  # left the controller, no accounting: the task's own record says how it ended
            return _JobInfo("COMPLETED" if recorded == 0 else "FAILED", (recorded, 0))
        return _JobInfo("NOT_FOUND" if live == _UNKNOWN_ID else "UNKNOWN", None)


class SlurmLauncher:
    """Submits runs as SLURM jobs through submitit, one job array per :meth:`submit`.

    Args:
        folder: submitit's folder for this study (sbatch scripts, pickled calls, submitit's own logs, the
            runs' return codes); it must be visible from the compute nodes.
        options: the resources of each run.

    Raises:
        ImportError: submitit is not installed (``pip install "lightning-gc[slurm]"``).
    """

    def __init__(self, folder: Path, options: SlurmOptions) -> None:
        if not isinstance(options, SlurmOptions):
            raise ValueError(f"options must be a SlurmOptions, got {type(options).__name__}")
        _import_submitit()
        self.folder = Path(folder).absolute()
        self.options = options

    def submit(self, runs: Sequence[SlurmRun]) -> list[SlurmJob]:
        """Submit ``runs`` (one job array; a single job for one run); their jobs, in the same order."""
        keys = [run.key for run in runs]
        if len(set(keys)) != len(keys):
            raise ValueError(
                f"runs: keys must be unique, got duplicates {sorted({k for k in keys if keys.count(k) > 1})}"
            )
        if not runs:
            return []
        submitit = _import_submitit()
        self.folder.mkdir(parents=True, exist_ok=True)
        executor = submitit.SlurmExecutor(folder=self.folder)
        executor.update_parameters(**self.options.executor_parameters())
        jobs = executor.map_array(
            run_command,
            [run.argv for run in runs],
            [str(run.cwd) for run in runs],
            [run.env for run in runs],
            [str(run.log) for run in runs],
            [str(self.folder) for _ in runs],
        )
        return [SlurmJob(str(job.job_id), self.folder) for job in jobs]

    def attach(self, job_id: str) -> SlurmJob:
        """The job ``job_id`` that an earlier :meth:`submit` (possibly of another process) returned."""
        if not isinstance(job_id, str) or not re.fullmatch(r"\d+(_\d+)?", job_id):
            raise ValueError(f"job_id must be a SLURM job id such as '1234' or '1234_5', got {job_id!r}")
        return SlurmJob(job_id, self.folder)


def run_command(argv: list[str], cwd: str, env: Mapping[str, str], log: str, folder: str) -> int:
    """What each SLURM task runs: ``argv`` in ``cwd`` with ``env`` over the job's environment (see
    :class:`SlurmRun`), output appended to ``log``; records the
    exit code for :meth:`SlurmJob.returncode` and exits with it, so SLURM's state says FAILED for a
    failed run."""
    merged = {**os.environ, **{k: v for k, v in env.items() if not _is_allocation_variable(k)}}
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        try:
            code = subprocess.run(
                argv, cwd=cwd, env=merged, stdout=out, stderr=subprocess.STDOUT, check=False
            ).returncode
        except OSError as err:
            out.write(f"could not start {argv[0]!r}: {err}\n".encode())
            code = 127
    _write_returncode(Path(folder), _own_job_id(), code)
    if code != 0:
        raise SystemExit(code)  # not an Exception: submitit lets it end the task with this exit code
    return code


@dataclass(frozen=True)
class _JobInfo:
    state: str
    exit_code: tuple[int, int] | None  # (exit code, signal), as SLURM's ExitCode=N:S


_UNKNOWN_ID = "unknown id"


def _scontrol_info(job_id: str) -> _JobInfo | str | None:
    """The controller's record of the job; ``_UNKNOWN_ID`` when it does not know the id; ``None`` when it
    does not answer."""
    result = _slurm_command(["scontrol", "show", "job", "--oneliner", job_id])
    if result is None:
        return None
    if result.returncode != 0:
        return _UNKNOWN_ID if "invalid job id" in (result.stderr + result.stdout).lower() else None
    fields = dict(re.findall(r"(\w+)=(\S*)", _record_of(result.stdout, job_id)))
    if "JobState" not in fields:
        return None
    return _JobInfo(fields["JobState"], _exit_code(fields.get("ExitCode", "")))


def _record_of(stdout: str, job_id: str) -> str:
    """The line of ``scontrol show job`` for ``job_id`` (an array's pending tasks may share one line)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    array_id, _, task = job_id.partition("_")
    for line in lines:
        if (
            task and re.search(rf"\bArrayJobId={array_id}\b", line) and re.search(rf"\bArrayTaskId={task}\b", line)
        ) or re.search(rf"\bJobId={job_id}\b", line):
            return line
    return lines[0] if lines else ""


def _sacct_info(job_id: str) -> _JobInfo | None:
    result = _slurm_command(
        ["sacct", "--noheader", "--parsable2", "--allocations", "-o", "JobID,State,ExitCode", "-j", job_id]
    )
    if result is None or result.returncode != 0:
        return None
    for line in result.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[0] == job_id:
            return _JobInfo(parts[1].split()[0], _exit_code(parts[2]))  # "CANCELLED by 0" -> CANCELLED
    return None


def _slurm_command(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _exit_code(text: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"(\d+):(\d+)", text.strip())
    return (int(match[1]), int(match[2])) if match else None


def _own_job_id() -> str:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ["SLURM_JOB_ID"]


def _returncode_path(folder: Path, job_id: str) -> Path:
    return folder / RETURNCODES / job_id


def _write_returncode(folder: Path, job_id: str, code: int) -> None:
    path = _returncode_path(folder, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(f"{code}\n", encoding="utf-8")
    partial.replace(path)  # atomic: a reader sees no file or the whole code


def _read_returncode(folder: Path, job_id: str) -> int | None:
    try:
        return int(_returncode_path(folder, job_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_allocation_variable(name: str) -> bool:
    return name in ALLOCATION_VARIABLES or name.startswith(ALLOCATION_PREFIXES)


def _minutes(time: str) -> int | None:
    """sbatch ``--time`` syntax in whole minutes, rounded up; ``None`` if it is not that syntax or zero."""
    match = _TIME.match(time.strip()) if isinstance(time, str) else None
    if match is None:
        return None
    days = int(match["days"] or 0)
    parts = [int(p) for p in (match["a"], match["b"], match["c"]) if p is not None]
    if match["days"] is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:  # HH:MM:SS
        hours, minutes, seconds = parts
    else:  # MM or MM:SS
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    total_seconds = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return -(-total_seconds // 60) or None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _import_submitit() -> Any:
    try:
        import submitit
    except ImportError as err:
        raise ImportError(f"--launcher slurm needs submitit: {INSTALL_HINT}") from err
    return submitit
