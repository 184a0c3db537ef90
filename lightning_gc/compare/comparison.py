"""Run a whole comparison (every sweep point x arm x seed), then the summary files."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import lightning_gc
from lightning_gc.compare.launchers import LAUNCHERS, Launcher, LocalLauncher, SlurmBackend, describe, slurm_options
from lightning_gc.compare.output import OutputFolder, prepare_output
from lightning_gc.compare.progress import Progress
from lightning_gc.compare.project import (
    ARMS,
    MODES,
    Project,
    ProjectError,
    check_arm_names,
    load_project,
    resolve_project_dir,
)
from lightning_gc.compare.report import markdown, write_runs_csv, write_summary_csv
from lightning_gc.compare.runner import LOG_FILE, plans
from lightning_gc.compare.scheduler import run_all
from lightning_gc.compare.summary import FAILED, RunRecord, Summary, summarize
from lightning_gc.compare.sweep import Axis, Point, grid, parse_sweeps, plot_sweep, sweep_markdown, write_sweep_csv

PROJECT_COPY = "project"  # OUT/project: a template rendered for the comparison, kept so its runs can be rerun


@dataclass(frozen=True)
class CompareOptions:
    """What ``lightning-gc compare`` was asked to do.

    Args:
        project: a project folder following the template convention, or a template name.
        seeds: how many seeds (``0 .. seeds-1``), each run in every arm.
        max_epochs: ``--trainer.max_epochs`` of every run; ``None`` keeps the config's.
        configs: setting configs applied after each arm's config (e.g. ``configs/settings/high_lr.yaml``).
        out: the output folder; default ``runs/compare/<project>[-<setting>...]``.
        resume: keep the finished runs of an earlier invocation with the same settings.
        overwrite: remove what an earlier comparison wrote in ``out`` first (nothing else).
        metric: the primary validation metric; default the configs' ``ModelCheckpoint`` monitor.
        mode: ``"min"`` or ``"max"``; default the ``ModelCheckpoint`` mode.
        target: the value "steps to target" waits for; default within 5% of the best value reached.
        lightning_args: extra LightningCLI arguments for every run.
        arms: the arms, each a ``configs/<arm>.yaml``; the first is the reference of the differences.
        sweep: ``KEY=V1,V2,...`` specs; several make a grid. Every point runs every arm and seed.
        jobs: runs at once on this machine (``launcher="local"``).
        devices_per_run: GPUs per run (``CUDA_VISIBLE_DEVICES``), also passed as ``--trainer.devices``.
        share_devices: allow more runs at once than GPU groups.
        launcher: ``"local"`` or ``"slurm"``.
        slurm_partition, slurm_time, slurm_gpus_per_run, slurm_cpus_per_run, slurm_args: the SLURM jobs'
            ``--partition``, ``--time``, GPUs and CPUs per run, and other sbatch options (``"--qos=high"``).
        chance: the primary metric's value for a constant predictor, for the ``collapsed`` rule; default: the
            majority-class share of the validation labels when the metric is an accuracy.

    Raises:
        ProjectError: (a ``ValueError``) for an invalid option, naming it and the accepted values.

    Example:
        >>> CompareOptions("digits-cnn", seeds=0)
        Traceback (most recent call last):
        ...
        lightning_gc.compare.project.ProjectError: `--seeds` must be an integer >= 1, got 0
        >>> CompareOptions("digits-cnn", jobs=2, sweep=("model.lr=0.02,0.05",)).sweep
        ('model.lr=0.02,0.05',)
    """

    project: str
    seeds: int = 3
    max_epochs: int | None = None
    configs: tuple[str, ...] = ()
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    metric: str | None = None
    mode: str | None = None
    target: float | None = None
    lightning_args: tuple[str, ...] = ()
    arms: tuple[str, ...] = ARMS
    sweep: tuple[str, ...] = ()
    jobs: int = 1
    devices_per_run: int | None = None
    share_devices: bool = False
    launcher: str = "local"
    slurm_partition: str | None = None
    slurm_time: str | None = None
    slurm_gpus_per_run: int = 0
    slurm_cpus_per_run: int = 1
    slurm_args: tuple[str, ...] = ()
    chance: float | None = None
    axes: tuple[Axis, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.project, str) or not self.project:
            raise ProjectError(f"PROJECT_DIR must be a project folder or a template name, got {self.project!r}")
        _check_count(self.seeds, "--seeds")
        if self.max_epochs is not None:
            _check_count(self.max_epochs, "--max-epochs")
        if self.mode is not None and self.mode not in MODES:
            raise ProjectError(f"`--mode` must be one of {MODES}, got {self.mode!r}")
        for value, option in ((self.target, "--target"), (self.chance, "--chance")):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ProjectError(f"`{option}` must be a finite number, got {value!r}")
        if self.resume and self.overwrite:
            raise ProjectError("`--resume` and `--overwrite` exclude each other: keep the finished runs, or start over")
        object.__setattr__(self, "arms", check_arm_names(self.arms))
        object.__setattr__(self, "axes", tuple(parse_sweeps(self.sweep)))
        grid(self.axes)  # refuses points that would share a folder
        given = {a.split("=", 1)[0] for a in self.lightning_args if a.startswith("--")}
        both = sorted(a.key for a in self.axes if f"--{a.key}" in given)
        if both:
            raise ProjectError(f"`--sweep {both[0]}` and `-- --{both[0]} ...` both set {both[0]}; keep one")
        self._check_launch()

    def _check_launch(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ProjectError(f"`--launcher` must be one of {LAUNCHERS}, got {self.launcher!r}")
        _check_count(self.jobs, "--jobs")
        if self.devices_per_run is not None:
            _check_count(self.devices_per_run, "--devices-per-run")
        _check_count(self.slurm_cpus_per_run, "--slurm-cpus-per-run")
        if (
            isinstance(self.slurm_gpus_per_run, bool)
            or not isinstance(self.slurm_gpus_per_run, int)
            or self.slurm_gpus_per_run < 0
        ):
            raise ProjectError(f"`--slurm-gpus-per-run` must be an integer >= 0, got {self.slurm_gpus_per_run!r}")
        local_only = {"--jobs": self.jobs != 1, "--devices-per-run": self.devices_per_run is not None,
                      "--share-devices": self.share_devices}  # fmt: skip
        slurm_only = {"--slurm-partition": self.slurm_partition is not None, "--slurm-time": self.slurm_time is not None,
                      "--slurm-gpus-per-run": self.slurm_gpus_per_run != 0, "--slurm-cpus-per-run": self.slurm_cpus_per_run != 1,
                      "--slurm-arg": bool(self.slurm_args)}  # fmt: skip
        wrong = [o for o, given in (local_only if self.launcher == "slurm" else slurm_only).items() if given]
        if wrong:
            needs = "`--launcher local` (the default)" if self.launcher == "slurm" else "`--launcher slurm`"
            raise ProjectError(
                f"`{wrong[0]}` applies to {needs} only; this comparison uses `--launcher {self.launcher}`"
            )
        if self.launcher == "slurm":
            self.slurm_options()

    def slurm_options(self) -> Any:
        """The ``lightning_gc.compare.slurm.SlurmOptions`` of the ``--slurm-*`` options (checked there, named here)."""
        try:
            return slurm_options(
                self.slurm_partition, self.slurm_time, self.slurm_gpus_per_run, self.slurm_cpus_per_run, self.slurm_args
            )
        except ValueError as err:
            field_name = str(err).split(" ", 1)[0].rstrip(":")
            option = _SLURM_OPTIONS.get(field_name, "--slurm-*")
            raise ProjectError(f"`{option}`: {err}") from err


_SLURM_OPTIONS = {
    "partition": "--slurm-partition",
    "time": "--slurm-time",
    "gpus_per_run": "--slurm-gpus-per-run",
    "cpus_per_run": "--slurm-cpus-per-run",
    "sbatch_args": "--slurm-arg",
}


@dataclass
class ComparisonResult:
    """What a comparison produced.

    Args:
        out: the output folder.
        summaries: the per-arm summary of each sweep point (``""``: the only point without a sweep).
        text: the Markdown summary, as written to ``out/summary.md``.
    """

    out: Path
    summaries: dict[str, Summary]
    text: str

    @property
    def summary(self) -> Summary:
        """The summary of the comparison's first (without a sweep: only) point."""
        return next(iter(self.summaries.values()))

    @property
    def failed(self) -> int:
        """How many runs failed (not counting diverged or collapsed ones, which are results)."""
        return sum(a.count(FAILED) for s in self.summaries.values() for a in s.arms.values())


