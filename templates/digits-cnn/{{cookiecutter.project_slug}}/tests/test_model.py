"""The model's options are validated, and the confusion-matrix figure shows the counts it is given."""

from __future__ import annotations

import pytest
import torch

from {{ cookiecutter.package_name }}.model import DigitsCNN
from {{ cookiecutter.package_name }}.plots import confusion_matrix_figure


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"lr": 0}, "lr"), ({"momentum": 1.0}, "momentum"), ({"weight_decay": -1e-4}, "weight_decay"),
     ({"channels": (16,)}, "channels"), ({"hidden": 0}, "hidden")],
)
def test_invalid_arguments_are_refused(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        DigitsCNN(**kwargs)


def test_optimizer_is_sgd_with_the_configured_options() -> None:
    optimizer = DigitsCNN(lr=0.1, momentum=0.5, weight_decay=1e-4).configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert {k: optimizer.defaults[k] for k in ("lr", "momentum", "weight_decay")} == {
        "lr": 0.1, "momentum": 0.5, "weight_decay": 1e-4}


def test_confusion_figure_annotates_counts() -> None:
    confusion = torch.tensor([[5, 0, 1], [0, 7, 0], [2, 0, 3]])
    texts = {(t.get_position(), t.get_text()) for t in confusion_matrix_figure(confusion).axes[0].texts}
    assert texts == {((0, 0), "5"), ((2, 0), "1"), ((1, 1), "7"), ((0, 2), "2"), ((2, 2), "3")}
