"""Baseline vs Gradient Centralization on one project, seed by seed: ``lightning-gc compare``.

The modules, one concept each: :mod:`~lightning_gc.compare.project` (resolve and check a project),
:mod:`~lightning_gc.compare.runner` (one training run as a subprocess), :mod:`~lightning_gc.compare.monitor`
(the callback injected into every run), :mod:`~lightning_gc.compare.events` (TensorBoard's reader),
:mod:`~lightning_gc.compare.stats` (the measures), :mod:`~lightning_gc.compare.summary` (per-arm aggregates),
:mod:`~lightning_gc.compare.report` and :mod:`~lightning_gc.compare.plot` (the outputs).
"""

from lightning_gc.compare.comparison import CompareOptions, ComparisonResult, run_comparison
from lightning_gc.compare.monitor import RunMonitor
from lightning_gc.compare.project import ProjectError

__all__ = ["CompareOptions", "ComparisonResult", "ProjectError", "RunMonitor", "run_comparison"]
