"""``curves.png``: per arm, the mean curve over the finished seeds with a band of one standard deviation
(clipped to the range of the seeds)."""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import numpy as np

from lightning_gc.compare.events import Series
from lightning_gc.compare.summary import DIVERGED, FINISHED, GRAD_NORM, TRAIN_LOSS, Summary

_COLORS = {"baseline": "tab:blue", "gc": "tab:orange"}
_GC_RATIO = "gc/removed_norm_ratio"


class Curve(NamedTuple):
    """The runs of one arm on one tag: per step, their mean, standard deviation, lowest and highest value."""

    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @property
    def band(self) -> tuple[np.ndarray, np.ndarray]:
        """``mean ± std``, clipped to the runs' range: on a log axis a band below the lowest run would
        reach down to zero and say nothing."""
        return np.maximum(self.mean - self.std, self.low), np.minimum(self.mean + self.std, self.high)


def mean_curve(curves: list[Series]) -> Curve | None:
    """The mean curve of several runs' curves of one tag, with their spread.

    The runs of a comparison log at the same steps; where they do not, each curve is linearly interpolated
    onto the first one's steps, within its own range only. Non-finite points are left out.

    Example:
        >>> curve = mean_curve([Series(np.array([0, 1]), np.array([1.0, 3.0])),
        ...                     Series(np.array([0, 1]), np.array([3.0, 5.0]))])
        >>> curve.mean.tolist(), curve.std.tolist(), curve.low.tolist()
        ([2.0, 4.0], [1.0, 1.0], [1.0, 3.0])
    """
    curves = [c for c in curves if len(c)]
    if not curves:
        return None
    grid = curves[0].steps.astype(np.float64)
    stacked = np.full((len(curves), len(grid)), np.nan)
    for row, curve in zip(stacked, curves):
        keep = np.isfinite(curve.values)
        if keep.sum() == 0:
            continue
        steps, values = curve.steps[keep].astype(np.float64), curve.values[keep]
        inside = (grid >= steps.min()) & (grid <= steps.max())
        row[inside] = np.interp(grid[inside], steps, values)
    valid = np.isfinite(stacked).sum(axis=0) > 0
    kept = stacked[:, valid]
    return Curve(grid[valid], np.nanmean(kept, 0), np.nanstd(kept, 0), np.nanmin(kept, 0), np.nanmax(kept, 0))


def plot_curves(summary: Summary, path: str | os.PathLike[str], title: str = "") -> None:
    """Write the comparison's curves to ``path`` (PNG): training loss, the primary metric, and, when logged,
    ``train/grad_norm`` and ``gc/removed_norm_ratio``. Diverged runs are drawn as thin dashed lines.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    tags = [TRAIN_LOSS, summary.metric, GRAD_NORM, _GC_RATIO]
    logged = [t for t in tags if any(t in r.scalars for a in summary.arms.values() for r in a.runs)]
    logged = list(dict.fromkeys(logged))
    columns = min(max(len(logged), 1), 2)
    rows = max(math.ceil(len(logged) / columns), 1)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(logged) :]:
        ax.set_visible(False)
    for ax, tag in zip(axes.flat, logged):
        band: list[np.ndarray] = []
        diverged_drawn = False
        for arm in summary.arms.values():
            color = _COLORS.get(arm.arm)
            finished = [r.scalars[tag] for r in arm.with_status(FINISHED) if tag in r.scalars]
            curve = mean_curve(finished)
            if curve is not None:
                steps, mean = curve.steps, curve.mean
                low, high = curve.band
                label = f"{arm.arm} (mean of {len(finished)})" if len(finished) > 1 else arm.arm
                line = ax.plot(steps, mean, color=color, label=label, linewidth=1.3)[0]
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
                color = line.get_color()
                band += [low, high]
            for i, run in enumerate(arm.with_status(DIVERGED)):
                if tag in run.scalars:
                    series = run.scalars[tag]
                    dashed_label = f"{arm.arm} diverged" if i == 0 else None
                    ax.plot(series.steps, series.values, color=color, linestyle="--", linewidth=0.8, label=dashed_label)
                    diverged_drawn = True
        ax.set_title(tag)
        ax.set_xlabel("step")
        log_scale = tag in (TRAIN_LOSS, GRAD_NORM) and _all_positive(summary, tag)
        if log_scale:
            ax.set_yscale("log")
        if diverged_drawn and band:
            _zoom_to(ax, np.concatenate(band), log_scale)  # a diverged run's blow-up would flatten the rest
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # an arm with no finished or diverged run draws nothing
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _zoom_to(ax: Any, values: np.ndarray, log_scale: bool) -> None:
    values = values[np.isfinite(values)]
    if log_scale:
        values = values[values > 0]
    if not len(values):
        return
    low, high = float(values.min()), float(values.max())
    if log_scale:
        ax.set_ylim(low / 2, high * 4)
    else:
        pad = 0.1 * (high - low) or 0.1 * abs(high) or 1.0
        ax.set_ylim(low - pad, high + 3 * pad)


def _all_positive(summary: Summary, tag: str) -> bool:
    values = [r.scalars[tag].values for a in summary.arms.values() for r in a.runs if tag in r.scalars]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    return bool(len(finite)) and bool((finite > 0).all())
