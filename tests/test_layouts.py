"""The layout registry (lightning_gc.layouts): every torch.nn layer with weights, parametrizations, Conv1D,
user registrations, and the parameters GC must never touch."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from lightning_gc import centralize_gradients, describe, register_layout
from lightning_gc.layouts import REGISTRY, LayerLayout, RowLayout, layouts_from_specs, unregister_layout


class Conv1D(nn.Module):
    """A stand-in named like ``transformers.pytorch_utils.Conv1D``: weight stored ``(in, out)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)


Conv1D.__module__ = "transformers.pytorch_utils"


def skewed_grad(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random float64 values with a different non-zero mean along every axis (a wrong axis cannot pass)."""
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    for d in range(len(shape)):
        view = [1] * len(shape)
        view[d] = -1
        grad = grad + 3 * torch.randn(shape[d], generator=gen, dtype=torch.float64).view(view)
    return grad


def unit_reference(grad: torch.Tensor, out_dims: tuple[int, ...], groups: int = 1) -> torch.Tensor:
    """GC in float64 along the layer's true output dims, one output unit at a time."""
    g = grad.double().clone()
    block = g.shape[0] // groups
    kept = [range(g.shape[d]) for d in out_dims]
    for grp in range(groups):
        for index in itertools.product(*kept):
            slicer: list[slice | int] = [slice(None)] * g.ndim
            slicer[0] = slice(grp * block, (grp + 1) * block)
            for d, i in zip(out_dims, index):
                slicer[d] = i
            unit = g[tuple(slicer)]
            g[tuple(slicer)] = unit - unit.mean()
    return g


FLOAT32 = {"rtol": 1e-5, "atol": 1e-5}


def fill(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for seed, (name, p) in enumerate(model.named_parameters()):
        p.grad = skewed_grad(tuple(p.shape), seed).to(p.dtype)
        grads[name] = p.grad.double()  # the reference starts from the values GC sees
    return grads


# name -> (layer, {param: (out_dims, groups)}); parameters not listed must be left untouched
LAYERS: dict[str, tuple[nn.Module, dict[str, tuple[tuple[int, ...], int]]]] = {
    "Linear": (nn.Linear(5, 4), {"weight": ((0,), 1)}),
    "Bilinear": (nn.Bilinear(3, 4, 5), {"weight": ((0,), 1)}),
    "Conv1d grouped": (nn.Conv1d(4, 6, 3, groups=2), {"weight": ((0,), 1)}),
    "Conv2d": (nn.Conv2d(3, 4, 3), {"weight": ((0,), 1)}),
    "Conv3d": (nn.Conv3d(2, 3, 2), {"weight": ((0,), 1)}),
    "ConvTranspose1d": (nn.ConvTranspose1d(4, 6, 3), {"weight": ((1,), 1)}),
    "ConvTranspose2d grouped": (nn.ConvTranspose2d(6, 4, 2, groups=2), {"weight": ((1,), 2)}),
    "ConvTranspose3d grouped": (nn.ConvTranspose3d(6, 3, 2, groups=3), {"weight": ((1,), 3)}),
    "RNN 2 layers": (nn.RNN(3, 4, num_layers=2), {f"weight_{k}_l{i}": ((0,), 1) for k in ("ih", "hh") for i in (0, 1)}),
    "GRU bidirectional": (
        nn.GRU(3, 4, bidirectional=True),
        {f"weight_{k}_l0{s}": ((0,), 1) for k in ("ih", "hh") for s in ("", "_reverse")},
    ),
    "LSTM proj_size": (
        nn.LSTM(3, 5, proj_size=2),
        {"weight_ih_l0": ((0,), 1), "weight_hh_l0": ((0,), 1), "weight_hr_l0": ((0,), 1)},
    ),
    "LSTMCell": (nn.LSTMCell(3, 4), {"weight_ih": ((0,), 1), "weight_hh": ((0,), 1)}),
    "RNNCell": (nn.RNNCell(3, 4), {"weight_ih": ((0,), 1), "weight_hh": ((0,), 1)}),
    "MultiheadAttention packed": (
        nn.MultiheadAttention(8, 2, add_bias_kv=True),
        {"in_proj_weight": ((0,), 1), "out_proj.weight": ((0,), 1)},
    ),
    "MultiheadAttention kdim": (
        nn.MultiheadAttention(8, 2, kdim=4, vdim=6),
        {
            "q_proj_weight": ((0,), 1),
            "k_proj_weight": ((0,), 1),
            "v_proj_weight": ((0,), 1),
            "out_proj.weight": ((0,), 1),
        },
    ),
    "transformers Conv1D": (Conv1D(6, 4), {"weight": ((1,), 1)}),
    "LayerNorm 2-D": (nn.LayerNorm((3, 4)), {}),
    "weight_norm Linear": (
        parametrizations.weight_norm(nn.Linear(4, 3)),
        {"parametrizations.weight.original1": ((0,), 1)},
    ),
    "weight_norm ConvTranspose2d": (
        parametrizations.weight_norm(nn.ConvTranspose2d(4, 6, 3, groups=2), dim=1),
        {"parametrizations.weight.original1": ((1,), 2)},
    ),
    "spectral_norm ConvTranspose2d": (
        parametrizations.spectral_norm(nn.ConvTranspose2d(4, 6, 3)),
        {"parametrizations.weight.original": ((1,), 1)},
    ),
    "weight_norm Conv1D": (
        parametrizations.weight_norm(Conv1D(6, 4), dim=1),
        {"parametrizations.weight.original1": ((1,), 1)},
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_every_layer_is_centralized_along_its_real_output_dims(name):
    layer, expected = LAYERS[name]
    model = nn.Sequential(layer)
    grads = fill(model)
    centralize_gradients(model, exclude_modules=())
    for param_name, p in model.named_parameters():
        key = param_name.removeprefix("0.")
        if key in expected:
            out_dims, groups = expected[key]
            torch.testing.assert_close(p.grad.double(), unit_reference(grads[param_name], out_dims, groups), **FLOAT32)
        else:
            assert torch.equal(p.grad.double(), grads[param_name]), f"{param_name} must be left alone"


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.(weight|spectral)_norm.*is deprecated")
@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_old_weight_and_spectral_norm_attributes_resolve_to_the_layer(kind):
    layer = getattr(nn.utils, kind)(nn.ConvTranspose2d(4, 6, 3, groups=2))
    model = nn.Sequential(layer)
    grads = fill(model)
    centralize_gradients(model)
    original = "0.weight_v" if kind == "weight_norm" else "0.weight_orig"
    torch.testing.assert_close(
        model[0].get_parameter(original[2:]).grad.double(), unit_reference(grads[original], (1,), 2), **FLOAT32
    )
    if kind == "weight_norm":
        assert torch.equal(model[0].weight_g.grad.double(), grads["0.weight_g"])  # the magnitude: never


def test_conv_only_keeps_parametrized_convolutions():
    model = nn.Sequential(parametrizations.spectral_norm(nn.Conv2d(3, 4, 3)), nn.Linear(4, 2))
    report = describe(model, conv_only=True)
    assert [r.name for r in report.by_decision("centralized")] == ["0.parametrizations.weight.original"]


def test_units_whose_averaged_dims_all_have_size_1_are_never_zeroed():
    class LayerScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(4, 1, 1))  # ConvNeXt's layer_scale

    model = nn.Sequential(nn.Conv2d(4, 4, 1, groups=4), LayerScale(), parametrizations.weight_norm(nn.Linear(3, 3)))
    grads = fill(model)
    centralize_gradients(model)
    for name in ("0.weight", "1.gamma", "2.parametrizations.weight.original0"):
        assert torch.equal(model.get_parameter(name).grad.double(), grads[name]), name
        assert "size 1" in _reason(model, name) or "magnitude" in _reason(model, name)


def test_zero_size_weights_are_skipped():
    model = nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 3))
    fill(model)
    stats = centralize_gradients(model)
    assert stats.tensors == 1
    assert "zero-size" in _reason(model, "0.weight")


def test_position_embeddings_and_tokens_are_skipped_like_embedding_tables():
    class Embeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.reg_token = nn.Parameter(torch.zeros(1, 4, 8))
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
            self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))

    report = describe(nn.Sequential(Embeddings()))
    assert [r.decision for r in report.rows] == ["skipped"] * 4
    assert all("register_layout" in r.reason for r in report.rows)


