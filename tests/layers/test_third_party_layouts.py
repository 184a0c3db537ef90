"""The third-party layout table: checked against the installed transformers source, by each layer's own forward
pass where a layer can be built, and entry by entry through the registry (timm and torchvision by stand-ins).

timm and torchvision cannot be installed beside the CPU torch (their PyPI wheels need a matching torch build),
so their layers are reproduced here by stand-in classes whose ``__module__``/``__qualname__`` are the real
class paths, with parameters of the shapes their sources build: the registry matches by class path only.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_gc import third_party_layouts
from lightning_gc.third_party_layouts import THIRD_PARTY_LAYOUTS
from tests.layers import source_audit
from tests.layers.zoo import Units

PACKAGES = ("transformers.", "timm.", "torchvision.")


def test_table_is_well_formed() -> None:
    keys = [(e.class_path, e.param) for e in THIRD_PARTY_LAYOUTS]
    assert len(keys) == len(set(keys)), "one entry per (class, parameter)"
    for entry in THIRD_PARTY_LAYOUTS:
        assert entry.class_path.startswith(PACKAGES), entry
        assert entry.reason, f"{entry}: every entry says why"
        if entry.groups_attr is not None:
            assert entry.out_dims is not None and 0 not in entry.out_dims, entry


# ---- against the installed transformers source -------------------------------------------------------------

transformers_root = pytest.importorskip("transformers").__file__
TRANSFORMERS = Path(transformers_root).parent


@pytest.fixture(scope="module")
def sites() -> list[source_audit.ParamSite]:
    return source_audit.scan(TRANSFORMERS)


def test_every_transformers_entry_names_a_parameter_its_class_builds(sites: list[source_audit.ParamSite]) -> None:
    built: dict[str, set[str]] = {}
    for site in sites:
        built.setdefault(site.class_path, set()).add(site.attr)
    missing = [
        f"{e.class_path}.{e.param}"
        for e in THIRD_PARTY_LAYOUTS
        if e.class_path.startswith("transformers.")
        and not any(fnmatch.fnmatchcase(attr, e.param) for attr in built.get(e.class_path, ()))
    ]
    assert not missing, f"entries whose class does not build that parameter in this transformers: {missing}"


def test_every_expert_class_and_non_neuron_parameter_of_transformers_is_in_the_table() -> None:
    """The generated part of the table is what the scan of the installed source finds, exactly."""
    table = {(e.class_path, e.param): e for e in THIRD_PARTY_LAYOUTS}
    wrong = []
    for path, param, out_dims, reason in source_audit.generated_entries(TRANSFORMERS):
        entry = table.get((path, param))
        expected_reason = getattr(third_party_layouts, reason)
        if entry is None or entry.out_dims != out_dims or entry.reason != expected_reason:
            wrong.append(f"{path}.{param}: expected out_dims={out_dims} ({expected_reason}), table has {entry}")
    assert not wrong, "re-run `python tests/layers/source_audit.py <transformers dir>`:\n" + "\n".join(wrong)


def test_expert_storage_follows_the_decorator(sites: list[source_audit.ParamSite]) -> None:
    """``is_transposed=True`` experts are built (E, hidden, 2 * inter) for gate_up; the others (E, 2 * inter, hidden)."""
    experts = source_audit.expert_classes(sites)
    assert len(experts) > 50
    shapes = {(s.class_path, s.attr): s.source for s in sites}
    for expert in experts:
        if "gate_up_proj" in expert.weights:
            source = shapes[(expert.class_path, "gate_up_proj")]
            fused_last = re.search(r"2 \* self\.\w+\)+$", source) is not None
            assert fused_last == expert.transposed, f"{expert.class_path}: {source}"


# ---- each hand-read layout, by the layer's own forward pass ------------------------------------------------


def assert_outputs_depend_on_single_units(
    param: nn.Parameter, outputs: torch.Tensor, truth: Units, limit: int = 400
) -> None:
    """Every output entry's gradient w.r.t. ``param`` lies within one output unit, and every unit is reached.

    A unit is an index along ``truth.out_dims`` (plus the input block of dim 0 when ``groups > 1``): this is
    what "these dims index output units" means, measured independently of any registry.
    """
    block = param.shape[0] // truth.groups
    reached = set()
    flat = outputs.reshape(-1)
    for k in range(min(flat.numel(), limit)):
        (grad,) = torch.autograd.grad(flat[k], param, retain_graph=True)
        units = {
            tuple(int(i[d]) for d in truth.out_dims) + ((int(i[0]) // block,) if truth.groups > 1 else ())
            for i in grad.nonzero()
        }
        assert len(units) <= 1, f"output {k} depends on several units {sorted(units)[:4]}: not the output dims"
        reached |= units
    all_units = itertools.product(
        *(range(param.shape[d]) for d in truth.out_dims), *([range(truth.groups)] if truth.groups > 1 else [])
    )
    assert reached == set(all_units)


def _conv1d() -> tuple[nn.Module, str, Callable[[nn.Module], torch.Tensor]]:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(6, 4), "weight", lambda m: m(torch.randn(3, 4, dtype=torch.float64))


def _grouped_linear() -> tuple[nn.Module, str, Callable[[nn.Module], torch.Tensor]]:
    from transformers.models.convbert.modeling_convbert import GroupedLinearLayer

    layer = GroupedLinearLayer(input_size=6, output_size=4, num_groups=2)
    nn.init.normal_(layer.weight)
    return layer, "weight", lambda m: m(torch.randn(2, 3, 6, dtype=torch.float64))


def _moshi_flexible_linear() -> tuple[nn.Module, str, Callable[[nn.Module], torch.Tensor]]:
    from transformers.models.moshi.modeling_moshi import MoshiFlexibleLinear

    return MoshiFlexibleLinear(4, 3, num_layers=2), "weight", lambda m: m(torch.randn(2, 2, 4, dtype=torch.float64))


def _llama4_experts() -> tuple[nn.Module, str, Callable[[nn.Module], torch.Tensor]]:
    from transformers.models.llama4.configuration_llama4 import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    experts = Llama4TextExperts(Llama4TextConfig(hidden_size=4, intermediate_size=3, num_local_experts=2))
    nn.init.normal_(experts.gate_up_proj)
    nn.init.normal_(experts.down_proj)
    return experts, "down_proj", lambda m: m(torch.randn(2 * 3, 4, dtype=torch.float64))


def _dbrx_w2() -> tuple[nn.Module, str, Callable[[nn.Module], torch.Tensor]]:
    from transformers.models.dbrx.modeling_dbrx import DbrxExperts

    class Config:  # DbrxFFNConfig's fields that DbrxExperts reads
        hidden_size, ffn_hidden_size, moe_num_experts, ffn_act_fn = 4, 3, 2, {"name": "silu"}

    experts = DbrxExperts(Config())
    for p in experts.parameters():
        nn.init.normal_(p)
    tokens = torch.randn(1, 4, 4, dtype=torch.float64)
    chosen = torch.tensor([[0], [1], [0], [1]])
    return experts, "mlp.w2", lambda m: m(tokens, chosen, torch.ones(4, 1, dtype=torch.float64))


FORWARD_CASES: dict[str, tuple[Callable[[], tuple[nn.Module, str, Callable[[nn.Module], torch.Tensor]]], Units]] = {
    "Conv1D": (_conv1d, Units((1,))),
    "GroupedLinearLayer": (_grouped_linear, Units((0, 2))),
    "MoshiFlexibleLinear": (_moshi_flexible_linear, Units((0, 1))),
    "Llama4TextExperts.down_proj": (_llama4_experts, Units((0, 2))),
    "DbrxExpertGLU.w2": (_dbrx_w2, Units((1,), groups=2)),
}


@pytest.mark.parametrize("case", sorted(FORWARD_CASES))
def test_hand_read_layout_is_what_the_forward_pass_does(case: str) -> None:
    build, truth = FORWARD_CASES[case]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer, param_name, forward = build()
    layer = layer.double()
    param = layer.get_parameter(param_name)
    assert_outputs_depend_on_single_units(param, forward(layer), truth)
    owner = layer.get_submodule(param_name.rpartition(".")[0])
    entry = next(
        e
        for e in THIRD_PARTY_LAYOUTS
        if _is_instance_by_path(owner, e.class_path) and e.param == param_name.rpartition(".")[2]
    )
    assert entry.out_dims == truth.out_dims
    assert (getattr(owner, entry.groups_attr) if entry.groups_attr else 1) == truth.groups


def _is_instance_by_path(module: nn.Module, class_path: str) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" == class_path for c in type(module).__mro__)
