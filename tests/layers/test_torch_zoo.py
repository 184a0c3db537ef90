"""Every torch.nn layer with weights, parametrized layers (new and old API), against each layer's true axes."""

from __future__ import annotations

import warnings

import pytest
import torch
from layer_zoo import DIM0, SKIP_BIAS, SKIP_EMBEDDING, SKIP_NORM, Skip, Truth, Units, run_and_check, truth_for
from torch import nn
from torch.nn.utils import parametrizations

import lightning_gc

SKIP_MAGNITUDE = Skip("weight-norm magnitude g: (out, 1, ...), every averaged dim has size 1")
SKIP_BIAS_KV = Skip("MultiheadAttention's learned bias_k/bias_v tokens")
TRANSPOSED_G2 = Units((1,), groups=2)  # ConvTranspose weight (in, out // groups, *k) with groups=2


def dense_zoo() -> nn.ModuleDict:
    """Linear, Bilinear, grouped convolutions and transposed convolutions 1-3d, norms and embeddings."""
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "linear": nn.Linear(5, 3),
            "bilinear": nn.Bilinear(4, 5, 3),
            "conv1": nn.Conv1d(4, 6, 3, groups=2),
            "conv2": nn.Conv2d(4, 6, (3, 2), groups=2),
            "conv3": nn.Conv3d(2, 4, 2),
            "convt1": nn.ConvTranspose1d(4, 6, 3, groups=2),
            "convt2": nn.ConvTranspose2d(4, 6, (2, 3), groups=2),
            "convt3": nn.ConvTranspose3d(4, 2, 2, groups=2),
            "convt2_plain": nn.ConvTranspose2d(3, 5, 2),
            "embedding": nn.Embedding(7, 4),
            "bag": nn.EmbeddingBag(7, 4),
            "layer_norm": nn.LayerNorm(4),
            "group_norm": nn.GroupNorm(2, 4),
            "batch_norm": nn.BatchNorm2d(4),
            "prelu": nn.PReLU(4),
        }
    ).double()


DENSE_TABLE: list[tuple[str, Truth]] = [
    ("*.bias", SKIP_BIAS),
    ("embedding.weight", SKIP_EMBEDDING),
    ("bag.weight", SKIP_EMBEDDING),
    ("*_norm.weight", SKIP_NORM),
    ("prelu.weight", Skip("1-D")),
    ("convt2_plain.weight", Units((1,))),  # (in, out, kh, kw)
    ("convt*.weight", TRANSPOSED_G2),
    ("*.weight", DIM0),  # Linear (out, in), Bilinear (out, in1, in2), Conv (out, in // groups, *k)
]


def lazy_zoo() -> nn.Sequential:
    """Lazy layers become their eager classes after one forward pass."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.LazyConv2d(4, 3), nn.LazyConvTranspose2d(6, 2, groups=2), nn.Flatten(), nn.LazyLinear(3)
    ).double()
    model(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    return model


LAZY_TABLE: list[tuple[str, Truth]] = [
    ("*.bias", SKIP_BIAS),
    ("1.weight", TRANSPOSED_G2),
    ("*.weight", DIM0),
]


def recurrent_zoo() -> nn.ModuleDict:
    """RNN/LSTM (with proj_size)/GRU, bidirectional and stacked, and their cells: weights (gates * hidden, in)."""
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "rnn": nn.RNN(4, 5, num_layers=2, bidirectional=True),
            "lstm": nn.LSTM(4, 6, num_layers=2, proj_size=3),
            "gru": nn.GRU(4, 5, bidirectional=True),
            "rnn_cell": nn.RNNCell(4, 5),
            "lstm_cell": nn.LSTMCell(4, 5),
            "gru_cell": nn.GRUCell(4, 5),
        }
    ).double()


RECURRENT_TABLE: list[tuple[str, Truth]] = [
    ("*.bias_*", SKIP_BIAS),
    ("*.weight_*", DIM0),  # weight_ih (G*H, in), weight_hh (G*H, H or proj), weight_hr (proj, H)
]


def attention_zoo() -> nn.ModuleDict:
    """MultiheadAttention: packed in_proj, separate q/k/v with kdim/vdim, learned bias_k/bias_v."""
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "packed": nn.MultiheadAttention(8, 2, add_bias_kv=True),
            "separate": nn.MultiheadAttention(8, 2, kdim=5, vdim=3, add_bias_kv=True, batch_first=True),
        }
    ).double()


ATTENTION_TABLE: list[tuple[str, Truth]] = [
    ("*.bias_k", SKIP_BIAS_KV),
    ("*.bias_v", SKIP_BIAS_KV),
    ("*bias", SKIP_BIAS),
    ("*.in_proj_weight", DIM0),  # (3 * E, E)
    ("*.?_proj_weight", DIM0),  # (E, E), (E, kdim), (E, vdim)
    ("*.out_proj.weight", DIM0),
]


def parametrized_zoo() -> nn.ModuleDict:
    """weight_norm / spectral_norm, new (torch.nn.utils.parametrizations) and old (torch.nn.utils) API."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old API is deprecated, still used
        layers = {
            "wn_conv": parametrizations.weight_norm(nn.Conv2d(3, 4, 3)),
            "wn_convt": parametrizations.weight_norm(nn.ConvTranspose2d(4, 6, 2, groups=2)),
            "wn_linear_dim1": parametrizations.weight_norm(nn.Linear(5, 3), dim=1),
            "sn_convt": parametrizations.spectral_norm(nn.ConvTranspose2d(4, 6, 2, groups=2)),
            "sn_linear": parametrizations.spectral_norm(nn.Linear(5, 3)),
            "old_wn_linear": torch.nn.utils.weight_norm(nn.Linear(5, 3)),
            "old_wn_convt": torch.nn.utils.weight_norm(nn.ConvTranspose1d(4, 6, 3, groups=2)),
            "old_sn_conv": torch.nn.utils.spectral_norm(nn.Conv1d(3, 4, 2)),
            "old_sn_convt": torch.nn.utils.spectral_norm(nn.ConvTranspose2d(4, 6, 2, groups=2)),
        }
    return nn.ModuleDict(layers).double()


