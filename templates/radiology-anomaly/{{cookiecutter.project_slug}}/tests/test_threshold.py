"""The threshold chosen on validation, against a brute-force float64 reference written here."""

from __future__ import annotations

import pytest
import torch

from {{ cookiecutter.package_name }}.threshold import choose_threshold


def _reference(scores: torch.Tensor, labels: torch.Tensor, rule: str, target: float) -> set[int]:
    """The flagged set the rule prefers: try "flag everything >= c" for every candidate c, in float64."""
    s, y = scores.double(), labels.bool()
    best, best_key = None, None
    for c in sorted(set(s.tolist()), reverse=True):
        flagged = s >= c
        tp = int((flagged & y).sum())
        f1 = 2 * tp / (int(flagged.sum()) + int(y.sum()))
        recall = tp / int(y.sum())
        key = f1 if rule == "f1" else (recall >= target - 1e-12)
        if best_key is None or key > best_key:  # strict: ties keep the higher threshold
            best, best_key = flagged, key
    return set(torch.nonzero(best).flatten().tolist())


@pytest.mark.parametrize("rule", ["f1", "recall"])
@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(rule: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(200, generator=g) < 0.2).long()
    labels[0] = 1
    # Rounded so that there are ties; anomalies score higher on average.
    scores = ((torch.rand(200, generator=g) + 0.6 * labels) / 1.6 * 50).round() / 50
    t = choose_threshold(scores, labels, rule, target_recall=0.8)
    assert set(torch.nonzero(scores > t).flatten().tolist()) == _reference(scores, labels, rule, 0.8)
    assert 0.0 <= t <= 1.0


def test_threshold_lies_between_scores() -> None:
    scores, labels = torch.tensor([0.2, 0.4, 0.6, 0.8]), torch.tensor([0, 0, 1, 1])
    assert choose_threshold(scores, labels) == pytest.approx(0.5)
    assert choose_threshold(scores, labels, "recall", 0.5) == pytest.approx(0.7)


def test_no_anomaly_flags_nothing() -> None:
    scores = torch.tensor([0.1, 0.3, 0.2])
    assert not (scores > choose_threshold(scores, torch.zeros(3, dtype=torch.long))).any()


@pytest.mark.parametrize(("kwargs", "message"), [({"rule": "youden"}, "rule"), ({"target_recall": 0.0}, "target_recall")])
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_threshold(torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), **kwargs)
