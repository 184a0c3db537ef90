"""Baseline vs Gradient Centralization (and other arms) on one project, seed by seed, over sweeps:
``lightning-gc compare``.

The modules, one concept each: :mod:`~lightning_gc.compare.project` (resolve and check a project),
:mod:`~lightning_gc.compare.sweep` (sweep points, stable ranges, sweep outputs),
:mod:`~lightning_gc.compare.runner` (one run: command, record, whether it still runs),
:mod:`~lightning_gc.compare.launchers` (local process groups, GPUs and threads; SLURM jobs),
:mod:`~lightning_gc.compare.scheduler` (every run of a study through a launcher),
:mod:`~lightning_gc.compare.output` (the locked output folder and what comparisons wrote in it),
:mod:`~lightning_gc.compare.monitor` (the callback injected into every run), :mod:`~lightning_gc.compare.events`
(TensorBoard's reader), :mod:`~lightning_gc.compare.stats` (the measures), :mod:`~lightning_gc.compare.summary`
(per-arm aggregates and statuses), :mod:`~lightning_gc.compare.report`, :mod:`~lightning_gc.compare.plot` and
:mod:`~lightning_gc.compare.tensorboard` (the outputs), :mod:`~lightning_gc.compare.slurm` (submitit).
"""

from lightning_gc.compare.comparison import CompareOptions, ComparisonResult, run_comparison
from lightning_gc.compare.monitor import RunMonitor
from lightning_gc.compare.project import ProjectError

__all__ = ["CompareOptions", "ComparisonResult", "ProjectError", "RunMonitor", "run_comparison"]
