"""Sweeps: ``--sweep KEY=V1,V2,...`` (a grid when repeated), each arm's stable range, ``sweep.csv`` and ``sweep.png``."""

from __future__ import annotations

import csv
import itertools
import math
import os
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightning_gc.compare.project import ProjectError
from lightning_gc.compare.report import labels, plus_minus, runs_cell, table
from lightning_gc.compare.summary import COLLAPSED, DIVERGED, FAILED, FINISHED, ArmSummary, Summary

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")
STABLE_RULE = "Stable: every seed of the arm finished at that value, none collapsed, diverged or failed."


@dataclass(frozen=True)
class Axis:
    """One swept LightningCLI key and its values, as given.

    Example:
        >>> Axis.parse("model.lr=0.01,0.1")
        Axis(key='model.lr', values=('0.01', '0.1'))
    """

    key: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, spec: str) -> Axis:
        """``KEY=V1,V2,...``, or a :class:`ProjectError` naming ``--sweep`` and the form it takes."""
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            raise ProjectError(
                f"`--sweep` must be KEY=V1,V2,... with a LightningCLI key such as model.lr, got {spec!r}"
            )
        items = tuple(v.strip() for v in values.split(","))
        if not items or any(not v for v in items):
            raise ProjectError(f"`--sweep {key}=...` needs one or more comma-separated values, got {values!r}")
        if len(set(items)) != len(items):
            raise ProjectError(f"`--sweep {key}=...` lists a value twice: {values!r}")
        return cls(key, items)

    @property
    def numeric(self) -> bool:
        """Whether every value is a finite number (then plotted on a numeric axis)."""
        return all(_number(v) is not None for v in self.values)


@dataclass(frozen=True)
class Point:
    """One point of the sweep grid: a value for each swept key."""

    settings: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        """The point's folder name, ``model.lr=0.1`` (``,`` between keys), with unsafe characters as ``_``.

        Example:
            >>> Point((("model.lr", "0.1"), ("data.batch_size", "32"))).name
            'model.lr=0.1,data.batch_size=32'
        """
        return ",".join(f"{k}={_UNSAFE.sub('_', v)}" for k, v in self.settings)

    @property
    def args(self) -> tuple[str, ...]:
        """The point's LightningCLI arguments, ``("--model.lr", "0.1")``."""
        return tuple(a for k, v in self.settings for a in (f"--{k}", v))

    def value(self, key: str) -> str:
        """The point's value of ``key``."""
        return dict(self.settings)[key]


def parse_sweeps(specs: Sequence[str]) -> list[Axis]:
    """The axes of ``--sweep`` options; a key given twice is refused."""
    axes = [Axis.parse(s) for s in specs]
    keys = [a.key for a in axes]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ProjectError(f"`--sweep` names {', '.join(twice)} more than once; give each key's values in one option")
    return axes


def grid(axes: Sequence[Axis]) -> list[Point]:
    """Every combination of the axes' values, the first axis varying slowest.

    Raises:
        ProjectError: when two points would share a folder (values differing only in unsafe characters).

    Example:
        >>> [p.name for p in grid([Axis("a", ("1", "2")), Axis("b", ("x",))])]
        ['a=1,b=x', 'a=2,b=x']
    """
    points = [
        Point(tuple(zip((a.key for a in axes), values))) for values in itertools.product(*(a.values for a in axes))
    ]
    names = [p.name for p in points]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ProjectError(f"`--sweep`: several points would share the folder {clash[0]}; use values that differ")
    return points


def stable(arm: ArmSummary) -> bool:
    """The rule of the stable range: every run of the arm at this point finished (see ``STABLE_RULE``)."""
    return bool(arm.runs) and arm.count(FINISHED) == len(arm.runs)


