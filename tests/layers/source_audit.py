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


_CLASS = re.compile(r"^(?P<indent>[ \t]*)class (?P<name>\w+)\b")
_DECORATOR = re.compile(r"^[ \t]*@(?P<text>.*)$")
_ASSIGNMENT = re.compile(
    r"self\.(?P<attr>\w+)\s*=\s*(?:\(\s*)?(?=(?:\w+\.)*Parameter\()"
)  # also `= (\n  P(...) if c else None)`


def scan(root: Path) -> list[ParamSite]:
    """Every ``self.<attr> = ...Parameter(...)`` in the classes of the package at ``root``.

    Line-based (the class a line belongs to comes from indentation), parsing only each ``Parameter(...)``
    expression: parsing every module of transformers takes most of a minute. ``modular_*`` files (the sources
    transformers generates its modeling files from) are left out.
    """
    sites = []
    for path in sorted(root.rglob("*.py")):
        if path.name.startswith("modular_"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if "Parameter(" in text:
            module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
            sites.extend(_scan_text(text, module, str(path.relative_to(root.parent))))
    return sites


def _scan_text(text: str, module: str, file: str) -> list[ParamSite]:
    sites = []
    classes: list[tuple[int, str, tuple[str, ...]]] = []  # (indent, qualified name, decorators), innermost last
    decorators: list[str] = []
    matches = list(_ASSIGNMENT.finditer(text))
    offset = 0
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped and not stripped.startswith(("#", "@", ")", "]", "}")):
            while classes and indent <= classes[-1][0]:
                classes.pop()
        class_match = _CLASS.match(line)
        if class_match:
            outer = classes[-1][1] + "." if classes else ""
            classes.append((indent, outer + class_match["name"], tuple(decorators)))
            decorators = []
        elif (decorator := _DECORATOR.match(line)) is not None and indent == 0:
            decorators.append(decorator["text"].strip())
        elif stripped and indent == 0:
            decorators = []
        end = offset + len(line)
        while matches and matches[0].start() < end:
            match = matches.pop(0)
            site = (
                None
                if not classes or stripped.startswith("#")
                else _site(text, match.end(), match["attr"], classes, module, file)
            )
            if site is not None:
                sites.append(site)
        offset = end
    return sites


def _site(
    text: str, start: int, attr: str, classes: list[tuple[int, str, tuple[str, ...]]], module: str, file: str
) -> ParamSite | None:
    try:
        call = ast.parse(_balanced_call(text, start), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(call, ast.Call):
        return None
    _, name, decorators = classes[-1]
    return ParamSite(f"{module}.{name}", attr, ast.unparse(call), _ndim(call), decorators, file)


def _balanced_call(text: str, start: int) -> str:
    """The call expression starting at ``start`` (``nn.Parameter(...)``), up to its closing parenthesis."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] in "([{":
            depth += 1
        elif text[index] in ")]}":
            depth -= 1
            if depth == 0:
                return text[start : index + 1]
    return text[start:]


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


_TOP_LEVEL_CLASS = re.compile(r"^class (\w+)\b", re.MULTILINE)
_LINEAR_OF_WEIGHT = re.compile(r"\blinear\((?:[^()]|\([^()]*\))*?self\.weight\b")


def linear_weight_classes(root: Path, sites: list[ParamSite]) -> list[str]:
    """Top-level classes that build a 2-D bare ``self.weight`` and apply it with ``F.linear`` (stored ``(out, in)``).

    MoE routers (``(num_experts, hidden)``) mostly: the dim-0 rule is right for them, and registering them
    turns "assumed" into a stated layout.
    """
    two_d = {
        s.class_path for s in sites if s.attr == "weight" and s.ndim == 2 and "requires_grad=False" not in s.source
    }
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name.startswith("modular_"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if "linear(" not in text:
            continue
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        starts = [(m.start(), m[1]) for m in _TOP_LEVEL_CLASS.finditer(text)] + [(len(text), "")]
        for (start, name), (end, _) in zip(starts, starts[1:]):
            if f"{module}.{name}" in two_d and _LINEAR_OF_WEIGHT.search(text, start, end):
                found.append(f"{module}.{name}")
    return found


REASON_NAMES = dict(
    zip(
        (reason for reason, _ in NON_NEURON_CATEGORIES),
        ("_TOKEN", "_QUERIES", "_POSITION", "_RELATIVE", "_SCALE", "_CODEBOOK"),
    )
)


def generated_entries(root: Path) -> list[tuple[str, str, tuple[int, ...] | None, str]]:
    """``(class_path, param, out_dims, reason)`` for the generated part of the table, in its order."""
    sites = scan(root)
    entries: list[tuple[str, str, tuple[int, ...] | None, str]] = []
    for expert in expert_classes(sites):
        dims, reason = ((0, 2), "_EXPERTS_IN_OUT") if expert.transposed else ((0, 1), "_EXPERTS_OUT_IN")
        entries += [(expert.class_path, weight, dims, reason) for weight in expert.weights]
        entries += [(expert.class_path, bias, None, "_EXPERT_BIAS") for bias in expert.biases]
    for site in sorted(non_neuron_sites(sites), key=lambda s: (s.class_path, s.attr)):
        entries.append((site.class_path, site.attr, None, REASON_NAMES[non_neuron_reason(site.attr) or ""]))
    entries += [(path, "weight", (0,), "_LINEAR_WEIGHT") for path in linear_weight_classes(root, sites)]
    return entries


def main(root: Path) -> None:
    """Print the generated entries as the table writes them (shapes as comments)."""
    shapes = {(s.class_path, s.attr): s.source for s in scan(root)}
    for path, param, dims, reason in generated_entries(root):
        comment = re.sub(
            r"^(\w+\.)*Parameter\(|, \*\*dd|, (dtype|device|requires_grad)=[\w.]+", "", shapes[(path, param)]
        )
        print(f'    LayerLayout("{path}", "{param}", {dims}, reason={reason}),  # {comment[:-1][:90]}')


if __name__ == "__main__":
    main(Path(sys.argv[1]))
