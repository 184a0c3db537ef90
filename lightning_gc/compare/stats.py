"""The per-run measures a comparison reports, each defined on the logged curves, and their mean and spread.

Every function takes plain arrays (``steps`` and ``values`` in logging order) and returns ``nan`` (or ``None``)
when the curve is too short for the measure to exist, never a made-up number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# A curve's values or steps: a list or an array.
Values = Sequence[float] | npt.NDArray[np.float64] | npt.NDArray[np.int64]

# Default target when none is given: within this fraction of the best value any finished run reached.
TARGET_TOLERANCE = 0.05


def best_value(values: Values, mode: str) -> float:
    """Highest (``mode="max"``) or lowest (``"min"``) finite value; ``nan`` if there is none.

    Example:
        >>> best_value([0.5, 0.9, 0.8], "max"), best_value([0.5, 0.9, 0.8], "min")
        (0.9, 0.5)
    """
    finite = _finite(values)
    if not len(finite):
        return math.nan
    return float(finite.max() if mode == "max" else finite.min())


def steps_to_target(steps: Values, values: Values, target: float, mode: str) -> int | None:
    """The first logged step whose value reaches ``target`` (``>=`` for ``"max"``, ``<=`` for ``"min"``).

    Returns ``None`` if the run never reached it.

    Example:
        >>> steps_to_target([10, 20, 30], [0.5, 0.91, 0.95], 0.9, "max")
        20
        >>> steps_to_target([10, 20], [0.5, 0.6], 0.9, "max") is None
        True
    """
    array = np.asarray(values, dtype=np.float64)
    reached = array >= target if mode == "max" else array <= target
    hits = np.flatnonzero(reached & np.isfinite(array))
    return int(np.asarray(steps)[hits[0]]) if len(hits) else None


def loss_oscillation(values: Values) -> float:
    r"""Mean absolute second difference of the logged training loss: :math:`\frac{1}{n-2}\sum_i |L_{i+1} - 2L_i + L_{i-1}|`.

    A straight (even steep) descent scores 0; every change of direction adds the size of the kink. It is
    in the loss's units and depends on ``log_every_n_steps``, which both arms share. Needs 3 points.

    Example:
        >>> loss_oscillation([4.0, 3.0, 2.0, 1.0])  # straight line
        0.0
        >>> loss_oscillation([1.0, 0.5, 1.0, 0.5])  # |1.0| + |-1.0| over 2
        1.0
    """
    array = np.asarray(values, dtype=np.float64)
    if len(array) < 3:
        return math.nan
    return float(np.mean(np.abs(np.diff(array, n=2))))


def coefficient_of_variation(values: Values) -> float:
    """Population standard deviation over mean (``std(ddof=0) / mean``); ``nan`` for < 2 points or mean 0.

    Used for the variability of ``train/grad_norm`` over a run.

    Example:
        >>> coefficient_of_variation([1.0, 3.0])  # std 1, mean 2
        0.5
    """
    array = np.asarray(values, dtype=np.float64)
    if len(array) < 2 or array.mean() == 0:
        return math.nan
    return float(array.std() / array.mean())


def train_val_gap(train_steps: Values, train_loss: Values, val_steps: Values, val_loss: Values) -> float:
    """Final validation loss minus the mean training loss logged since the validation before it.

    The training loss is averaged over the last validation interval (usually the last epoch), the part of
    training the final validation loss was measured after. Positive means the model does better on the
    data it trains on. ``nan`` without a validation point or training points in that interval.

    Example:
        >>> round(train_val_gap([1, 2, 3, 4], [0.9, 0.7, 0.5, 0.3], [2, 4], [0.8, 0.6]), 6)  # 0.6 - mean(0.5, 0.3)
        0.2
    """
    if not len(val_loss):
        return math.nan
    steps, loss = np.asarray(train_steps), np.asarray(train_loss, dtype=np.float64)
    end = float(val_steps[-1])
    start = float(val_steps[-2]) if len(val_steps) > 1 else -math.inf
    window = loss[(steps > start) & (steps <= end)]
    if not len(window):
        return math.nan
    return float(val_loss[-1]) - float(window.mean())


def default_target(best_values: Values, mode: str, tolerance: float = TARGET_TOLERANCE) -> float | None:
    """Within ``tolerance`` of the best value any run reached: ``best * (1 - tol)`` for ``"max"``,
    ``best * (1 + tol)`` for ``"min"``. ``None`` when that best value is not positive (a relative target
    would be meaningless then: give one).

    Example:
        >>> round(default_target([0.90, 0.96], "max"), 6)
        0.912
        >>> round(default_target([0.20, 0.25], "min"), 6)
        0.21
    """
    best = best_value(best_values, mode)
    if not best > 0:
        return None
    return best * (1 - tolerance) if mode == "max" else best * (1 + tolerance)


@dataclass(frozen=True)
class Aggregate:
    """Mean and spread of one measure over the runs of an arm.

    Args:
        mean: the mean over the runs that have the measure (``nan`` if none).
        std: the sample standard deviation (``ddof=1``) over those runs; ``nan`` for fewer than 2.
        n: how many runs have the measure.

    Example:
        >>> Aggregate.of([1.0, 2.0, 3.0, float("nan")])
        Aggregate(mean=2.0, std=1.0, n=3)
    """

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Aggregate:
        """Aggregate the finite entries of ``values`` (``None`` and ``nan`` mean "not measured")."""
        finite = _finite([math.nan if v is None else v for v in values])
        mean = float(finite.mean()) if len(finite) else math.nan
        std = float(finite.std(ddof=1)) if len(finite) > 1 else math.nan
        return cls(mean, std, len(finite))


def _finite(values: Values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array)]
