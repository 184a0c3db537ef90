"""curves.png: the mean curve and its band, and a real PNG written with matplotlib's Agg backend."""

import numpy as np
import pytest

from lightning_gc.compare.events import Series
from lightning_gc.compare.plot import mean_curve, plot_curves
from lightning_gc.compare.summary import DIVERGED, FINISHED, RunRecord, summarize


def _series(steps, values):
    return Series(np.asarray(steps), np.asarray(values, dtype=np.float64))


def test_mean_curve_averages_runs_step_by_step():
    curve = mean_curve([_series([0, 2, 4], [1.0, 2.0, 3.0]), _series([0, 2, 4], [3.0, 4.0, 9.0])])
    assert curve.steps.tolist() == [0, 2, 4]
    assert curve.mean.tolist() == [2.0, 3.0, 6.0]
    assert curve.std.tolist() == [1.0, 1.0, 3.0]
    assert (curve.low.tolist(), curve.high.tolist()) == ([1.0, 2.0, 3.0], [3.0, 4.0, 9.0])


def test_the_band_is_one_std_clipped_to_the_runs_range():
    # three runs at one step: 1, 1, 10 -> mean 4, population std sqrt(18): mean - std < 1 is clipped to 1
    curve = mean_curve([_series([0], [1.0]), _series([0], [1.0]), _series([0], [10.0])])
    low, high = curve.band
    assert low.tolist() == [1.0]
    assert high.tolist() == pytest.approx([4.0 + 18**0.5])


def test_mean_curve_interpolates_other_steps_within_their_range_and_skips_non_finite():
    # the second run logged at odd steps up to 3 only: at step 2 it is interpolated (3+5)/2, at 4 it is absent
    curve = mean_curve([_series([0, 2, 4], [2.0, 2.0, 2.0]), _series([1, 3], [3.0, 5.0])])
    assert curve.steps.tolist() == [0, 2, 4]
    assert curve.mean.tolist() == pytest.approx([2.0, (2.0 + 4.0) / 2, 2.0])
    curve = mean_curve([_series([0, 1, 2], [1.0, float("nan"), 3.0])])
    assert curve.mean.tolist() == [1.0, 2.0, 3.0]  # a NaN between finite points: interpolated from its neighbours
    curve = mean_curve([_series([0, 1], [1.0, float("nan")])])
    assert curve.steps.tolist() == [0]  # after the last finite point there is nothing to show
    assert mean_curve([]) is None


def test_plot_writes_a_png_with_a_diverged_run(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    records = []
    for arm, seed, status in [("baseline", 0, FINISHED), ("gc", 0, FINISHED), ("gc", 1, DIVERGED)]:
        run_dir = tmp_path / arm / f"seed_{seed}"
        writer = SummaryWriter(str(run_dir))
        for step in range(10):
            loss = (
                float("nan")
                if status == DIVERGED and step > 6
                else 1.0 / (step + 1) * (1e6 if step > 4 and status == DIVERGED else 1)
            )
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("gc/removed_norm_ratio", 0.3, step) if arm == "gc" else None
        writer.add_scalar("val/acc", 0.5, 9)
        writer.close()
        records.append(
            RunRecord(arm, seed, status, run_dir, run_dir / "train.log", 0, 7 if status == DIVERGED else None)
        )
    plot_curves(summarize(records, "val/acc", "max"), tmp_path / "curves.png", title="t")
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