def test_an_unowned_weight_keeps_the_dim0_rule_and_is_marked_assumed():
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.zeros(3, 5))

    model = nn.Sequential(Custom())
    grads = fill(model)
    with pytest.warns(UserWarning, match=r"assumed dim 0 .*0\.kernel"):
        centralize_gradients(model)
    torch.testing.assert_close(model[0].kernel.grad.double(), unit_reference(grads["0.kernel"], (0,)), **FLOAT32)
    (row,) = describe(model).rows
    assert row.decision == "assumed" and "exclude=['0.kernel']" in row.reason and "register_layout" in row.reason


def test_register_layout_by_class_and_by_path_and_undo():
    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.zeros(3, 5))  # stored (in, out)

    path = f"{Dense.__module__}.{Dense.__qualname__}"
    for layer in (Dense, path):
        entry = register_layout(layer, "kernel", out_dims=[1], reason="stored (in, out)")
        try:
            model = nn.Sequential(Dense())
            grads = fill(model)
            centralize_gradients(model)
            torch.testing.assert_close(
                model[0].kernel.grad.double(), unit_reference(grads["0.kernel"], (1,)), **FLOAT32
            )
            assert describe(model).rows[0].decision == "centralized"
        finally:
            unregister_layout(entry)
    assert describe(nn.Sequential(Dense())).rows[0].decision == "assumed"