def stable_ranges(axes: Sequence[Axis], points: Sequence[Point], summaries: Sequence[Summary]) -> dict[str, str]:
    """Per arm, a sentence on where it was stable: for one swept key, a range of its values when they are
    adjacent in the sweep ("0.02 to 0.1 (3 of 4 values)"), else the list; for a grid, the stable points."""
    arms = list(summaries[0].arms) if summaries else []
    out = {}
    for arm in arms:
        flags = [stable(s.arms[arm]) for s in summaries]
        unstable = [
            f"{_point_text(axes, p)} ({_what_went_wrong(s.arms[arm])})"
            for p, s, ok in zip(points, summaries, flags)
            if not ok
        ]
        if not any(flags):
            text = "stable nowhere in the sweep"
        elif len(axes) == 1:
            values = [p.value(axes[0].key) for p, ok in zip(points, flags) if ok]
            first, last = flags.index(True), len(flags) - 1 - flags[::-1].index(True)
            adjacent = all(flags[first : last + 1])
            shown = f"{values[0]} to {values[-1]}" if adjacent and len(values) > 1 else ", ".join(values)
            text = f"{axes[0].key} {shown} ({len(values)} of {len(flags)} values)"
        else:
            text = "; ".join(_point_text(axes, p) for p, ok in zip(points, flags) if ok)
        if unstable:
            text += "; not at " + "; ".join(unstable)
        out[arm] = text
    return out


