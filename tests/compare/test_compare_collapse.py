"""Finished but dead runs are `collapsed`; numbers are shown to the precision of their spread."""

import math

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_gc.compare.report import difference, markdown, plus_minus
from lightning_gc.compare.runner import majority_share
from lightning_gc.compare.stats import Aggregate
from lightning_gc.compare.summary import COLLAPSED, FINISHED, RunRecord, summarize


def _run(tmp_path, name, final_acc, grad_norms, chance=None):
    run_dir = tmp_path / name
    writer = SummaryWriter(str(run_dir))
    for step, norm in enumerate(grad_norms):
        writer.add_scalar("train/loss", 2.3 - 0.01 * step, step)
        writer.add_scalar("train/grad_norm", norm, step)
    writer.add_scalar("val/acc", 0.5, 5)
    writer.add_scalar("val/acc", final_acc, len(grad_norms))
    writer.close()
    arm, seed = name.split("_")
    return RunRecord(arm, int(seed), FINISHED, run_dir, run_dir / "train.log", 0, None, 1.0, chance=chance)


def test_a_run_no_better_than_the_majority_class_is_collapsed(tmp_path):
    healthy = [1.0 - 0.005 * s for s in range(40)]
    # 10 classes, the largest holds 11.2% of the validation labels: a constant predictor scores 0.112
    records = [
        _run(tmp_path, "gc_0", 0.094, healthy, chance=0.112),  # below chance
        _run(tmp_path, "gc_1", 0.12, healthy, chance=0.112),  # within 10% of chance: no better
        _run(tmp_path, "gc_2", 0.13, healthy, chance=0.112),  # better than chance + 10%: alive
        _run(tmp_path, "baseline_0", 0.95, healthy, chance=0.112),
    ]
    summary = summarize(records, "val/acc", "max")
    gc = summary.arms["gc"]
    assert [r.record.status for r in gc.runs] == [COLLAPSED, COLLAPSED, FINISHED]
    assert gc.runs[0].record.collapse == "final val/acc 0.094 is no better than a constant predictor (0.112)"
    assert gc.aggregates["final"].n == 1  # collapsed runs are left out of the means, like diverged ones
    text = markdown(summary, "t")
    assert "1/3 finished, collapsed 2/3" in text
    assert "gc: collapsed 2/3 (seed_0: final val/acc 0.094 is no better than a constant predictor (0.112)" in text
    assert "Collapsed: finished but dead" in text  # the rule is stated


def test_vanishing_gradients_collapse_a_run_whatever_its_metric(tmp_path):
    dead = [1.0] * 20 + [5e-4] * 20  # mean of the last 10% (4 points) 5e-4 < 1e-3 x max 1.0
    alive = [1.0] * 20 + [2e-3] * 20
    summary = summarize([_run(tmp_path, "gc_0", 0.9, dead), _run(tmp_path, "gc_1", 0.9, alive)], "val/acc", "max")
    statuses = [r.record.status for r in summary.arms["gc"].runs]
    assert statuses == [COLLAPSED, FINISHED]
    assert summary.arms["gc"].runs[0].record.collapse.startswith("gradients vanished: final train/grad_norm 0.0005")


def test_chance_is_used_for_accuracies_only_unless_given(tmp_path):
    healthy = [1.0] * 40
    record = _run(tmp_path, "gc_0", 0.1, healthy, chance=0.112)
    assert summarize([record], "val/loss", "min").arms["gc"].runs[0].record.status == FINISHED
    given = summarize([_run(tmp_path, "gc_1", 0.52, healthy)], "val/acc", "max", chance=0.5)
    assert given.arms["gc"].runs[0].record.status == COLLAPSED  # 0.52 <= 0.5 + 0.05


def test_majority_share_of_label_counts():
    assert majority_share([28, 112, 60]) == pytest.approx(0.56)
    assert majority_share([]) is None and majority_share([0, 0]) is None


@pytest.mark.parametrize(
    ("mean", "std", "n", "integer", "shown"),
    [
        (0.948, 0.008718, 3, False, "0.948 ± 0.009"),  # the example
        (0.9507, 0.004163, 3, False, "0.951 ± 0.004"),
        (0.6347, 0.1402, 3, False, "0.63 ± 0.14"),  # a leading 1 keeps a second digit
        (0.7286, 0.8767, 3, False, "0.7 ± 0.9"),
        (12.34, 3.0, 2, False, "12 ± 3"),
        (104.0, 36.0, 3, True, "104 ± 36"),
        (188.0, 0.0, 2, True, "188 ± 0"),
        (0.5, 0.0, 2, False, "0.5000 ± 0.0000"),
        (0.094, math.nan, 1, False, "0.094"),
        (math.nan, math.nan, 0, False, "n/a"),
    ],
)
def test_mean_and_spread_share_their_precision(mean, std, n, integer, shown):
    assert plus_minus(Aggregate(mean, std, n), integer=integer) == shown


def test_differences_take_the_coarser_spread():
    assert difference(Aggregate(0.954, 0.005, 3), Aggregate(0.948, 0.0087, 3)) == "+0.006"
    assert difference(Aggregate(0.9, 0.1, 3), Aggregate(0.6347, 0.01, 3)) == "+0.27"
    assert difference(Aggregate(0.9, math.nan, 1), Aggregate(0.6347, math.nan, 1)) == "+0.2653"
    assert difference(Aggregate(math.nan, math.nan, 0), Aggregate(0.6, 0.1, 3)) == "n/a"


def test_three_arms_get_a_difference_column_each_against_the_first(tmp_path):
    norms = list(np.linspace(1, 0.5, 40))
    records = [
        _run(tmp_path, "baseline_0", 0.90, norms),
        _run(tmp_path, "gc_0", 0.92, norms),
        _run(tmp_path, "gcupdate_0", 0.95, norms),
    ]
    summary = summarize(records, "val/acc", "max", arms=["baseline", "gc", "gcupdate"])
    header = markdown(summary, "t").splitlines()[2]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "",
        "baseline",
        "gc",
        "gcupdate",
        "gc − baseline",
        "gcupdate − baseline",
    ]
    final_row = next(line for line in markdown(summary, "t").splitlines() if line.startswith("| final val/acc"))
    assert [c.strip() for c in final_row.strip("|").split("|")][-2:] == ["+0.02", "+0.05"]