def run_comparison(options: CompareOptions, stream: TextIO | None = None) -> ComparisonResult:
    """Run ``options``'s comparison, print progress and the summary to ``stream``, write the outputs.

    Writes ``OUT/summary.md``, ``OUT/summary.csv`` (per arm and measure), ``OUT/runs.csv`` (per run) and
    ``OUT/curves.png``; every run logs to TensorBoard under ``OUT/<arm>/seed_<K>``. With a sweep, each point
    gets those under ``OUT/<point>/`` and ``OUT/summary.md``, ``OUT/sweep.csv``, ``OUT/sweep.png`` cover the sweep.

    Raises:
        ProjectError: for a project, config or option that cannot give a valid comparison (before any run).
    """
    stream = stream if stream is not None else sys.stdout
    if importlib.util.find_spec("matplotlib") is None:  # needed at the end: say so before hours of training
        raise ProjectError("lightning-gc compare draws curves.png with matplotlib: pip install matplotlib")
    if options.launcher == "slurm" and importlib.util.find_spec("submitit") is None:
        raise ProjectError("`--launcher slurm` submits with submitit: pip install 'lightning-gc[slurm]'")
    with resolve_project_dir(options.project) as (checked_root, name):
        _load(options, checked_root, name)  # every check before the output folder is touched
        local = (
            LocalLauncher(options.jobs, options.devices_per_run, options.share_devices)
            if options.launcher == "local"
            else None
        )
        out = Path(options.out) if options.out else Path("runs") / "compare" / _default_name(name, options.configs)
        out = out.absolute()
        folder, left = prepare_output(out, _settings(options), options.resume, options.overwrite)
        with folder, _ended_by_signals():
            if left:
                stream.write(
                    f"--overwrite removed what earlier comparisons wrote in {_shown(out)} and left the rest: {', '.join(left)}\n"
                )
            project = _load(options, _kept_copy(checked_root, options.project, folder), name)
            return _run(options, project, folder, local or _slurm_launcher(options, folder), stream)


