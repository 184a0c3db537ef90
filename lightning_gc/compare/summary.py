"""From finished runs to one summary per arm: which runs count, their measures, mean and spread."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning_gc.compare.events import Series, read_scalars
from lightning_gc.compare.stats import (
    Aggregate,
    best_value,
    coefficient_of_variation,
    default_target,
    loss_oscillation,
    steps_to_target,
    train_val_gap,
)

FINISHED, DIVERGED, FAILED = "finished", "diverged", "failed"
TRAIN_LOSS, GRAD_NORM, VAL_LOSS = "train/loss", "train/grad_norm", "val/loss"
MEASURES = ("final", "best", "steps_to_target", "loss_oscillation", "grad_norm_cv", "train_val_gap", "test")


@dataclass(frozen=True)
class RunRecord:
    """How one run ended.

    Args:
        arm: ``"baseline"`` or ``"gc"``.
        seed: the ``seed_everything`` of the run.
        status: ``"finished"``, ``"diverged"`` (training loss turned non-finite; stopped early) or ``"failed"``.
        run_dir: the TensorBoard run folder, ``OUT/<arm>/seed_<seed>``.
        log: the run's console output.
        returncode: the training process's exit code (``None`` if it never started).
        diverged_at_step: the global step at which the loss was first non-finite.
        seconds: wall-clock time of the run.
    """

    arm: str
    seed: int
    status: str
    run_dir: Path
    log: Path
    returncode: int | None = None
    diverged_at_step: int | None = None
    seconds: float = 0.0

    @property
    def name(self) -> str:
        """``"<arm> seed_<seed>"``, as the summary's notes name the run."""
        return f"{self.arm} seed_{self.seed}"


@dataclass
class RunMeasures:
    """A run with its measures (``None`` where the curve does not give one) and its scalars."""

    record: RunRecord
    values: dict[str, float | None]
    scalars: dict[str, Series] = field(repr=False)


@dataclass
class ArmSummary:
    """The runs of one arm and the aggregates over those that finished.

    Diverged and failed runs are listed but left out of every aggregate.
    """

    arm: str
    runs: list[RunMeasures]
    aggregates: dict[str, Aggregate]

    def count(self, status: str) -> int:
        """How many of the arm's runs ended with ``status``."""
        return sum(r.record.status == status for r in self.runs)

    def with_status(self, status: str) -> list[RunMeasures]:
        """The arm's runs that ended with ``status``."""
        return [r for r in self.runs if r.record.status == status]


@dataclass
class Summary:
    """The comparison's result: per arm summaries and what they were measured against."""

    metric: str
    mode: str
    target: float | None
    target_given: bool
    arms: dict[str, ArmSummary]


def matching_test_metric(metric: str) -> str | None:
    """The test metric matching a validation metric by the naming convention (``val/acc`` -> ``test/acc``).

    Example:
        >>> matching_test_metric("val/acc"), matching_test_metric("accuracy")
        ('test/acc', None)
    """
    return "test/" + metric[len("val/") :] if metric.startswith("val/") else None


def summarize(
    records: Sequence[RunRecord], metric: str, mode: str, target: float | None = None, arms: Sequence[str] = ()
) -> Summary:
    """Read every run's event files and aggregate the measures per arm.

    Args:
        records: the runs, in any order.
        metric: the primary validation metric.
        mode: ``"max"`` or ``"min"``.
        target: the value ``steps_to_target`` waits for; default :func:`~lightning_gc.compare.stats.default_target`
            over the best values of the finished runs of all arms.
        arms: the order of the arms in the summary (default: order of first appearance).
    """
    scalars = {id(r): read_scalars(r.run_dir) if r.status != FAILED else {} for r in records}
    best = [best_value(_values(scalars[id(r)], metric), mode) for r in records if r.status == FINISHED]
    target_used = target if target is not None else default_target(best, mode)
    measured = [RunMeasures(r, measure(scalars[id(r)], metric, mode, target_used), scalars[id(r)]) for r in records]
    order = list(dict.fromkeys([*arms, *(r.arm for r in records)]))
    summaries = {}
    for arm in order:
        runs = sorted((m for m in measured if m.record.arm == arm), key=lambda m: m.record.seed)
        counted = [m for m in runs if m.record.status == FINISHED]
        aggregates = {name: Aggregate.of([m.values[name] for m in counted]) for name in MEASURES}
        summaries[arm] = ArmSummary(arm, runs, aggregates)
    return Summary(metric, mode, target_used, target is not None, summaries)


def measure(scalars: dict[str, Series], metric: str, mode: str, target: float | None) -> dict[str, float | None]:
    """The measures of one run from its scalars; ``None`` for each one its logs do not give.

    * ``final``/``best``: last and best logged value of ``metric``;
    * ``steps_to_target``: first step at which ``metric`` reached ``target``;
    * ``loss_oscillation``: :func:`~lightning_gc.compare.stats.loss_oscillation` of ``train/loss``;
    * ``grad_norm_cv``: :func:`~lightning_gc.compare.stats.coefficient_of_variation` of ``train/grad_norm``;
    * ``train_val_gap``: :func:`~lightning_gc.compare.stats.train_val_gap` of ``val/loss`` and ``train/loss``;
    * ``test``: the test metric (``val/x`` -> ``test/x``) of the best checkpoint, as ``train.py`` logs it.
    """
    values: dict[str, float | None] = dict.fromkeys(MEASURES)
    if metric in scalars and len(scalars[metric]):
        series = scalars[metric]
        values["final"] = series.last
        values["best"] = best_value(series.values, mode)
        if target is not None:
            step = steps_to_target(series.steps, series.values, target, mode)
            values["steps_to_target"] = None if step is None else float(step)
    if TRAIN_LOSS in scalars:
        values["loss_oscillation"] = loss_oscillation(scalars[TRAIN_LOSS].values)
        if VAL_LOSS in scalars:
            train, val = scalars[TRAIN_LOSS], scalars[VAL_LOSS]
            values["train_val_gap"] = train_val_gap(train.steps, train.values, val.steps, val.values)
    if GRAD_NORM in scalars:
        values["grad_norm_cv"] = coefficient_of_variation(scalars[GRAD_NORM].values)
    test = matching_test_metric(metric)
    if test is not None and test in scalars and len(scalars[test]):
        values["test"] = scalars[test].last
    return {k: None if v is None or not math.isfinite(v) else v for k, v in values.items()}


def _values(scalars: dict[str, Series], tag: str) -> list[float]:
    return list(scalars[tag].values) if tag in scalars else []
