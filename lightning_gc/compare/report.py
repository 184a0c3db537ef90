"""The summary as people and programs read it: a Markdown table with notes, and CSV files."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

from lightning_gc.compare.stats import TARGET_TOLERANCE, Aggregate
from lightning_gc.compare.summary import (
    COLLAPSED,
    CONSTANT_MARGIN,
    DIVERGED,
    FAILED,
    FINISHED,
    MEASURES,
    VANISHING_RATIO,
    ArmSummary,
    Summary,
    matching_test_metric,
)


def labels(summary: Summary) -> dict[str, str]:
    """The row label of each measure, naming the metric and target it was computed on."""
    reach = "≥" if summary.mode == "max" else "≤"
    target = "target (n/a)" if summary.target is None else f"{summary.target:.4g}"
    return {
        "final": f"final {summary.metric}",
        "best": f"best {summary.metric}",
        "steps_to_target": f"steps to {summary.metric} {reach} {target}",
        "loss_oscillation": "train/loss oscillation",
        "grad_norm_cv": "train/grad_norm CV",
        "train_val_gap": "train-val gap (val/loss − train/loss)",
        "test": f"{matching_test_metric(summary.metric) or 'test metric'} (best checkpoint)",
    }


def markdown(
    summary: Summary, title: str, context: Sequence[str] = (), relative_to: str | os.PathLike[str] = "."
) -> str:
    """The summary as Markdown: a title, context lines, the table (a column per arm, then each arm's
    difference from the first arm) and notes on the target and on every run left out of the means.

    Args:
        summary: what :func:`~lightning_gc.compare.summary.summarize` returned.
        title: the heading.
        context: lines under the heading (project, seeds, settings).
        relative_to: log paths in the notes are shown relative to this folder when inside it.
    """
    arms = list(summary.arms.values())
    reference, others = arms[0], arms[1:]
    header = ["", *(a.arm for a in arms), *(f"{a.arm} − {reference.arm}" for a in others)]
    rows = [["runs", *(runs_cell(a) for a in arms), *("" for _ in others)]]
    names = labels(summary)
    for measure in MEASURES:
        aggregates = [a.aggregates[measure] for a in arms]
        if all(g.n == 0 for g in aggregates) and measure in ("test", "grad_norm_cv"):
            continue  # the project does not log it
        integer = measure == "steps_to_target"
        row = [names[measure]]
        for arm, aggregate in zip(arms, aggregates):
            cell = plus_minus(aggregate, integer=integer)
            finished = arm.count(FINISHED)
            if measure == "steps_to_target" and finished and aggregate.n < finished:
                cell += f" (reached {aggregate.n}/{finished})"
            row.append(cell)
        row += [difference(aggregate, aggregates[0], integer=integer) for aggregate in aggregates[1:]]
        rows.append(row)
    lines = [
        f"## {title}",
        "",
        *context,
        "" if context else None,
        *table(header, rows),
        "",
        *_notes(summary, relative_to),
    ]
    return "\n".join(line for line in lines if line is not None).rstrip() + "\n"


def write_summary_csv(summary: Summary, path: str | os.PathLike[str]) -> None:
    """One row per arm and measure: ``arm, measure, label, mean, std, display, n, runs, finished, collapsed,
    diverged, failed`` (``display``: ``mean ± std`` as the tables show it)."""
    names = labels(summary)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "arm",
                "measure",
                "label",
                "mean",
                "std",
                "display",
                "n",
                "runs",
                "finished",
                "collapsed",
                "diverged",
                "failed",
            ]
        )
        for arm in summary.arms.values():
            counts = [len(arm.runs), *(arm.count(s) for s in (FINISHED, COLLAPSED, DIVERGED, FAILED))]
            for measure in MEASURES:
                g = arm.aggregates[measure]
                shown = plus_minus(g, integer=measure == "steps_to_target")
                writer.writerow([arm.arm, measure, names[measure], _num(g.mean), _num(g.std), shown, g.n, *counts])


def write_runs_csv(summary: Summary, path: str | os.PathLike[str]) -> None:
    """One row per run, with its status, every measure, and where its log is."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "arm",
                "seed",
                "status",
                *MEASURES,
                "diverged_at_step",
                "returncode",
                "seconds",
                "job_id",
                "log",
                "command",
            ]
        )
        for arm in summary.arms.values():
            for run in arm.runs:
                r = run.record
                measures = [_num(run.values[m]) for m in MEASURES]
                writer.writerow(
                    [
                        r.arm,
                        r.seed,
                        r.status,
                        *measures,
                        _num(r.diverged_at_step),
                        _num(r.returncode),
                        f"{r.seconds:.1f}",
                        r.job_id or "",
                        r.log,
                        r.command,
                    ]
                )


def runs_cell(arm: ArmSummary) -> str:
    """``"3/5 finished, collapsed 1/5, diverged 1/5"``: how the arm's runs ended."""
    total = len(arm.runs)
    parts = [f"{arm.count(FINISHED)}/{total} finished"]
    parts += [f"{status} {arm.count(status)}/{total}" for status in (COLLAPSED, DIVERGED, FAILED) if arm.count(status)]
    return ", ".join(parts)