PARAMETRIZED_TABLE: list[tuple[str, Truth]] = [
    ("*.bias", SKIP_BIAS),
    # weight_norm: original0 = g, the magnitude ((dim's size), 1, ...); original1 = v, stored like the weight
    ("*.parametrizations.weight.original0", SKIP_MAGNITUDE),
    ("*.weight_g", SKIP_MAGNITUDE),
    ("wn_convt.parametrizations.weight.original1", TRANSPOSED_G2),
    ("sn_convt.parametrizations.weight.original", TRANSPOSED_G2),
    ("old_wn_convt.weight_v", TRANSPOSED_G2),
    ("old_sn_convt.weight_orig", TRANSPOSED_G2),
    ("*.parametrizations.weight.original*", DIM0),
    ("*.weight_v", DIM0),
    ("*.weight_orig", DIM0),
]

ZOOS = {
    "dense": (dense_zoo, DENSE_TABLE),
    "lazy": (lazy_zoo, LAZY_TABLE),
    "recurrent": (recurrent_zoo, RECURRENT_TABLE),
    "attention": (attention_zoo, ATTENTION_TABLE),
    "parametrized": (parametrized_zoo, PARAMETRIZED_TABLE),
}


@pytest.mark.parametrize("zoo", sorted(ZOOS))
def test_torch_layers_are_centralized_along_their_true_output_axes(zoo: str) -> None:
    build, table = ZOOS[zoo]
    run_and_check(build(), table, lightning_gc.centralize_gradients)


@pytest.mark.parametrize("zoo", sorted(ZOOS))
def test_conv_only_keeps_exactly_the_convolution_weights(zoo: str) -> None:
    """conv_only by layer type: parametrized and Lazy convolutions count, everything else is left alone."""
    build, table = ZOOS[zoo]
    model = build()
    not_conv = Skip("not a convolution weight (conv_only)")
    conv_table: list[tuple[str, Truth]] = []
    for name, _ in model.named_parameters():
        truth = truth_for(name, table)
        is_conv = isinstance(_owner_layer(model, name), nn.modules.conv._ConvNd)
        conv_table.append((name, truth if isinstance(truth, Skip) or is_conv else not_conv))
    if any(isinstance(t, Units) for _, t in conv_table):
        run_and_check(model, conv_table, lambda m: lightning_gc.centralize_gradients(m, conv_only=True), conv_only=True)
        return
    with pytest.warns(UserWarning, match="nothing to centralize"):  # a model without convolutions, said so
        run_and_check(model, conv_table, lambda m: lightning_gc.centralize_gradients(m, conv_only=True), conv_only=True)


def _owner_layer(model: nn.Module, name: str) -> nn.Module:
    """The layer a parameter belongs to, looking through parametrizations (``conv.parametrizations.weight``)."""
    path = name.split(".")[:-1]
    if "parametrizations" in path:
        path = path[: path.index("parametrizations")]
    return model.get_submodule(".".join(path))