def test_register_layout_out_dims_none_means_never_and_later_entries_win():
    entry = register_layout(nn.Linear, "weight", out_dims=None, reason="frozen by policy")
    try:
        (row, _) = describe(nn.Linear(3, 2)).rows
        assert row.decision == "skipped" and row.reason == "frozen by policy"
    finally:
        unregister_layout(entry)
    assert describe(nn.Linear(3, 2)).rows[0].decision == "centralized"


def test_a_public_alias_path_matches_the_defining_class():
    entry = register_layout("torch.nn.Linear", "weight", out_dims=None, reason="alias")
    try:
        assert describe(nn.Linear(3, 2)).rows[0].reason == "alias"
    finally:
        unregister_layout(entry)


def test_paths_of_packages_never_imported_are_matched_without_importing_them():
    import sys

    entry = register_layout("no_such_package.layers.Dense", "weight", out_dims=(1,))
    try:
        assert "no_such_package" not in sys.modules
        Dense = type("Dense", (nn.Module,), {"__module__": "no_such_package.layers"})
        layer = Dense()
        layer.weight = nn.Parameter(torch.zeros(2, 3))
        assert REGISTRY.lookup(layer, "weight") == RowLayout((1,))
    finally:
        unregister_layout(entry)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"layer": 3}, "layer"),
        ({"layer": "NoDots"}, "layer"),
        ({"layer": int}, "layer"),
        ({"layer": "a.B", "param": ""}, "param"),
        ({"layer": "a.B", "out_dims": "1"}, "out_dims"),
        ({"layer": "a.B", "out_dims": (1, 0)}, "out_dims"),
        ({"layer": "a.B", "out_dims": (-1,)}, "out_dims"),
        ({"layer": "a.B", "groups_attr": 2}, "groups_attr"),
    ],
)
def test_register_layout_validates_its_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        register_layout(**kwargs)


def test_layout_specs_from_a_config_file():
    (entry,) = layouts_from_specs([{"layer": "pkg.mod.Dense", "param": "kernel", "out_dims": [1], "reason": "r"}])
    assert entry == LayerLayout("pkg.mod.Dense", "kernel", (1,), None, "r")
    with pytest.raises(ValueError, match="`layouts`"):
        layouts_from_specs([{"layer": "pkg.mod.Dense", "dims": [1]}])
    with pytest.raises(ValueError, match="`layouts`.*`out_dims`"):
        layouts_from_specs([{"layer": "pkg.mod.Dense", "out_dims": "x"}])


@pytest.mark.parametrize(
    ("layout", "ndim", "mode", "reduce_dims", "averaged"),
    [
        (RowLayout(), 2, "channel", (1,), (1,)),
        (RowLayout((1,)), 2, "channel", (0,), (0,)),
        (RowLayout((1,), groups=2), 4, "channel", (1, 3, 4), (0, 2, 3)),
        (RowLayout((0, 2)), 3, "channel", (1,), (1,)),
        (RowLayout((1,), groups=2), 3, "tensor", (0, 1, 2, 3), (0, 1, 2)),
    ],
)
def test_row_layout_dims(layout, ndim, mode, reduce_dims, averaged):
    assert layout.reduce_dims(ndim, mode) == reduce_dims
    assert layout.averaged_dims(ndim, mode) == averaged


@pytest.mark.parametrize(
    "kwargs", [{"out_dims": ()}, {"out_dims": (1, 1)}, {"groups": 0}, {"out_dims": (0,), "groups": 2}]
)
def test_row_layout_refuses_what_cannot_be_a_layout(kwargs):
    with pytest.raises(ValueError):
        RowLayout(**kwargs)


def test_layouts_with_several_output_dims_are_exact_on_every_route():
    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, 4, 5))  # (experts, in, out)

    entry = register_layout(Experts, "w", out_dims=(0, 2))
    try:
        for dtype in (torch.float32, torch.bfloat16):
            model = nn.Sequential(Experts()).to(dtype)
            grads = fill(model)
            centralize_gradients(model)
            tolerance = {"rtol": 1.6e-2, "atol": 1.6e-1} if dtype == torch.bfloat16 else FLOAT32
            expected = unit_reference(grads["0.w"], (0, 2))
            torch.testing.assert_close(model[0].w.grad.double(), expected, **tolerance)
    finally:
        unregister_layout(entry)


def _reason(model: nn.Module, name: str) -> str:
    return next(r.reason for r in describe(model).rows if r.name == name)


def test_registering_the_same_entry_twice_keeps_one():
    before = len(REGISTRY)
    first = register_layout("pkg.mod.Twice", "w", out_dims=(1,))
    second = register_layout("pkg.mod.Twice", "w", out_dims=(1,))
    assert first == second and len(REGISTRY) == before + 1
    unregister_layout(first)
    assert len(REGISTRY) == before