def plus_minus(aggregate: Aggregate, integer: bool = False) -> str:
    """``mean ± std`` with both rounded to the std's first significant digit (two when it is a 1):
    ``0.948 ± 0.009``; one value (4 significant digits) for a single run; ``n/a`` for none.

    Example:
        >>> plus_minus(Aggregate(0.948, 0.008718, 3)), plus_minus(Aggregate(0.6347, 0.1402, 3))
        ('0.948 ± 0.009', '0.63 ± 0.14')
        >>> plus_minus(Aggregate(104.0, 36.2, 3), integer=True), plus_minus(Aggregate(0.094, float("nan"), 1))
        ('104 ± 36', '0.094')
    """
    if aggregate.n == 0 or not math.isfinite(aggregate.mean):
        return "n/a"
    if aggregate.n == 1 or not math.isfinite(aggregate.std):
        return f"{aggregate.mean:.0f}" if integer else f"{aggregate.mean:.4g}"
    places = 0 if integer else _decimals(aggregate.std, aggregate.mean)
    return f"{aggregate.mean:.{places}f} ± {aggregate.std:.{places}f}"


def difference(aggregate: Aggregate, reference: Aggregate, integer: bool = False) -> str:
    """``aggregate.mean - reference.mean``, signed, to the precision of the coarser of the two spreads.

    Example:
        >>> difference(Aggregate(0.954, 0.005291, 3), Aggregate(0.948, 0.008718, 3))
        '+0.006'
    """
    value = aggregate.mean - reference.mean
    if not math.isfinite(value):
        return "n/a"
    if integer:
        return f"{value:+.0f}"
    spreads = [g.std for g in (aggregate, reference) if g.n > 1 and math.isfinite(g.std)]
    if not spreads:
        return f"{value:+.4g}"
    places = min(_decimals(std, mean) for std, mean in zip(spreads, (aggregate.mean, reference.mean)))
    return f"{value:+.{places}f}"


def _decimals(std: float, mean: float) -> int:
    """Decimal places of ``std``'s first significant digit (second when the first is 1); for a zero spread,
    those of ``mean`` to 4 significant digits."""
    value = std if std > 0 else abs(mean)
    if value == 0:
        return 0
    exponent = math.floor(math.log10(value))
    if std > 0:
        leading = value / 10.0**exponent
        return max(0, -exponent + (1 if leading < 2 else 0))
    return max(0, 3 - exponent)


def _num(value: object) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]


def _notes(summary: Summary, relative_to: str | os.PathLike[str]) -> list[str]:
    notes = [
        "Mean ± sample standard deviation over the seeds whose runs finished, rounded to the first significant"
        " digit of the spread; one value when only one run counts."
    ]
    finished = sum(a.count(FINISHED) for a in summary.arms.values())
    if not finished:
        notes.append("No run finished: there is nothing to average.")
    elif summary.target is None:
        notes.append(f"Steps to target: n/a, the best {summary.metric} is not positive; pass `--target`.")
    elif not summary.target_given:
        notes.append(
            f"Target {summary.target:.4g}: within {TARGET_TOLERANCE:.0%} of the best {summary.metric} any finished run"
            " reached (set it with `--target`)."
        )
    for arm in summary.arms.values():
        collapsed = arm.with_status(COLLAPSED)
        if collapsed:
            why = "; ".join(f"seed_{r.record.seed}: {r.record.collapse}" for r in collapsed)
            notes.append(f"{arm.arm}: collapsed {len(collapsed)}/{len(arm.runs)} ({why}); left out of the means.")
        diverged = arm.with_status(DIVERGED)
        if diverged:
            where = ", ".join(f"seed_{r.record.seed} at step {r.record.diverged_at_step}" for r in diverged)
            notes.append(
                f"{arm.arm}: diverged {len(diverged)}/{len(arm.runs)} ({where}): training loss turned non-finite, run"
                " stopped early; left out of the means."
            )
        for run in arm.with_status(FAILED):
            r = run.record
            code = "did not start" if r.returncode is None else f"exit code {r.returncode}"
            notes.append(f"{r.name} failed ({code}), see {_shown(r.log, relative_to)}; left out of the means.")
    if any(a.count(COLLAPSED) for a in summary.arms.values()):
        notes.append(COLLAPSE_RULE)
    return [f"- {n}" for n in notes]


COLLAPSE_RULE = (
    f"Collapsed: finished but dead, when the final metric is no better than a constant predictor's (the validation"
    f" labels' majority-class share for an accuracy, or `--chance`) by more than {CONSTANT_MARGIN:.0%} of it, or"
    f" when the gradients vanished (mean of the last 10% of train/grad_norm below {VANISHING_RATIO:g} of its"
    " largest value)."
)


def _shown(path: Path, relative_to: str | os.PathLike[str]) -> str:
    try:
        return Path(path).resolve().relative_to(Path(relative_to).resolve()).as_posix()
    except ValueError:
        return str(path)
