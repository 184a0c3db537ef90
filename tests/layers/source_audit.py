"""Reads a library's source (never imports it) for the parameters whose layout GC must know.

The third-party layout table (``lightning_gc/third_party_layouts.py``) was written from this scan of
transformers (installed), timm and torchvision (their sources; their wheels cannot load beside the CPU
torch). The tests run it on the installed transformers to check the table against what is really there:
run ``python tests/layers/source_audit.py PATH/TO/transformers`` to print the generated part of the table
again when the pinned transformers version is raised.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# Names of learned parameters that are not neuron weights: tokens, position embeddings and tables,
# scales. Matched whole; the reason each gets in the table is the first category whose pattern matches.
NON_NEURON_CATEGORIES: tuple[tuple[str, str], ...] = (
    (
        "learned token(s), not a neuron weight",
        r"cls_token\d*|cls_emb|dist_token|distillation_token|reg_token|register_tokens|cls_register_token|mask_token|"
        r"mask_tokens|mask_emb|class_token|class_embedding|detection_tokens|group_token|segment_token_\w+|type_token_\w+|"
        r"no_memory_embedding|no_object_pointer|occlusion_spatial_embedding_parameter|image_newline|view_separator|"
        r"dummy_node|global_img_feature_extensor|sub_img_feature_extensor|text_prompt|pad_(?:up|down|left|right)",
    ),
    (
        "learned queries/latents, not a neuron weight",
        r"query_tokens|latents?|latents_[12]d|latent_query|probe|pooling_attention_query|query",
    ),
    (
        "position embedding, not a neuron weight",
        r"pos_embed\w*|position_embeddings?|positional_embedding\w*|position_embedding_table|pos_embedding|pos_emb|"
        r"patch_pos|pixel_pos|level_embed|seg_embed|time_embeddings|decoder_position_embeddings|"
        r"mid_position_embeddings|class_pos_emb|position_enc|image_positions|no_memory_positional_encoding|"
        r"memory_temporal_positional_encoding|spatial_pos|temporal_pos",
    ),
    (
        "relative-position table/bias, not a neuron weight",
        r"relative_position_bias_table|relative_attention_bias|rel_pos_[hwt]|height_rel|width_rel|attention_biases|"
        r"pos_bias_[uv]|position_bias|rpb|emb_rel_[kv]|r_[rsw]_bias|bias_[uv]",
    ),
    (
        "a per-channel scale (layer scale, gain, temperature), not a neuron weight",
        r"logit_scale|temperature|layer_scale\w*|lambda_?\d|gamma\w*|gain|scale|alpha_cross_attn|alpha_dense|"
        r"gru_rel_pos_const|log_scale|translate|time_mix_\w+|alpha|beta",
    ),
    ("a codebook (lookup rows), not a neuron weight", r"codevectors|label_embeddings_concat"),
)

_CATEGORY_PATTERNS = tuple((reason, re.compile(f"(?:{pattern})")) for reason, pattern in NON_NEURON_CATEGORIES)


def non_neuron_reason(name: str) -> str | None:
    """The table's reason for a parameter of this name, if the name marks a non-neuron parameter."""
    for reason, pattern in _CATEGORY_PATTERNS:
        if pattern.fullmatch(name):
            return reason
    return None


@dataclass(frozen=True)
class ParamSite:
    """One ``self.<attr> = nn.Parameter(...)`` in a class body, as written in the source."""

    class_path: str
    attr: str
    source: str
    ndim: int | None  # from a literal shape (``torch.zeros(a, b)``); None where the source does not say
    decorators: tuple[str, ...]
    file: str


def scan(root: Path) -> list[ParamSite]:
    """Every parameter assignment in the classes of the package at ``root`` (``modular_*`` sources left out)."""
    sites = []
    for path in sorted(root.rglob("*.py")):
        if path.name.startswith("modular_"):  # transformers' generators of the modeling files
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        for cls in (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)):
            decorators = tuple(ast.unparse(d) for d in cls.decorator_list)
            for node in ast.walk(cls):
                site = _param_site(node, f"{module}.{cls.name}", decorators, str(path.relative_to(root.parent)))
                if site is not None:
                    sites.append(site)
    return sites


