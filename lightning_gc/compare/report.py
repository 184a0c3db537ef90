"""The summary as people and programs read it: a Markdown table with notes, and CSV files."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

from lightning_gc.compare.stats import TARGET_TOLERANCE, Aggregate
from lightning_gc.compare.summary import DIVERGED, FAILED, FINISHED, MEASURES, Summary, matching_test_metric


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


def markdown(summary: Summary, title: str, context: Sequence[str] = (), relative_to: str | os.PathLike = ".") -> str:
    """The summary as Markdown: a title, context lines, the table (a column per arm, then the difference)
    and notes on the target and on every run left out of the means.

    Args:
        summary: what :func:`~lightning_gc.compare.summary.summarize` returned.
        title: the heading.
        context: lines under the heading (project, seeds, settings).
        relative_to: log paths in the notes are shown relative to this folder when inside it.
    """
    arms = list(summary.arms.values())
    header = ["", *(a.arm for a in arms)]
    two = len(arms) == 2
    if two:
        header.append(f"{arms[1].arm} − {arms[0].arm}")
    rows = [["runs", *(_runs_cell(a.count(FINISHED), a.count(DIVERGED), a.count(FAILED), len(a.runs)) for a in arms)]]
    if two:
        rows[0].append("")
    names = labels(summary)
    for measure in MEASURES:
        aggregates = [a.aggregates[measure] for a in arms]
        if all(g.n == 0 for g in aggregates) and measure in ("test", "grad_norm_cv"):
            continue  # the project does not log it
        row = [names[measure]]
        for arm, aggregate in zip(arms, aggregates):
            cell = _cell(aggregate, integer=measure == "steps_to_target")
            finished = arm.count(FINISHED)
            if measure == "steps_to_target" and finished and aggregate.n < finished:
                cell += f" (reached {aggregate.n}/{finished})"
            row.append(cell)
        if two:
            row.append(_signed(aggregates[1].mean - aggregates[0].mean, integer=measure == "steps_to_target"))
        rows.append(row)
    lines = [
        f"## {title}",
        "",
        *context,
        "" if context else None,
        *_table(header, rows),
        "",
        *_notes(summary, relative_to),
    ]
    return "\n".join(line for line in lines if line is not None).rstrip() + "\n"


def write_summary_csv(summary: Summary, path: str | os.PathLike) -> None:
    """One row per arm and measure: ``arm, measure, label, mean, std, n, runs, finished, diverged, failed``."""
    names = labels(summary)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "measure", "label", "mean", "std", "n", "runs", "finished", "diverged", "failed"])
        for arm in summary.arms.values():
            counts = [len(arm.runs), arm.count(FINISHED), arm.count(DIVERGED), arm.count(FAILED)]
            for measure in MEASURES:
                g = arm.aggregates[measure]
                writer.writerow([arm.arm, measure, names[measure], _num(g.mean), _num(g.std), g.n, *counts])


def write_runs_csv(summary: Summary, path: str | os.PathLike) -> None:
    """One row per run, with its status, every measure, and where its log is."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "seed", "status", *MEASURES, "diverged_at_step", "returncode", "seconds", "log"])
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
                        r.log,
                    ]
                )


def _runs_cell(finished: int, diverged: int, failed: int, total: int) -> str:
    parts = [f"{finished}/{total} finished"]
    if diverged:
        parts.append(f"diverged {diverged}/{total}")
    if failed:
        parts.append(f"failed {failed}/{total}")
    return ", ".join(parts)


def _cell(aggregate: Aggregate, integer: bool = False) -> str:
    if aggregate.n == 0:
        return "n/a"
    fmt = "{:.0f}" if integer else "{:.4g}"
    if aggregate.n == 1:
        return fmt.format(aggregate.mean)
    return f"{fmt.format(aggregate.mean)} ± {fmt.format(aggregate.std)}"


def _signed(value: float, integer: bool = False) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:+.0f}" if integer else f"{value:+.4g}"


def _num(value: object) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]


def _notes(summary: Summary, relative_to: str | os.PathLike) -> list[str]:
    notes = ["Mean ± sample standard deviation over the seeds whose runs finished; one value when only one did."]
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
    return [f"- {n}" for n in notes]


def _shown(path: Path, relative_to: str | os.PathLike) -> str:
    try:
        return Path(path).resolve().relative_to(Path(relative_to).resolve()).as_posix()
    except ValueError:
        return str(path)
