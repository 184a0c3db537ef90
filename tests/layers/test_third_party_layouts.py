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
import source_audit
import torch
from layer_zoo import DIM0, SKIP_BIAS, SKIP_TOKEN, Skip, Truth, Units, run_and_check
from torch import nn

import lightning_gc
from lightning_gc import third_party_layouts
from lightning_gc.third_party_layouts import THIRD_PARTY_LAYOUTS

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


def _csm_codebooks_head() -> tuple[nn.Module, str, Callable[[nn.Module], torch.Tensor]]:
    from transformers.models.csm.modeling_csm import CsmCodebooksHead

    head = CsmCodebooksHead(hidden_size=4, num_codebooks=3, vocab_size=5)
    nn.init.normal_(head.weight)
    hidden = torch.randn(2, 2, 4, dtype=torch.float64)
    return head, "weight", lambda m: m(hidden, codebook_indices=torch.tensor([1, 2]))


def _jetmoe_parallel_experts() -> tuple[nn.Module, str, Callable[[nn.Module], torch.Tensor]]:
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeParallelExperts

    experts = JetMoeParallelExperts(num_experts=2, input_size=4, output_size=3)
    nn.init.normal_(experts.weight)
    return experts, "weight", lambda m: m(torch.randn(5, 4, dtype=torch.float64), [2, 3])


