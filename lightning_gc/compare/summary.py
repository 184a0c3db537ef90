"""From finished runs to one summary per arm: which runs count, their measures, mean and spread."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

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
# A run that finished but is dead: see `collapse_reason` for the rule.
COLLAPSED = "collapsed"
STATUSES = (FINISHED, COLLAPSED, DIVERGED, FAILED)
# Collapsed: the final metric is no better than a constant predictor's, within this share of its value ...
CONSTANT_MARGIN = 0.1
# ... or the gradients vanished: the last logged gradient norms are below this share of the run's largest.
VANISHING_RATIO = 1e-3
TRAIN_LOSS, GRAD_NORM, VAL_LOSS = "train/loss", "train/grad_norm", "val/loss"
MEASURES = ("final", "best", "steps_to_target", "loss_oscillation", "grad_norm_cv", "train_val_gap", "test")


@dataclass(frozen=True)
class RunRecord:
    """How one run ended.

    Args:
        arm: ``"baseline"`` or ``"gc"``.
        seed: the ``seed_everything`` of the run.
        status: ``"finished"``, ``"collapsed"`` (finished but dead, decided by :func:`summarize`),
            ``"diverged"`` (training loss turned non-finite; stopped early) or ``"failed"``.
        run_dir: the TensorBoard run folder, ``OUT/[<point>/]<arm>/seed_<seed>``.
        log: the run's console output.
        returncode: the training process's exit code (``None`` if it never started).
        diverged_at_step: the global step at which the loss was first non-finite.
        seconds: wall-clock time of the run.
        point: the sweep point (``"model.lr=0.1"``), ``""`` outside a sweep.
        job_id: the SLURM job of the run (``"1234_5"`` for an array task), ``None`` when run locally.
        command: a shell line that reruns the run after the comparison (``cd PROJECT && ENV=... python ...``).
        chance: the primary metric's value for a constant predictor of the validation labels (their majority
            class's share), when the run could count them; ``None`` otherwise.
        collapse: why the run counts as collapsed (``""`` when it does not).
    """

    arm: str
    seed: int
    status: str
    run_dir: Path
    log: Path
    returncode: int | None = None
    diverged_at_step: int | None = None
    seconds: float = 0.0
    point: str = ""
    job_id: str | None = None
    command: str = ""
    chance: float | None = None
    collapse: str = ""

    @property
    def name(self) -> str:
        """``"[<point> ]<arm> seed_<seed>"``, as the summary's notes name the run."""
        return f"{self.point + ' ' if self.point else ''}{self.arm} seed_{self.seed}"


@dataclass
class RunMeasures:
    """A run with its measures (``None`` where the curve does not give one) and its scalars."""

    record: RunRecord
    values: dict[str, float | None]
    scalars: dict[str, Series] = field(repr=False)


@dataclass
class ArmSummary:
    """The runs of one arm and the aggregates over those that finished.

    Collapsed, diverged and failed runs are listed but left out of every aggregate.
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
    records: Sequence[RunRecord],
    metric: str,
    mode: str,
    target: float | None = None,
    arms: Sequence[str] = (),
    chance: float | None = None,
) -> Summary:
    """Read every run's event files, mark dead runs collapsed and aggregate the measures per arm.

    Args:
        records: the runs, in any order.
        metric: the primary validation metric.
        mode: ``"max"`` or ``"min"``.
        target: the value ``steps_to_target`` waits for; default :func:`~lightning_gc.compare.stats.default_target`
            over the best values of the finished runs of all arms.
        arms: the order of the arms in the summary (default: order of first appearance).
        chance: the metric a constant predictor scores (``--chance``); default: each run's own ``chance``
            when ``metric`` is an accuracy.
    """
    read = [(r, read_scalars(r.run_dir) if r.status != FAILED else {}) for r in records]
    read = [(_classified(r, tags, metric, mode, chance), tags) for r, tags in read]
    records = [r for r, _ in read]
    scalars = {id(r): tags for r, tags in read}
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


def collapse_reason(scalars: dict[str, Series], metric: str, mode: str, chance: float | None) -> str:
    """Why a finished run counts as collapsed (dead), or ``""``. The rule:

    * its final ``metric`` is no better than ``chance`` (a constant predictor's value) by more than
      ``CONSTANT_MARGIN`` of it: ``final <= chance + 0.1 |chance|`` for ``mode="max"``
      (``final >= chance - 0.1 |chance|`` for ``"min"``); or
    * its gradients vanished: the mean of the last 10% (at least 3) of the logged ``train/grad_norm`` is below
      ``VANISHING_RATIO`` (1e-3) of the largest one it logged.

    Example:
        >>> import numpy as np
        >>> acc = {"val/acc": Series(np.array([10, 20]), np.array([0.5, 0.104]))}
        >>> collapse_reason(acc, "val/acc", "max", chance=0.112)
        'final val/acc 0.104 is no better than a constant predictor (0.112)'
        >>> collapse_reason(acc, "val/acc", "max", chance=None)
        ''
    """
    series = scalars.get(metric)
    if chance is not None and series is not None and len(series) and math.isfinite(series.last):
        final, margin = series.last, CONSTANT_MARGIN * abs(chance)
        if (final <= chance + margin) if mode == "max" else (final >= chance - margin):
            return f"final {metric} {final:.3g} is no better than a constant predictor ({chance:.3g})"
    norms = scalars.get(GRAD_NORM)
    if norms is not None:
        values = norms.values[np.isfinite(norms.values)]
        tail = values[-max(3, len(values) // 10) :]
        if len(values) >= 6 and values.max() > 0 and tail.mean() < VANISHING_RATIO * values.max():
            return f"gradients vanished: final train/grad_norm {tail.mean():.2g}, {values.max():.2g} at most"
    return ""


def is_accuracy(metric: str) -> bool:
    """Whether ``metric`` names an accuracy, for which a constant predictor scores the majority class's share.

    Example:
        >>> is_accuracy("val/acc"), is_accuracy("val/accuracy"), is_accuracy("val/loss")
        (True, True, False)
    """
    leaf = metric.rsplit("/", 1)[-1].lower()
    return leaf in ("acc", "accuracy") or leaf.endswith(("_acc", "_accuracy"))


def _classified(
    record: RunRecord, scalars: dict[str, Series], metric: str, mode: str, chance: float | None
) -> RunRecord:
    if record.status not in (FINISHED, COLLAPSED):
        return record
    own = record.chance if is_accuracy(metric) and mode == "max" else None
    reason = collapse_reason(scalars, metric, mode, chance if chance is not None else own)
    return replace(record, status=COLLAPSED if reason else FINISHED, collapse=reason)


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
