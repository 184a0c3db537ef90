"""The math on dense tensors, against loop-based float64 references."""

import pytest
import torch
from reference import gc_reference, ulp_tolerance

from lightning_gc.centralize import centralize_, removed_sq_norm, row_mean
from lightning_gc.layouts import RowLayout

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SHAPES = [(7, 5), (6, 4, 3), (8, 3, 3, 2), (5, 2, 3, 2, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["channel", "tensor"])
def test_centralize_matches_reference(shape, dtype, mode):
    grad = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype)
    expected = gc_reference(grad, mode=mode)
    centralize_(grad, mode=mode)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), expected, **ulp_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("kernel", [(3,), (3, 2), (2, 2, 2)])
def test_transposed_conv_layout_is_per_output_channel(dtype, groups, kernel):
    grad = (torch.randn(6, 4, *kernel, dtype=torch.float64) + 0.5).to(dtype)  # (in, out // groups, *k)
    expected = gc_reference(grad, out_dim=1, groups=groups)
    centralize_(grad, RowLayout(out_dims=(1,), groups=groups))
    torch.testing.assert_close(grad.double(), expected, **ulp_tolerance(dtype))


def test_non_contiguous_gradient_is_centralized_in_place():
    base = torch.randn(8, 3, 5, 5).to(memory_format=torch.channels_last)
    expected = gc_reference(base)
    centralize_(base)
    torch.testing.assert_close(base.double(), expected, rtol=1e-5, atol=1e-6)


def test_rows_sum_to_zero_and_removed_norm_is_exact():
    grad = torch.randn(10, 20, dtype=torch.float64) + 2
    original = grad.clone()
    mean = centralize_(grad)
    assert grad.sum(dim=1).abs().max() < 1e-12
    removed = (original - grad).norm() ** 2
    torch.testing.assert_close(removed_sq_norm(mean, grad.numel()), removed)


def test_half_precision_mean_accumulates_in_float32():
    # 4096 entries of 1 + tiny: a float16 accumulator would lose the tiny part entirely.
    grad = torch.full((2, 4096), 1.0, dtype=torch.float16)
    grad[:, ::2] += 2**-10
    mean = row_mean(grad)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, torch.full((2, 1), 1 + 2**-11), rtol=0, atol=1e-7)


def test_one_dimensional_tensor_is_rejected_in_channel_mode():
    with pytest.raises(ValueError, match="ndim >= 2"):
        centralize_(torch.randn(5))