FORWARD_CASES: dict[str, tuple[Callable[[], tuple[nn.Module, str, Callable[[nn.Module], torch.Tensor]]], Units]] = {
    "Conv1D": (_conv1d, Units((1,))),
    "GroupedLinearLayer": (_grouped_linear, Units((0, 2))),
    "MoshiFlexibleLinear": (_moshi_flexible_linear, Units((0, 1))),
    "Llama4TextExperts.down_proj": (_llama4_experts, Units((0, 2))),
    "DbrxExpertGLU.w2": (_dbrx_w2, Units((1,), groups=2)),
    "CsmCodebooksHead": (_csm_codebooks_head, Units((0, 2))),
    "JetMoeParallelExperts": (_jetmoe_parallel_experts, Units((0, 1))),
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


# ---- timm and torchvision layers by stand-ins, through centralize_gradients --------------------------------


def stand_in(class_path: str, base: type[nn.Module] = nn.Module) -> type[nn.Module]:
    """A class that the registry cannot tell from the real one: same ``__module__`` and ``__qualname__``."""
    module, _, name = class_path.rpartition(".")
    return type(name, (base,), {"__module__": module, "__qualname__": name})


def with_params(cls: type[nn.Module], *args: object, **shapes: tuple[int, ...]) -> nn.Module:
    layer = cls(*args)
    for attr, shape in shapes.items():
        setattr(layer, attr, nn.Parameter(torch.zeros(shape, dtype=torch.float64)))
    return layer


def timm_torchvision_zoo() -> nn.ModuleDict:
    """Stand-ins with the shapes each source builds (file and class in the table's comments)."""
    tv_swin = stand_in("torchvision.models.swin_transformer.ShiftedWindowAttention")
    tv_swin_v2 = type(
        "ShiftedWindowAttentionV2",
        (tv_swin,),
        {"__module__": "torchvision.models.swin_transformer", "__qualname__": "ShiftedWindowAttentionV2"},
    )
    layers = {
        # timm.models.vision_transformer.VisionTransformer: cls_token (1, 1, D), reg_token (1, R, D), pos_embed (1, N, D)
        "vit": with_params(
            stand_in("timm.models.vision_transformer.VisionTransformer"),
            cls_token=(1, 1, 8),
            reg_token=(1, 2, 8),
            pos_embed=(1, 7, 8),
        ),
        # timm.layers.std_conv.ScaledStdConv2d(nn.Conv2d): gain (out, 1, 1, 1)
        "std_conv": with_params(
            stand_in("timm.layers.std_conv.ScaledStdConv2d", nn.Conv2d), 3, 4, 3, gain=(4, 1, 1, 1)
        ),
        # timm.models.swin_transformer.WindowAttention: relative_position_bias_table ((2w-1)^2, heads)
        "swin": with_params(
            stand_in("timm.models.swin_transformer.WindowAttention"), relative_position_bias_table=(9, 2)
        ),
        # timm.models.swin_transformer_v2.WindowAttention: logit_scale (heads, 1, 1)
        "swin_v2": with_params(stand_in("timm.models.swin_transformer_v2.WindowAttention"), logit_scale=(2, 1, 1)),
        # timm.models.fastvit.LayerScale2d: gamma (dim, 1, 1)
        "layer_scale": with_params(stand_in("timm.models.fastvit.LayerScale2d"), gamma=(4, 1, 1)),
        # timm.models.beit.Attention: relative_position_bias_table (num_relative_distance, heads)
        "beit_attn": with_params(stand_in("timm.models.beit.Attention"), relative_position_bias_table=(12, 2)),
        # timm.layers.attention2d.MultiQueryAttentionV2: (heads, key_dim, dim), (dim, key_dim), (dim, v_dim), (dim_out, heads, v_dim)
        "mqa": with_params(
            stand_in("timm.layers.attention2d.MultiQueryAttentionV2"),
            query_proj=(2, 3, 5),
            key_proj=(5, 3),
            value_proj=(5, 4),
            out_proj=(6, 2, 4),
        ),
        # timm.layers.ml_decoder.MLDecoder: duplicate_pooling (K, D, G)
        "ml_decoder": with_params(stand_in("timm.layers.ml_decoder.MLDecoder"), duplicate_pooling=(3, 5, 2)),
        # timm.layers.cond_conv2d.CondConv2d: weight (experts, out * in * kh * kw)
        "cond_conv": with_params(stand_in("timm.layers.cond_conv2d.CondConv2d"), weight=(3, 4 * 2 * 3 * 3)),
        # torchvision.models.convnext.CNBlock: layer_scale (dim, 1, 1)
        "cnblock": with_params(stand_in("torchvision.models.convnext.CNBlock"), layer_scale=(4, 1, 1)),
        # torchvision.models.swin_transformer.ShiftedWindowAttention(V2): table ((2w-1)^2, heads); V2 logit_scale (heads, 1, 1)
        "tv_swin": with_params(tv_swin, relative_position_bias_table=(9, 2)),
        "tv_swin_v2": with_params(tv_swin_v2, logit_scale=(2, 1, 1)),
        # torchvision.models.vision_transformer: VisionTransformer.class_token (1, 1, D), Encoder.pos_embedding (1, S, D)
        "tv_vit": with_params(
            stand_in("torchvision.models.vision_transformer.VisionTransformer"), class_token=(1, 1, 8)
        ),
        "tv_encoder": with_params(stand_in("torchvision.models.vision_transformer.Encoder"), pos_embedding=(1, 5, 8)),
        # torchvision.ops.deform_conv.DeformConv2d (an nn.Module, not an nn.Conv2d): weight (out, in // groups, kh, kw)
        "deform": with_params(stand_in("torchvision.ops.deform_conv.DeformConv2d"), weight=(4, 2, 3, 3)),
    }
    return nn.ModuleDict(layers).double()


STAND_IN_TABLE: list[tuple[str, Truth]] = [
    ("*bias", SKIP_BIAS),
    ("vit.*", SKIP_TOKEN),
    ("tv_vit.*", SKIP_TOKEN),
    ("tv_encoder.*", SKIP_TOKEN),
    ("*relative_position_bias_table", SKIP_TOKEN),
    ("*.gain", Skip("ScaledStdConv2d gain (out, 1, 1, 1)")),
    ("*.logit_scale", Skip("Swin V2 logit scale (heads, 1, 1)")),
    ("*.gamma", Skip("layer scale (dim, 1, 1)")),
    ("*.layer_scale", Skip("ConvNeXt layer scale (dim, 1, 1)")),
    ("cond_conv.weight", Skip("per-expert kernels flattened: units not addressable")),
    ("mqa.query_proj", Units((0, 1))),
    ("mqa.key_proj", Units((1,))),
    ("mqa.value_proj", Units((1,))),
    ("mqa.out_proj", DIM0),
    ("ml_decoder.duplicate_pooling", Units((0, 2))),
    ("*.weight", DIM0),
]


def test_timm_and_torchvision_layers_by_stand_ins() -> None:
    run_and_check(timm_torchvision_zoo(), STAND_IN_TABLE, lightning_gc.centralize_gradients)


# ---- every entry, through the real registry and describe --------------------------------------------------


def _concrete_name(pattern: str) -> str:
    """A parameter name that ``pattern`` (fnmatch) matches: ``*`` -> ``x``, ``[12]`` -> ``1``."""
    name = re.sub(r"\[(.)[^\]]*\]", r"\1", pattern).replace("*", "x").replace("?", "x")
    assert fnmatch.fnmatchcase(name, pattern)
    return name


def _shape_for(out_dims: tuple[int, ...] | None) -> tuple[int, ...]:
    ndim = 3 if out_dims is None else max(out_dims) + 2
    return tuple(range(2, 2 + ndim))


def test_each_entry_decides_its_parameter() -> None:
    """A layer at each entry's class path gets the entry's decision and averaged dims in describe().

    One test over all entries (some 600): a test each would spend most of the time budget in pytest itself.
    """
    wrong = [problem for entry in THIRD_PARTY_LAYOUTS if (problem := _decision_problem(entry))]
    assert not wrong, "\n".join(wrong)


def _decision_problem(entry: third_party_layouts.LayerLayout) -> str:
    name = _concrete_name(entry.param)
    shape = _shape_for(entry.out_dims)
    layer = stand_in(entry.class_path)()
    groups = 1
    if entry.groups_attr is not None:
        groups = 2
        setattr(layer, entry.groups_attr, groups)
    setattr(layer, name, nn.Parameter(torch.zeros(shape)))
    (row,) = [r for r in lightning_gc.describe(layer, exclude_modules=[]).rows if r.name == name]
    where = f"{entry.class_path}.{name} {shape}: {row}"
    if entry.out_dims is None:
        return "" if row.decision == "skipped" and row.reason == entry.reason else where
    averaged = tuple(d for d in range(len(shape)) if d not in entry.out_dims)
    ok = row.decision == "centralized" and row.dims == averaged and row.layout is not None
    return "" if ok and row.layout.groups == groups else where
