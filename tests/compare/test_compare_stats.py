"""The measures against values computed by hand (float64, written out in the test)."""

import math

import numpy as np
import pytest

from lightning_gc.compare.stats import (
    Aggregate,
    best_value,
    coefficient_of_variation,
    default_target,
    loss_oscillation,
    steps_to_target,
    train_val_gap,
)


def test_loss_oscillation_is_the_mean_absolute_second_difference():
    loss = [2.0, 1.0, 1.5, 0.5, 0.75]
    # second differences: 2.0-2*1.0+1.5 ... written out: (1.5-2+2)=1.5, (0.5-3+1)=-1.5, (0.75-1+1.5)=1.25
    assert loss_oscillation(loss) == pytest.approx((1.5 + 1.5 + 1.25) / 3)


def test_loss_oscillation_ignores_a_steady_trend_and_needs_three_points():
    assert loss_oscillation(np.linspace(3.0, 1.0, 9, dtype=np.float64)) == pytest.approx(0.0, abs=1e-15)
    assert math.isnan(loss_oscillation([1.0, 0.5]))


def test_coefficient_of_variation_is_population_std_over_mean():
    values = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]  # mean 5, population std 2
    assert coefficient_of_variation(values) == pytest.approx(0.4)
    assert math.isnan(coefficient_of_variation([3.0]))
    assert math.isnan(coefficient_of_variation([-1.0, 1.0]))  # mean 0: no relative spread


@pytest.mark.parametrize(
    ("mode", "target", "expected"),
    [("max", 0.8, 30), ("max", 0.95, None), ("min", 0.25, 20), ("min", 0.05, None)],
)
def test_steps_to_target_is_the_first_step_reaching_it(mode, target, expected):
    steps = [10, 20, 30, 40]
    values = [0.5, 0.2, 0.85, 0.9] if mode == "max" else [0.5, 0.2, 0.3, 0.1]
    assert steps_to_target(steps, values, target, mode) == expected


def test_steps_to_target_skips_non_finite_values():
    assert steps_to_target([1, 2, 3], [float("nan"), float("inf"), 0.9], 0.5, "max") == 3


def test_best_value_follows_the_mode_and_skips_non_finite():
    assert best_value([0.3, float("nan"), 0.7, 0.5], "max") == 0.7
    assert best_value([0.3, float("-inf"), 0.7], "min") == 0.3
    assert math.isnan(best_value([float("nan")], "max"))


def test_train_val_gap_uses_the_training_loss_of_the_last_validation_interval():
    train_steps = [0, 1, 2, 3, 4, 5]
    train_loss = [1.0, 0.9, 0.8, 0.6, 0.5, 0.4]
    # validations after steps 2 and 5: the last interval holds steps 3, 4, 5 -> mean 0.5
    assert train_val_gap(train_steps, train_loss, [2, 5], [0.85, 0.7]) == pytest.approx(0.7 - 0.5)
    # a single validation: every training point up to it
    assert train_val_gap(train_steps, train_loss, [2], [1.0]) == pytest.approx(1.0 - 0.9)
    assert math.isnan(train_val_gap(train_steps, train_loss, [], []))


def test_default_target_is_within_five_percent_of_the_best():
    assert default_target([0.8, float("nan"), 0.9], "max") == pytest.approx(0.855)
    assert default_target([0.4, 0.2], "min") == pytest.approx(0.21)
    assert default_target([-1.0, -2.0], "max") is None  # a relative target of a negative best is meaningless
    assert default_target([], "max") is None


def test_aggregate_uses_the_sample_standard_deviation_over_measured_runs():
    aggregate = Aggregate.of([0.90, 0.94, None, float("nan"), 0.92])
    assert aggregate.n == 3
    assert aggregate.mean == pytest.approx(0.92)
    assert aggregate.std == pytest.approx(math.sqrt((0.02**2 + 0.02**2 + 0.0) / 2))
    single = Aggregate.of([0.5])
    assert (single.mean, single.n) == (0.5, 1) and math.isnan(single.std)
    assert Aggregate.of([]).n == 0
