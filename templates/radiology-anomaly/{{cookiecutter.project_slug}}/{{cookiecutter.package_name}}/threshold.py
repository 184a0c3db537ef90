"""Choosing the decision threshold on validation scores: best F1, or the highest threshold reaching a recall."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

Rule = Literal["f1", "recall"]
RULES = ("f1", "recall")


def choose_threshold(scores: Tensor, labels: Tensor, rule: Rule = "f1", target_recall: float = 0.9) -> float:
    """The threshold ``t`` for the decision ``score > t`` (torchmetrics' convention) that ``rule`` prefers.

    Every distinct score is a candidate cut ("flag everything scoring at least this"); ``t`` lies halfway to
    the next lower score, so that images scoring between two validation scores are decided by the nearer one.

    Args:
        scores: ``(N,)`` anomaly scores, higher meaning more anomalous.
        labels: ``(N,)`` 1 for anomalous, 0 for normal.
        rule: ``"f1"``: the cut with the best F1 (ties: the highest threshold); ``"recall"``: the highest
            threshold whose recall reaches ``target_recall`` (so the best precision at that recall).
        target_recall: used by ``rule="recall"``, in ``(0, 1]``.

    Returns:
        ``t`` as a Python float. With no anomalous image among the labels, the highest score (flags nothing).

    Raises:
        ValueError: for an unknown rule, a target recall outside ``(0, 1]``, or mismatched or empty inputs.

    Example:
        >>> scores, labels = torch.tensor([0.125, 0.5, 0.375, 0.75]), torch.tensor([0, 0, 1, 1])
        >>> choose_threshold(scores, labels)  # flag 0.75, 0.5, 0.375: F1 0.8
        0.25
        >>> choose_threshold(scores, labels, rule="recall", target_recall=0.5)  # flag 0.75 only
        0.625
    """
    if rule not in RULES:
        raise ValueError(f"`rule` must be one of {RULES}, got {rule!r}")
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"`target_recall` must be in (0, 1], got {target_recall!r}")
    if scores.shape != labels.shape or scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f"`scores` and `labels` must be non-empty and of the same 1-D shape, got {scores.shape} and {labels.shape}")
    s = scores.detach().cpu().to(torch.float32).numpy()
    y = labels.detach().cpu().numpy().astype(bool)
    distinct = np.unique(s)[::-1]  # descending
    if not y.any():
        return float(distinct[0])
    # Flagged counts when the cut is at each distinct score: searchsorted on the ascending order.
    ascending = np.sort(s)
    positives = np.sort(s[y])
    flagged = len(s) - np.searchsorted(ascending, distinct, side="left")
    tp = len(positives) - np.searchsorted(positives, distinct, side="left")
    if rule == "f1":
        f1 = 2 * tp / (flagged + len(positives))
        k = int(np.argmax(f1))
    else:
        k = int(np.argmax(tp / len(positives) >= target_recall - 1e-12))
    return _between(distinct, k)


def _between(distinct: np.ndarray, k: int) -> float:
    """A float32 value ``t`` with ``distinct[k + 1] <= t < distinct[k]``: exactly the scores >= distinct[k] exceed it."""
    if k + 1 == len(distinct):
        below = np.nextafter(distinct[k], np.float32(-np.inf))
        return float(max(below, np.float32(0.0)))
    middle = np.float32((np.float64(distinct[k]) + np.float64(distinct[k + 1])) / 2)
    return float(middle if middle < distinct[k] else distinct[k + 1])