def _run(
    options: CompareOptions, project: Project, folder: OutputFolder, launcher: Launcher, stream: TextIO
) -> ComparisonResult:
    out = folder.path
    points = grid(options.axes) if options.axes else []
    named = [(p.name, p.args) for p in points] or [("", ())]
    todo = plans(
        project, range(options.seeds), out, options.max_epochs, options.lightning_args, named, options.devices_per_run
    )
    stream.write(
        f"{len(todo)} runs: {len(named)} point(s) x {len(project.arms)} arms x {options.seeds} seed(s), {describe(launcher)}\n"
    )
    progress = Progress(len(todo), stream, parallel=launcher.parallel)
    records = run_all(todo, launcher, progress, folder, options.resume)
    summaries: dict[str, Summary] = {}
    for point_name, _ in named:
        point_records = [r for r in records if r.point == point_name]
        where = out / point_name if point_name else out
        context = _context(options, project, out, point_name)
        summaries[point_name] = _write_point(options, project, folder, where, point_records, point_name, context)
    written = ["summary.md", "summary.csv", "runs.csv", "curves.png"]
    if points:
        text = _write_sweep(options, project, folder, points, list(summaries.values()))
        written = [
            "summary.md",
            "sweep.csv",
            "sweep.png",
            "per point: <point>/summary.md, summary.csv, runs.csv, curves.png",
        ]
    else:
        text = (out / "summary.md").read_text(encoding="utf-8")
    stream.write("\n" + text + "\n")
    stream.write(f"Written: {_shown(out)}/: {', '.join(written)}\n")
    stream.write(f"TensorBoard: tensorboard --logdir {_shown(out)}\n")
    stream.flush()
    return ComparisonResult(out, summaries, text)


def _write_point(
    options: CompareOptions,
    project: Project,
    folder: OutputFolder,
    where: Path,
    records: Sequence[RunRecord],
    point: str,
    context: list[str],
) -> Summary:
    summary = summarize(records, project.metric, project.mode, options.target, arms=project.arms, chance=options.chance)
    title = f"lightning-gc compare: {project.name}" + (f", {point}" if point else "")
    text = markdown(summary, title, context, relative_to=Path.cwd())
    outputs = [where / n for n in ("summary.md", "summary.csv", "runs.csv", "curves.png")]
    folder.record(*outputs)
    outputs[0].write_text(text, encoding="utf-8")
    write_summary_csv(summary, outputs[1])
    write_runs_csv(summary, outputs[2])
    from lightning_gc.compare.plot import plot_curves

    plot_curves(summary, outputs[3], title=f"{project.name}{', ' + point if point else ''}: {context[0].strip()}")
    _arm_view(folder, where, [m.record for a in summary.arms.values() for m in a.runs], project)
    return summary


