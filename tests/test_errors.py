"""lightning_gc.errors: the guard of the dense routes and warnings on the user's line."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_gc import UnsupportedGradientLayoutError
from lightning_gc.errors import check_dense_gradient, warn
from lightning_gc.selection import Target


def test_a_gradient_of_another_shape_is_refused_naming_parameter_and_strategy():
    target = Target(nn.Parameter(torch.zeros(3, 4)), "layer.weight")
    check_dense_gradient(target, torch.zeros(3, 4))
    with pytest.raises(UnsupportedGradientLayoutError, match=r"`layer.weight` under FSDPStrategy.*\(6,\)"):
        check_dense_gradient(target, torch.zeros(6), "FSDPStrategy")


def test_warn_names_the_first_frame_outside_the_package():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn("hello")
    assert caught[0].filename == __file__ and caught[0].category is UserWarning
