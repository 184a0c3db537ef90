"""Run a whole comparison: every seed in both arms, then the summary files."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import lightning_gc
from lightning_gc.compare.output import prepare_output
from lightning_gc.compare.progress import Progress
from lightning_gc.compare.project import ARMS, MODES, Project, ProjectError, load_project, resolve_project_dir
from lightning_gc.compare.report import markdown, write_runs_csv, write_summary_csv
from lightning_gc.compare.runner import LOG_FILE, execute, load_record, plans
from lightning_gc.compare.summary import DIVERGED, FAILED, FINISHED, Summary, summarize


@dataclass(frozen=True)
class CompareOptions:
    """What ``lightning-gc compare`` was asked to do.

    Args:
        project: a project folder following the template convention, or a template name.
        seeds: how many seeds (``0 .. seeds-1``), each run in both arms.
        max_epochs: ``--trainer.max_epochs`` of every run; ``None`` keeps the config's.
        configs: setting configs applied after each arm's config (e.g. ``configs/settings/high_lr.yaml``).
        out: the output folder; default ``runs/compare/<project>[-<setting>...]``.
        resume: keep the finished runs of an earlier invocation with the same settings.
        overwrite: delete an earlier comparison in ``out`` first.
        metric: the primary validation metric; default the configs' ``ModelCheckpoint`` monitor.
        mode: ``"min"`` or ``"max"``; default the ``ModelCheckpoint`` mode.
        target: the value "steps to target" waits for; default within 5% of the best value reached.
        lightning_args: extra LightningCLI arguments for every run.

    Raises:
        ProjectError: (a ``ValueError``) for an invalid option, naming it and the accepted values.

    Example:
        >>> CompareOptions("digits-cnn", seeds=0)
        Traceback (most recent call last):
        ...
        lightning_gc.compare.project.ProjectError: `--seeds` must be an integer >= 1, got 0
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

    def __post_init__(self) -> None:
        if not isinstance(self.project, str) or not self.project:
            raise ProjectError(f"PROJECT_DIR must be a project folder or a template name, got {self.project!r}")
        _check_count(self.seeds, "--seeds")
        if self.max_epochs is not None:
            _check_count(self.max_epochs, "--max-epochs")
        if self.mode is not None and self.mode not in MODES:
            raise ProjectError(f"`--mode` must be one of {MODES}, got {self.mode!r}")
        if self.target is not None and not (isinstance(self.target, (int, float)) and math.isfinite(self.target)):
            raise ProjectError(f"`--target` must be a finite number, got {self.target!r}")
        if self.resume and self.overwrite:
            raise ProjectError("`--resume` and `--overwrite` exclude each other: keep the finished runs, or start over")


@dataclass
class ComparisonResult:
    """What a comparison produced.

    Args:
        out: the output folder.
        summary: the per-arm summary.
        text: the Markdown summary, as written to ``out/summary.md``.
    """

    out: Path
    summary: Summary
    text: str

    @property
    def failed(self) -> int:
        """How many runs failed (not counting diverged ones, which are results)."""
        return sum(a.count(FAILED) for a in self.summary.arms.values())


def run_comparison(options: CompareOptions, stream: TextIO | None = None) -> ComparisonResult:
    """Run ``options``'s comparison, print progress and the summary to ``stream``, write the outputs.

    Writes ``OUT/summary.md``, ``OUT/summary.csv`` (per arm and measure), ``OUT/runs.csv`` (per run) and
    ``OUT/curves.png``; every run logs to TensorBoard under ``OUT/<arm>/seed_<K>``.

    Raises:
        ProjectError: for a project, config or option that cannot give a valid comparison (before any run).
    """
    stream = stream if stream is not None else sys.stdout
    if importlib.util.find_spec("matplotlib") is None:  # needed at the end: say so before hours of training
        raise ProjectError("lightning-gc compare draws curves.png with matplotlib: pip install matplotlib")
    with resolve_project_dir(options.project) as (root, name):
        project = load_project(root, name, options.configs, options.metric, options.mode)
        out = Path(options.out) if options.out else Path("runs") / "compare" / _default_name(name, options.configs)
        out = out.absolute()
        prepare_output(out, _settings(options), options.resume, options.overwrite)
        records = []
        todo = plans(project, range(options.seeds), out, options.max_epochs, options.lightning_args)
        progress = Progress(len(todo), stream)
        for index, plan in enumerate(todo, start=1):
            earlier = load_record(plan.run_dir) if options.resume else None
            if earlier is not None and earlier.status in (FINISHED, DIVERGED):
                progress.skip(index, earlier)
                records.append(earlier)
                continue
            if plan.run_dir.exists():
                _remove(plan.run_dir)  # a failed or interrupted attempt: its events must not mix with the new ones
            progress.start(index, plan.arm, plan.seed)
            record = execute(plan, progress)
            progress.finish(record, _shown(record.log))
            records.append(record)
    summary = summarize(records, project.metric, project.mode, options.target, arms=ARMS)
    title = f"lightning-gc compare: {name}"
    text = markdown(summary, title, _context(options, project, out), relative_to=Path.cwd())
    (out / "summary.md").write_text(text, encoding="utf-8")
    write_summary_csv(summary, out / "summary.csv")
    write_runs_csv(summary, out / "runs.csv")
    from lightning_gc.compare.plot import plot_curves

    plot_curves(summary, out / "curves.png", title=f"{name}: {_context(options, project, out)[0].strip()}")
    stream.write("\n" + text + "\n")
    stream.write(f"Written: {_shown(out / 'summary.md')}, summary.csv, runs.csv, curves.png\n")
    stream.write(f"TensorBoard: tensorboard --logdir {_shown(out)}\n")
    stream.flush()
    return ComparisonResult(out, summary, text)


def _check_count(value: object, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProjectError(f"`{option}` must be an integer >= 1, got {value!r}")


def _default_name(name: str, configs: Sequence[str]) -> str:
    parts = [name, *(Path(c).stem for c in configs)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts))


def _settings(options: CompareOptions) -> dict[str, object]:
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
        "lightning_gc": lightning_gc.__version__,
    }


def _context(options: CompareOptions, project: Project, out: Path) -> list[str]:
    epochs = f"{options.max_epochs} epochs" if options.max_epochs else "the configs' max_epochs"
    settings = ", ".join(Path(o).name for o in project.overlays) or "default settings"
    lines = [f"{options.seeds} seed(s), {epochs}, {settings}; metric {project.metric} ({project.mode})"]
    if options.lightning_args:
        lines.append("LightningCLI arguments: `" + " ".join(options.lightning_args) + "`")
    lines.append(f"Runs and logs: `{_shown(out)}/<arm>/seed_<K>/` ({LOG_FILE} beside the event files)")
    return [line + "  " for line in lines[:-1]] + lines[-1:]


def _shown(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder)
