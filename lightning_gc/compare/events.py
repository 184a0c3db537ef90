"""Scalars of one run, read back from its TensorBoard event files with TensorBoard's own reader."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Series:
    """One scalar tag of one run, in the order it was logged.

    Args:
        steps: the global step of each point.
        values: the logged values (``float64``; NaN and infinities are kept as logged).

    Example:
        >>> s = Series(np.array([0, 5]), np.array([1.0, 0.5]))
        >>> s.last
        0.5
    """

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.values)

    @property
    def last(self) -> float:
        """The last logged value (NaN if nothing was logged)."""
        return float(self.values[-1]) if len(self.values) else float("nan")


def read_scalars(run_dir: str | os.PathLike[str]) -> dict[str, Series]:
    """All scalar tags logged under ``run_dir`` (every event file in it, in order), by tag.

    Uses TensorBoard's ``event_accumulator.EventAccumulator`` without
    down-sampling, so every logged point is returned.

    Example:
        >>> read_scalars("no/such/run")
        {}
    """
    if not os.path.isdir(run_dir):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()[SCALARS]:
        events = accumulator.Scalars(tag)
        out[tag] = Series(
            np.array([e.step for e in events], dtype=np.int64), np.array([e.value for e in events], dtype=np.float64)
        )
    return out
