"""``lightning-gc new``: render a template project (a cookiecutter template shipped with the package).

Example:
    lightning-gc new --list
    lightning-gc new digits-cnn my-digits --name "My Digits"
"""

from __future__ import annotations

import argparse
import json
import keyword
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Names a rendered project's package must not take: it would shadow a module the project imports or a
# file of its own (`train.py`, the `tests` folder).
RESERVED_PACKAGE_NAMES = frozenset(
    {
        "train",
        "tests",
        "configs",
        "data",
        "lightning",
        "lightning_gc",
        "pytorch_lightning",
        "torch",
        "torchmetrics",
        "jsonargparse",
        "matplotlib",
        "numpy",
        "tensorboard",
        "mlxtend",
        "nibabel",
        "nilearn",
        "scattertext",
    }
)


# PEP 508 project names: what `pip install` accepts for the rendered project's `[project] name`.
_DISTRIBUTION_NAME = re.compile(r"^([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9])$")


class TemplateError(ValueError):
    """A template name, project name or destination that ``lightning-gc new`` refuses."""


@dataclass(frozen=True)
class Template:
    """A cookiecutter template found by :func:`find_templates`.

    Args:
        name: the folder name, as given to ``lightning-gc new``.
        path: the folder holding ``cookiecutter.json``.
        description: the one-line ``_description`` from ``cookiecutter.json``.
    """

    name: str
    path: Path
    description: str


def templates_root() -> Path:
    """The folder holding the templates: inside the installed package, else the source tree's ``templates/``.

    Raises:
        FileNotFoundError: when neither exists (a broken installation).

    Example:
        >>> (templates_root() / "digits-cnn" / "cookiecutter.json").is_file()
        True
    """
    package_dir = Path(__file__).resolve().parent.parent
    for candidate in (package_dir / "_templates", package_dir.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"no templates found in {package_dir / '_templates'} nor {package_dir.parent / 'templates'}"
    )


def find_templates(root: Path | None = None) -> dict[str, Template]:
    """Every template under ``root`` (default :func:`templates_root`), by name, sorted.

    Example:
        >>> "digits-cnn" in find_templates()
        True
    """
    root = templates_root() if root is None else root
    found = {}
    for spec in sorted(root.glob("*/cookiecutter.json")):
        context = json.loads(spec.read_text(encoding="utf-8"))
        found[spec.parent.name] = Template(spec.parent.name, spec.parent, str(context.get("_description", "")))
    return found


def derived_names(template: Template, project_name: str) -> dict[str, str]:
    """The context cookiecutter will render for ``project_name``, with the template's derived names.

    Uses cookiecutter's own context machinery so that the slug and package name are exactly those the
    template's Jinja expressions produce.
    """
    from cookiecutter.generate import generate_context
    from cookiecutter.prompt import prompt_for_config

    context = generate_context(
        context_file=str(template.path / "cookiecutter.json"), extra_context={"project_name": project_name}
    )
    return {k: str(v) for k, v in prompt_for_config(context, no_input=True).items() if not k.startswith("_")}


def check_names(names: dict[str, str], project_name: str) -> None:
    """Refuse derived names that Python cannot import or pip cannot install, or that shadow another module.

    Args:
        names: the rendered context, with ``project_slug`` and ``package_name``.
        project_name: the name given by the user, for the message.

    Raises:
        TemplateError: naming the project name, the derived name and what is wrong.

    Example:
        >>> check_names({"project_slug": "my-digits", "package_name": "my_digits"}, "My Digits")
        >>> check_names({"project_slug": "2digits", "package_name": "2digits"}, "2digits")
        Traceback (most recent call last):
        ...
        lightning_gc.cli.new.TemplateError: project name '2digits' gives package name '2digits', which is not a valid Python package name: use letters, digits, '_', '-' or spaces, starting with a letter
    """
    package_name, slug = names["package_name"], names["project_slug"]
    problem = None
    if not (package_name.isascii() and package_name.isidentifier()):
        problem = (
            "which is not a valid Python package name: use letters, digits, '_', '-' or spaces, starting with a letter"
        )
    elif keyword.iskeyword(package_name):
        problem = "which is a Python keyword"
    elif package_name in sys.stdlib_module_names:
        problem = "which would shadow the standard library module of that name"
    elif package_name in RESERVED_PACKAGE_NAMES:
        problem = "which would shadow a module or folder the project uses"
    if problem:
        raise TemplateError(f"project name {project_name!r} gives package name {package_name!r}, {problem}")
    if not _DISTRIBUTION_NAME.match(slug):
        raise TemplateError(
            f"project name {project_name!r} gives distribution name {slug!r}, which pip cannot install:"
            " start and end with a letter or digit"
        )


