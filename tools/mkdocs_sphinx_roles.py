"""Griffe extension for the docs site: the package's docstring habits, rendered by mkdocstrings.

- Sphinx roles become checked cross-references (below).
- ``Example:`` sections are read as ``Examples:`` (so their ``>>>`` lines are shown as Python sessions).
- ``a, b, c: as in X`` in ``Args:`` documents each of ``a``, ``b`` and ``c``.

The package's docstrings use reST roles (``:class:`~lightning_gc.plan.GCPlan```, ``:func:`status```).
mkdocstrings renders Markdown, where a role would show as raw text, so each role is rewritten into an
optional autorefs link (a link where the target has a page, inline code elsewhere) once the whole package
is loaded. A role naming something that does not exist is logged as a warning, which fails
``mkdocs build --strict``: a renamed function cannot leave a dangling reference behind.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(class|func|meth|data|mod|attr|exc|obj|const):`(~?)([^`<>]+?)(\(\))?`")
EXAMPLE_HEADING = re.compile(r"(?m)^(\s*)Example:[ \t]*$")
SHARED_ARGUMENTS = re.compile(r"^(\s+)([A-Za-z_]\w*(?:, [A-Za-z_]\w*)+): (.*)$")


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                text = EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
                text = _split_shared_arguments(text)
                obj.docstring.value = ROLE.sub(lambda m, obj=obj: _link(pkg, obj, m), text)


def _split_shared_arguments(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = SHARED_ARGUMENTS.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, names, first = match.groups()
        j = i + 1
        while j < len(lines) and lines[j].strip() and len(lines[j]) - len(lines[j].lstrip()) > len(indent):
            j += 1
        for name in names.split(", "):
            out.append(f"{indent}{name}: {first}")
            out.extend(lines[i + 1 : j])
        i = j
    return "\n".join(out)


def _walk(obj: griffe.Object) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)  # type: ignore[arg-type]


def _link(pkg: griffe.Module, obj: griffe.Object, match: re.Match[str]) -> str:
    role, short, target, call = match.groups()
    title = (target.rsplit(".", 1)[-1] if short else target) + (call or "")
    if target.split(".", 1)[0] != pkg.name and _resolve(pkg, obj, target.split(".", 1)[0]) is None:
        return f"`{title}`"  # another library's name (pathlib.Path, torch.Tensor): shown as code
    path = _resolve(pkg, obj, target)
    if path is None:
        griffe.logger.warning(f"{obj.path}: the docstring's :{role}:`{target}` names nothing in {pkg.name}")
        return f"`{title}`"
    return f'<autoref identifier="{path}" optional><code>{title}</code></autoref>'


def _resolve(pkg: griffe.Module, obj: griffe.Object, target: str) -> str | None:
    scopes = [s for s in (obj, obj.parent, obj.module, pkg) if s is not None]
    head, _, rest = target.partition(".")
    candidates = [target]
    for scope in scopes:
        try:
            base = scope.resolve(head)
        except (griffe.NameResolutionError, AttributeError):
            continue
        candidates.append(f"{base}.{rest}" if rest else base)
    for candidate in candidates:
        found = _canonical(pkg, candidate)
        if found is not None:
            return found
    return None


def _canonical(pkg: griffe.Module, path: str) -> str | None:
    """The defining path of ``path`` in ``pkg`` (aliases followed: ``lightning_gc.X`` -> where X is defined)."""
    if path == pkg.path:
        return path
    if not path.startswith(pkg.path + "."):
        return None
    try:
        member = pkg[path[len(pkg.path) + 1 :]]
        return str(member.final_target.path if member.is_alias else member.path)
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
