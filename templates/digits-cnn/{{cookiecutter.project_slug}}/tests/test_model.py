"""The model's options are validated, and the confusion-matrix figure shows the counts it is given."""

from __future__ import annotations

import pytest
import torch

from {{ cookiecutter.package_name }}.model import DigitsCNN
from {{ cookiecutter.package_name }}.plots import confusion_matrix_figure


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"lr": 0}, "lr"), ({"momentum": 1.0}, "momentum"), ({"weight_decay": -1e-4}, "weight_decay"),
     ({"channels": (16,)}, "channels"), ({"hidden": 0}, "hidden"), ({"norm": "layer"}, "norm")],
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


def _layers(model: DigitsCNN) -> list[str]:
    return [type(m).__name__ for m in model.net]


def test_norm_none_is_the_network_without_normalisation() -> None:
    """The default keeps the exact layer sequence (and so parameter order, initialisation and results)."""
    assert _layers(DigitsCNN()) == _layers(DigitsCNN(norm="none")) == [
        "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU", "Linear"]
    torch.manual_seed(0)
    default = DigitsCNN()
    torch.manual_seed(0)
    explicit = DigitsCNN(norm="none")
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))


@pytest.mark.parametrize(("norm", "layer"), [("batch", torch.nn.BatchNorm2d), ("group", torch.nn.GroupNorm)])
def test_norm_puts_one_layer_after_each_convolution(norm: str, layer: type) -> None:
    model = DigitsCNN(channels=(12, 32), norm=norm)
    names = _layers(model)
    assert names[:3] == ["Conv2d", layer.__name__, "ReLU"] and names[4:7] == ["Conv2d", layer.__name__, "ReLU"]
    first, second = model.net[1], model.net[5]
    if norm == "group":  # the most groups up to 8 that divide the channels
        assert (first.num_groups, first.num_channels, second.num_groups, second.num_channels) == (6, 12, 8, 32)
    else:
        assert (first.num_features, second.num_features) == (12, 32)
    x = torch.randn(4, 1, 28, 28)
    model.train()
    out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    # The normalisation really normalises: per-channel mean ~0 after the first norm layer (train mode).
    hidden = model.net[1](model.net[0](x)).double()
    dims = (0, 2, 3) if norm == "batch" else (2, 3)
    if norm == "batch":
        assert hidden.mean(dim=dims).abs().max() < 1e-5
    else:
        groups = hidden.reshape(4, first.num_groups, -1)
        assert groups.mean(dim=2).abs().max() < 1e-5