def _param_site(node: ast.AST, class_path: str, decorators: tuple[str, ...], file: str) -> ParamSite | None:
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
        return None
    target = ast.unparse(node.targets[0])
    value = node.value.body if isinstance(node.value, ast.IfExp) else node.value  # `P(...) if flag else None`
    if not (target.startswith("self.") and isinstance(value, ast.Call)):
        return None
    if not ast.unparse(value.func).endswith("Parameter"):
        return None
    return ParamSite(class_path, target[5:], ast.unparse(value), _ndim(value), decorators, file)


def _ndim(call: ast.Call) -> int | None:
    if not call.args:
        return None
    inner = call.args[0]
    if isinstance(inner, ast.BinOp):  # `init_value * torch.ones(dim)`
        inner = inner.right if isinstance(inner.right, ast.Call) else inner.left
    if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute) and inner.func.attr == "normal_":
        inner = inner.func.value  # `torch.empty(...).normal_(std=...)`
    if not isinstance(inner, ast.Call):
        return None
    if not re.search(r"\b(zeros|empty|ones|randn|rand|Tensor|FloatTensor)$", ast.unparse(inner.func)):
        return None
    shape = inner.args
    if len(shape) == 1 and isinstance(shape[0], (ast.Tuple, ast.List)):
        shape = shape[0].elts
    if any(isinstance(s, ast.Starred) for s in shape) or not shape:
        return None
    if len(shape) == 1 and not isinstance(shape[0], (ast.Constant, ast.Name, ast.Attribute, ast.BinOp)):
        return None
    return len(shape)


@dataclass(frozen=True)
class ExpertClass:
    """A transformers class decorated ``@use_experts_implementation``: expert weights stacked ``(E, ...)``."""

    class_path: str
    transposed: bool  # `is_transposed=True`: `(E, in, out)`; otherwise `(E, out, in)`
    weights: tuple[str, ...]  # its stacked weight tensors (3-D)
    biases: tuple[str, ...]  # its stacked biases `(E, out)`


def expert_classes(sites: list[ParamSite]) -> list[ExpertClass]:
    """The ``@use_experts_implementation`` classes among ``sites``, with their stacked weights and biases."""
    by_class: dict[str, list[ParamSite]] = {}
    for site in sites:
        if any("use_experts_implementation" in d for d in site.decorators):
            by_class.setdefault(site.class_path, []).append(site)
    experts = []
    for path, class_sites in sorted(by_class.items()):
        decorator = next(d for d in class_sites[0].decorators if "use_experts_implementation" in d)
        transposed = "is_transposed=True" in decorator.replace(" ", "")
        weights = tuple(s.attr for s in class_sites if not s.attr.endswith("bias"))
        biases = tuple(s.attr for s in class_sites if s.attr.endswith("bias"))
        experts.append(ExpertClass(path, transposed, weights, biases))
    return experts


def non_neuron_sites(sites: list[ParamSite]) -> list[ParamSite]:
    """Sites whose name marks a non-neuron parameter and that are not known to be 1-D (those GC skips anyway)."""
    found: dict[tuple[str, str], ParamSite] = {}
    for site in sites:
        if non_neuron_reason(site.attr) is None or (site.ndim is not None and site.ndim < 2):
            continue
        if any("use_experts_implementation" in d for d in site.decorators):
            continue
        found.setdefault((site.class_path, site.attr), site)
    return list(found.values())


def main(root: Path) -> None:
    sites = scan(root)
    for expert in expert_classes(sites):
        print(f"    ({expert.class_path!r}, {expert.transposed}, {expert.weights!r}, {expert.biases!r}),")
    print()
    for site in sorted(non_neuron_sites(sites), key=lambda s: (s.class_path, s.attr)):
        print(f"    ({site.class_path!r}, {site.attr!r}),")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