def sweep_markdown(
    axes: Sequence[Axis], points: Sequence[Point], summaries: Sequence[Summary], title: str, context: Sequence[str]
) -> str:
    """The sweep's Markdown: a row per point and arm (runs, final and best metric), then each arm's stable range."""
    if not summaries:
        return f"## {title}\n"
    names = labels(summaries[0])
    header = [*(a.key for a in axes), "arm", "runs", names["final"], names["best"]]
    rows = []
    for point, summary in zip(points, summaries):
        for arm in summary.arms.values():
            values = [point.value(a.key) for a in axes]
            rows.append(
                [
                    *values,
                    arm.arm,
                    runs_cell(arm),
                    plus_minus(arm.aggregates["final"]),
                    plus_minus(arm.aggregates["best"]),
                ]
            )
    ranges = stable_ranges(axes, points, summaries)
    lines = [
        f"## {title}",
        "",
        *context,
        "",
        *table(header, rows),
        "",
        "Stable range (" + STABLE_RULE.rstrip(".").replace("Stable: ", "") + "):",
        "",
        *(f"- {arm}: {text}" for arm, text in ranges.items()),
        "",
        "- Mean ± sample standard deviation over the seeds that finished (collapsed, diverged and failed runs are"
        " counted in `runs` and left out), rounded to the first significant digit of the spread.",
        "- Per point: `<point>/summary.md` (every measure, notes on each run left out); `sweep.csv`, `sweep.png`.",
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_sweep_csv(
    axes: Sequence[Axis], points: Sequence[Point], summaries: Sequence[Summary], path: str | os.PathLike[str]
) -> None:
    """One row per point and arm: the swept keys, ``arm``, run counts, the metric's and steps to target's mean,
    std and display (``mean ± std`` as the tables show it), the target, and whether the arm was stable there."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                *(a.key for a in axes), "arm", "point", "runs", FINISHED, COLLAPSED, DIVERGED, FAILED, "metric",
                "metric_mean", "metric_std", "metric_display", "target", "steps_to_target_mean",
                "steps_to_target_std", "steps_to_target_display", "stable",
            ]
        )  # fmt: skip
        for point, summary in zip(points, summaries):
            for arm in summary.arms.values():
                final, steps = arm.aggregates["final"], arm.aggregates["steps_to_target"]
                writer.writerow(
                    [
                        *(point.value(a.key) for a in axes), arm.arm, point.name, len(arm.runs),
                        *(arm.count(s) for s in (FINISHED, COLLAPSED, DIVERGED, FAILED)), summary.metric,
                        _num(final.mean), _num(final.std), plus_minus(final), _num(summary.target),
                        _num(steps.mean), _num(steps.std), plus_minus(steps, integer=True),
                        "yes" if stable(arm) else "no",
                    ]
                )  # fmt: skip


def plot_sweep(
    axes: Sequence[Axis],
    points: Sequence[Point],
    summaries: Sequence[Summary],
    path: str | os.PathLike[str],
    title: str = "",
) -> None:
    """``sweep.png``: the final metric against the first swept key, a line per arm (mean over finished seeds)
    with a ±1 std band and each finished seed as a dot; diverged seeds as ``x`` and collapsed ones as ``v`` at
    the bottom. Log axis when the values are positive numbers spanning a factor of 10 or more. One panel per
    combination of the other keys."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    first, rest = axes[0], list(axes[1:])
    panels = list(itertools.product(*(a.values for a in rest))) or [()]
    fig, grid_axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 3.9), squeeze=False)
    numbers = [_number(v) for v in first.values]
    numeric = first.numeric
    positions = np.array(numbers if numeric else range(len(first.values)), dtype=np.float64)
    log = numeric and min(positions) > 0 and max(positions) / min(positions) >= 10
    metric = summaries[0].metric if summaries else ""
    for ax, others in zip(grid_axes.flat, panels):
        marker_row = blended_transform_factory(ax.transData, ax.transAxes)
        arms = list(summaries[0].arms) if summaries else []
        for index, arm in enumerate(arms):
            xs, means, stds, color = [], [], [], f"C{index}"
            for x, value in zip(positions, first.values):
                summary = _summary_at(points, summaries, first.key, value, rest, others)
                if summary is None:
                    continue
                arm_summary = summary.arms[arm]
                final = arm_summary.aggregates["final"]
                if final.n:
                    xs.append(x)
                    means.append(final.mean)
                    stds.append(final.std if final.n > 1 else 0.0)
                seeds = [r.values["final"] for r in arm_summary.with_status(FINISHED) if r.values["final"] is not None]
                ax.scatter([x] * len(seeds), seeds, s=9, color=color, alpha=0.5, linewidths=0)
                for status, marker, height in ((DIVERGED, "x", 0.04), (COLLAPSED, "v", 0.09)):
                    count = arm_summary.count(status)
                    if count:
                        shift = _shifted(x, index, len(arms), log, positions)
                        ax.scatter(
                            [shift], [height], marker=marker, color=color, transform=marker_row, s=30, clip_on=False
                        )
                        ax.annotate(f"{count}", (shift, height), xycoords=marker_row, xytext=(4, -3),
                                    textcoords="offset points", fontsize=7, color=color)  # fmt: skip
            if xs:
                mean, std = np.array(means), np.array(stds)
                ax.plot(xs, mean, marker="o", color=color, label=arm, linewidth=1.4, markersize=4)
                ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        if log:
            ax.set_xscale("log")
        ax.set_xticks(positions, list(first.values))
        ax.minorticks_off() if log else None
        ax.set_xlabel(first.key)
        ax.set_ylabel(f"final {metric}")
        if rest:
            ax.set_title(", ".join(f"{a.key}={v}" for a, v in zip(rest, others)), fontsize=9)
        ax.grid(alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        from matplotlib.lines import Line2D

        handles += [
            Line2D([], [], marker="x", linestyle="", color="gray"),
            Line2D([], [], marker="v", linestyle="", color="gray"),
        ]
        names += ["diverged seeds (count)", "collapsed seeds (count)"]
        ax.legend(handles, names, fontsize=7)
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, 70 * len(panels))), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary_at(
    points: Sequence[Point],
    summaries: Sequence[Summary],
    key: str,
    value: str,
    rest: Sequence[Axis],
    others: tuple[str, ...],
) -> Summary | None:
    wanted = {key: value, **{a.key: v for a, v in zip(rest, others)}}
    for point, summary in zip(points, summaries):
        if dict(point.settings) == wanted:
            return summary
    return None


def _shifted(x: float, index: int, count: int, log: bool, positions: np.ndarray) -> float:
    """``x`` moved a little per arm, so the arms' markers at one value do not overlap."""
    offset = (index - (count - 1) / 2) * 0.04
    if log:
        return float(x * 10 ** (offset * math.log10(max(positions) / min(positions) or 10)))
    span = float(positions.max() - positions.min()) or 1.0
    return float(x + offset * span)


def _point_text(axes: Sequence[Axis], point: Point) -> str:
    return ", ".join(f"{k} {v}" for k, v in point.settings) if len(axes) > 1 else point.settings[0][1]


def _what_went_wrong(arm: ArmSummary) -> str:
    total = len(arm.runs)
    parts = [f"{s} {arm.count(s)}/{total}" for s in (COLLAPSED, DIVERGED, FAILED) if arm.count(s)]
    return ", ".join(parts) or "no runs"


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _num(value: object) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)