def _write_sweep(
    options: CompareOptions, project: Project, folder: OutputFolder, points: Sequence[Point], summaries: list[Summary]
) -> str:
    out = folder.path
    folder.record(out / "summary.md", out / "sweep.csv", out / "sweep.png")
    context = _context(options, project, out, "<point>")
    text = sweep_markdown(options.axes, points, summaries, f"lightning-gc compare: {project.name}, sweep", context)
    (out / "summary.md").write_text(text, encoding="utf-8")
    write_sweep_csv(options.axes, points, summaries, out / "sweep.csv")
    plot_sweep(options.axes, points, summaries, out / "sweep.png", title=f"{project.name}: {context[0].strip()}")
    return text


def _arm_view(folder: OutputFolder, where: Path, records: list[RunRecord], project: Project) -> None:
    """TensorBoard's per-arm view (:func:`~lightning_gc.compare.tensorboard.write_arm_view`)."""
    from lightning_gc.compare.tensorboard import write_arm_view  # imports TensorBoard: only once runs are done

    folder.record(where / "arms")
    try:
        write_arm_view(where, records, project.metric, project.mode)
    except Exception as err:  # the summary files are written; a view that fails must not lose them
        warnings.warn(f"the TensorBoard arm view of {where} could not be written: {err!r}", stacklevel=2)


def _slurm_launcher(options: CompareOptions, folder: OutputFolder) -> Launcher:
    slurm_folder = folder.path / "slurm"
    folder.record(slurm_folder)
    try:
        return SlurmBackend(slurm_folder, options.slurm_options())
    except ImportError as err:
        raise ProjectError(f"`--launcher slurm`: {err}") from err


def _load(options: CompareOptions, root: Path, name: str) -> Project:
    return load_project(root, name, options.configs, options.metric, options.mode, options.arms)


def _kept_copy(checked_root: Path, project: str, folder: OutputFolder) -> Path:
    """A project folder stays where it is; a template's rendering is copied to ``OUT/project`` (kept on
    ``--resume``), so every run's command still works after the comparison."""
    if os.path.isdir(project):
        return checked_root
    copy = folder.path / PROJECT_COPY
    if not (copy / "train.py").is_file():
        folder.record(copy)
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(checked_root, copy)
    return copy


class Terminated(KeyboardInterrupt):
    """The comparison got SIGTERM or SIGHUP: its runs are stopped as for Ctrl-C."""


@contextmanager
def _ended_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the comparison like Ctrl-C (its runs are stopped), in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _check_count(value: object, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProjectError(f"`{option}` must be an integer >= 1, got {value!r}")


def _default_name(name: str, configs: Sequence[str]) -> str:
    parts = [name, *(Path(c).stem for c in configs)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))


def _settings(options: CompareOptions) -> dict[str, Any]:
    project = options.project if not os.path.isdir(options.project) else str(Path(options.project).resolve())
    return {
        "project": project,
        "configs": list(options.configs),
        "max_epochs": options.max_epochs,
        "lightning_args": list(options.lightning_args),
        "seeds": options.seeds,
        "metric": options.metric,
        "mode": options.mode,
        "target": options.target,
        "arms": list(options.arms),
        "sweep": list(options.sweep),
        "launcher": options.launcher,
        "jobs": options.jobs,
        "devices_per_run": options.devices_per_run,
        "chance": options.chance,
        "slurm": {
            "partition": options.slurm_partition,
            "time": options.slurm_time,
            "gpus_per_run": options.slurm_gpus_per_run,
            "cpus_per_run": options.slurm_cpus_per_run,
            "args": list(options.slurm_args),
        },
        "lightning_gc": lightning_gc.__version__,
    }


def _context(options: CompareOptions, project: Project, out: Path, point: str = "") -> list[str]:
    epochs = f"{options.max_epochs} epochs" if options.max_epochs else "the configs' max_epochs"
    settings = ", ".join(Path(o).name for o in project.overlays) or "default settings"
    lines = [
        f"{options.seeds} seed(s) per arm, {epochs}, {settings}; metric {project.metric} ({project.mode});"
        f" arms {', '.join(project.arms)}"
    ]
    if options.axes:
        lines.append("sweep: " + "; ".join(f"{a.key} in {', '.join(a.values)}" for a in options.axes))
    if options.lightning_args:
        lines.append("LightningCLI arguments: `" + " ".join(options.lightning_args) + "`")
    prefix = f"{_shown(out)}/{point}/" if point else f"{_shown(out)}/"
    lines.append(f"Runs and logs: `{prefix}<arm>/seed_<K>/` ({LOG_FILE}, first line: the command that reruns it)")
    return [line + "  " for line in lines[:-1]] + lines[-1:]


def _shown(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)