def render(template_name: str, destination: str | os.PathLike, project_name: str | None = None) -> Path:
    """Render template ``template_name`` into the folder ``destination``.

    The project is rendered into a temporary folder beside ``destination`` and renamed into place, so a
    failure leaves nothing behind.

    Args:
        template_name: a name from :func:`find_templates`.
        destination: the project folder to create; it may exist only if empty.
        project_name: the human name (``"My Digits"``); defaults to ``destination``'s folder name.

    Returns:
        The rendered project's folder.

    Raises:
        TemplateError: for an unknown template, a non-empty destination, or a project name whose package
            name is not a valid, non-shadowing Python package name.

    Example:
        ``render("digits-cnn", "my-digits", "My Digits")`` creates ``./my-digits`` holding the package
        ``my_digits``, as ``lightning-gc new digits-cnn my-digits --name "My Digits"`` does.
    """
    templates = find_templates()
    if template_name not in templates:
        raise TemplateError(f"unknown template {template_name!r}; available: {', '.join(templates) or 'none'}")
    template = templates[template_name]
    destination = Path(destination).expanduser().absolute()
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise TemplateError(f"destination {str(destination)!r} exists and is not an empty folder; pick a new one")
    project_name = destination.name if project_name is None else project_name
    if not project_name.strip():
        raise TemplateError("`--name` must not be empty")
    check_names(derived_names(template, project_name), project_name)
    with _created_parents(destination.parent):
        _render_into(template, destination, project_name)
    return destination


def _render_into(template: Template, destination: Path, project_name: str) -> None:
    from cookiecutter.main import cookiecutter

    with tempfile.TemporaryDirectory(prefix=".lightning-gc-new-", dir=destination.parent) as tmp:
        # A private cookiecutter config: no user defaults leak in, no replay file lands in the home folder.
        config = {"cookiecutters_dir": os.path.join(tmp, "cache"), "replay_dir": os.path.join(tmp, "replay")}
        rendered = cookiecutter(
            str(template.path),
            no_input=True,
            extra_context={"project_name": project_name},
            output_dir=os.path.join(tmp, "out"),
            default_config=config,
            accept_hooks=False,
        )
        if destination.is_dir():  # empty, checked above
            destination.rmdir()
        os.replace(rendered, destination)


@contextmanager
def _created_parents(folder: Path) -> Iterator[None]:
    """Create ``folder`` and missing parents; remove those it created if the body fails."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for created in missing:  # deepest first
            shutil.rmtree(created, ignore_errors=True)
        raise


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``new`` subcommand to the ``lightning-gc`` parser."""
    parser = subparsers.add_parser(
        "new",
        help="create a project from a template",
        description="Create a ready-to-train project (LightningCLI, configs with and without GC, tests) from a template.",
    )
    parser.add_argument("template", nargs="?", help="template name (see --list)")
    parser.add_argument("destination", nargs="?", help="folder to create (must not exist, or be empty)")
    parser.add_argument("--name", help="project name, e.g. 'My Digits' (default: the destination's folder name)")
    parser.add_argument("--list", action="store_true", help="list the templates and exit")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Run ``lightning-gc new`` for parsed ``args``; returns the exit code."""
    if args.list:
        templates = find_templates()
        width = max((len(name) for name in templates), default=0)
        for template in templates.values():
            print(f"{template.name:<{width}}  {template.description}")
        return 0
    if not args.template or not args.destination:
        print("lightning-gc new: error: give TEMPLATE and DESTINATION, or --list", file=sys.stderr)
        return 2
    try:
        project = render(args.template, args.destination, args.name)
    except TemplateError as err:
        print(f"lightning-gc new: error: {err}", file=sys.stderr)
        return 2
    print(
        f"Created {project}\nNext: cd {project} and read README.md (train: python train.py fit --config configs/gc.yaml)"
    )
    return 0
