"""Which parameters GC applies to, and along which dims."""

import pytest
from torch import nn

from lightning_gc.config import GCConfig
from lightning_gc.layouts import RowLayout
from lightning_gc.selection import select


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv1d = nn.Conv1d(4, 6, 3)
        self.conv2d = nn.Conv2d(6, 8, 3, groups=2)
        self.up = nn.ConvTranspose2d(8, 6, 2, groups=2)
        self.rnn = nn.LSTM(6, 5)
        self.head = nn.Linear(5, 3)
        self.norm = nn.LayerNorm(3)


def names(**options):
    return [t.name for t in select(Zoo(), GCConfig(**options)).targets]


def test_default_selects_every_weight_with_ndim_at_least_2_except_embeddings():
    assert names() == [
        "conv1d.weight",
        "conv2d.weight",
        "up.weight",
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "head.weight",
    ]


def test_conv_only_is_defined_by_module_type_and_includes_conv1d_and_transposed():
    assert names(conv_only=True) == ["conv1d.weight", "conv2d.weight", "up.weight"]


def test_embeddings_can_be_opted_in():
    assert "embed.weight" in names(exclude_modules=())


def test_exclude_by_pattern_and_module_type():
    assert names(exclude=("rnn.*",), exclude_modules=("Embedding", nn.Conv2d)) == [
        "conv1d.weight",
        "up.weight",
        "head.weight",
    ]


def test_exclude_module_by_name_matches_subclasses():
    class MyEmbedding(nn.Embedding):
        pass

    model = nn.Sequential(MyEmbedding(4, 3), nn.Linear(3, 2))
    assert [t.name for t in select(model, GCConfig()).targets] == ["1.weight"]


def test_transposed_convolution_keeps_output_channels_in_dim_1():
    layouts = {t.name: t.layout for t in select(Zoo(), GCConfig()).targets}
    assert layouts["up.weight"] == RowLayout(out_dims=(1,), groups=2)
    assert layouts["conv2d.weight"] == RowLayout()


def test_shared_parameters_are_selected_once():
    linear = nn.Linear(3, 3)
    model = nn.Sequential(linear, nn.ReLU(), linear)
    assert [t.name for t in select(model, GCConfig()).targets] == ["0.weight"]


def test_frozen_parameters_are_skipped():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    assert [t.name for t in select(model, GCConfig()).targets] == ["1.weight"]


def test_bare_parameters_use_only_the_dimension_rule():
    model = Zoo()
    selection = select(model.parameters(), GCConfig())
    assert len(selection.targets) == 7  # the embedding too: no module types are known
    assert all(t.layout == RowLayout() for t in selection.targets)
    assert [c.decision for c in selection.choices if c.selected] == ["assumed"] * 7


def test_conv_only_with_bare_parameters_is_an_error():
    with pytest.raises(ValueError, match="conv_only"):
        select(Zoo().parameters(), GCConfig(conv_only=True))


def test_unmatched_exclude_patterns_are_reported():
    selection = select(Zoo(), GCConfig(exclude=("head.*", "nothing.*")))
    assert selection.unmatched_patterns == ["nothing.*"]


@pytest.mark.parametrize(
    ("options", "argument"),
    [
        ({"mode": "row"}, "mode"),
        ({"conv_only": "yes"}, "conv_only"),
        ({"centralize_weight_decay": 1}, "centralize_weight_decay"),
        ({"exclude": ("",)}, "exclude"),
        ({"exclude": (3,)}, "exclude"),
        ({"exclude_modules": (int,)}, "exclude_modules"),
        ({"exclude_modules": "Embedding"}, "exclude_modules"),
    ],
)
def test_invalid_options_name_the_argument_and_accepted_values(options, argument):
    with pytest.raises(ValueError, match=f"`{argument}`") as info:
        GCConfig(**options)
    if argument == "mode":
        assert "('channel', 'tensor')" in str(info.value)
