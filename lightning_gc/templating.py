"""Template projects: finding them, checking names and destinations, and rendering them safely.

The templates are cookiecutter templates (``templates/<name>/cookiecutter.json`` and a
``{{cookiecutter.project_slug}}`` folder), shipped in the wheel as ``lightning_gc/_templates``. They are
rendered here with a sandboxed Jinja environment in which everything the user gives (the project name, the
destination's folder name) is *data*: it is checked first, then substituted, and never parsed as a template,
so a name such as ``{{ cycler.__init__.__globals__.os.system('id') }}`` can never run anything.

Used by ``lightning-gc new`` (the command line) and by ``lightning-gc compare`` (which renders a template
into a temporary folder).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import keyword
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from jinja2.sandbox import SandboxedEnvironment

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

# The folder a render works in, beside the destination; renamed into place once complete.
TEMPORARY_PREFIX = ".lightning-gc-new-"

# PEP 508 project names: what `pip install` accepts for the rendered project's `[project] name`.
_DISTRIBUTION_NAME = re.compile(r"^([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9])$")
# What a project name may hold: its package name must be an identifier anyway, and these are all that
# survive `lower()` and the space/dash replacements into one.
_PROJECT_NAME = re.compile(r"^[A-Za-z0-9_ -]+$")
# Path parts of the template written as `{{cookiecutter.key}}`, the only Jinja a path may hold.
_PATH_VARIABLE = re.compile(r"\{\{\s*cookiecutter\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class TemplateError(ValueError):
    """A template name, project name or destination that ``lightning-gc new`` refuses, with the reason."""


@dataclass(frozen=True)
class Template:
    """A template found by :func:`find_templates`.

    Args:
        name: the folder name, as given to ``lightning-gc new``.
        path: the folder holding ``cookiecutter.json``.
        description: the one-line ``_description`` from ``cookiecutter.json``.
    """

    name: str
    path: Path
    description: str


@dataclass(frozen=True)
class Requirement:
    """The ``lightning-gc`` requirement written into a rendered project's ``pyproject.toml``.

    Args:
        spec: the PEP 508 requirement, e.g. ``lightning-gc==0.1.0`` or ``lightning-gc @ file:///...whl``.
        origin: where that is from, as a phrase for the README ("the package index", "the wheel ...").
    """

    spec: str
    origin: str


def templates_root() -> Path:
    """The folder holding the templates: inside the installed package, else the source tree's ``templates/``.

    Raises:
        FileNotFoundError: when neither exists (a broken installation).

    Example:
        >>> (templates_root() / "digits-cnn" / "cookiecutter.json").is_file()
        True
    """
    package_dir = Path(__file__).resolve().parent
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


def installed_requirement() -> Requirement:
    """The requirement that installs the ``lightning-gc`` running now, from where it came from.

    See :func:`requirement_for`; this one looks at the running package's folder and the installed
    distribution's metadata.

    Example:
        >>> installed_requirement().spec.startswith("lightning-gc")
        True
    """
    try:
        distribution: importlib.metadata.Distribution | None = importlib.metadata.distribution("lightning-gc")
    except importlib.metadata.PackageNotFoundError:
        distribution = None
    return requirement_for(Path(__file__).resolve().parent.parent, distribution)


def requirement_for(source_root: Path, distribution: importlib.metadata.Distribution | None) -> Requirement:
    """The ``lightning-gc`` requirement for a package imported from ``source_root``, installed as ``distribution``.

    - ``source_root`` is a lightning-gc source checkout (an editable install, or the tree on ``PYTHONPATH``):
      that folder, ``lightning-gc @ file:///path/to/checkout``.
    - Installed from a wheel or sdist file, a URL or a VCS (the distribution's ``direct_url.json``, PEP 610):
      that file or URL.
    - Installed from a package index (no ``direct_url.json``): its version, ``lightning-gc==X.Y.Z``.

    Example:
        >>> requirement_for(Path("/nowhere"), None)
        Requirement(spec='lightning-gc', origin='the package index (no installed lightning-gc was found)')
    """
    if _is_lightning_gc_checkout(source_root):
        return Requirement(f"lightning-gc @ {source_root.as_uri()}", f"the source checkout {source_root}")
    if distribution is None:
        return Requirement("lightning-gc", "the package index (no installed lightning-gc was found)")
    direct = json.loads(distribution.read_text("direct_url.json") or "null")
    if not isinstance(direct, dict) or "url" not in direct:
        return Requirement(f"lightning-gc=={distribution.version}", "the package index")
    url = str(direct["url"])
    vcs = direct.get("vcs_info")
    if isinstance(vcs, dict) and "vcs" in vcs:
        commit = f"@{vcs['commit_id']}" if vcs.get("commit_id") else ""
        return Requirement(f"lightning-gc @ {vcs['vcs']}+{url}{commit}", f"the {vcs['vcs']} repository {url}")
    if url.startswith("file:"):
        path = unquote(urlparse(url).path)
        kind = "wheel" if path.endswith(".whl") else "folder" if "dir_info" in direct else "file"
        return Requirement(f"lightning-gc @ {url}", f"the {kind} {path}")
    return Requirement(f"lightning-gc @ {url}", url)


def _is_lightning_gc_checkout(folder: Path) -> bool:
    pyproject = folder / "pyproject.toml"
    if not pyproject.is_file():
        return False
    return re.search(r'(?m)^name\s*=\s*"lightning-gc"', pyproject.read_text(encoding="utf-8")) is not None


def project_names(template: Template, project_name: str) -> dict[str, str]:
    """The names a project called ``project_name`` gets: the template's context with its derived names.

    ``project_name`` is checked first and then passed to the template's expressions as data.

    Raises:
        TemplateError: when the name, or a name derived from it, is refused (see :func:`check_names`).

    Example:
        >>> names = project_names(find_templates()["digits-cnn"], "My Digits")
        >>> names["project_slug"], names["package_name"]
        ('my-digits', 'my_digits')
    """
    if not project_name.strip():
        raise TemplateError("the project name (`--name`, or the destination's folder name) must not be empty")
    if not _PROJECT_NAME.match(project_name):
        raise TemplateError(
            f"project name {project_name!r} may hold only ASCII letters, digits, spaces, '-' and '_'"
            " (it becomes the package name)"
        )
    spec = json.loads((template.path / "cookiecutter.json").read_text(encoding="utf-8"))
    environment = _environment()
    context: dict[str, str] = {"project_name": project_name}
    for key, default in spec.items():
        if key.startswith("_") or key in context:
            continue
        # Defaults are the template's own text (trusted); earlier values, the user's included, are data.
        context[key] = environment.from_string(str(default)).render(cookiecutter=context)
    check_names(context, project_name)
    return context


def check_names(names: Mapping[str, str], project_name: str) -> None:
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
        lightning_gc.templating.TemplateError: project name '2digits' gives package name '2digits', which is not a valid Python package name: use letters, digits, '_', '-' or spaces, starting with a letter
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


def check_destination(destination: str | os.PathLike[str]) -> Path:
    """The absolute destination folder, or a :class:`TemplateError` saying why a project cannot go there.

    Refused: an existing file or non-empty folder, a symbolic link, a path under a file, a parent that
    cannot be written.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     check_destination(Path(tmp) / "a" / "b").name
        'b'
    """
    path = Path(destination).expanduser().absolute()
    if path.is_symlink():
        raise TemplateError(
            f"destination {str(path)!r} is a symbolic link (to {os.readlink(path)!r}): give a real folder"
        )
    if path.exists():
        if not path.is_dir():
            raise TemplateError(f"destination {str(path)!r} exists and is not a folder; pick a new one")
        if any(path.iterdir()):
            raise TemplateError(f"destination {str(path)!r} exists and is not an empty folder; pick a new one")
    existing = next(p for p in path.parents if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise TemplateError(f"cannot create {str(path)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TemplateError(f"cannot create {str(path)!r}: no permission to write in {str(existing)!r}")
    return path


def render(
    template_name: str,
    destination: str | os.PathLike[str],
    project_name: str | None = None,
    requirement: Requirement | None = None,
) -> Path:
    """Render template ``template_name`` into the folder ``destination``.

    Names and destination are checked before anything is written. The project is rendered into a temporary
    folder beside ``destination`` and renamed into place, so a failure (or SIGTERM, SIGINT, SIGHUP) leaves
    nothing behind; what a SIGKILLed render left is removed by the next render into the same folder.

    Args:
        template_name: a name from :func:`find_templates`.
        destination: the project folder to create; it may exist only if empty.
        project_name: the human name (``"My Digits"``); defaults to ``destination``'s folder name.
        requirement: the ``lightning-gc`` requirement for the project's ``pyproject.toml``; default
            :func:`installed_requirement`.

    Returns:
        The rendered project's folder.

    Raises:
        TemplateError: for an unknown template, a refused name or destination, or a destination that
            could not be written (with the reason).

    Example:
        ``render("digits-cnn", "my-digits", "My Digits")`` creates ``./my-digits`` holding the package
        ``my_digits``, as ``lightning-gc new digits-cnn my-digits --name "My Digits"`` does.
    """
    templates = find_templates()
    if template_name not in templates:
        raise TemplateError(f"unknown template {template_name!r}; available: {', '.join(templates) or 'none'}")
    template = templates[template_name]
    path = check_destination(destination)
    context = project_names(template, path.name if project_name is None else project_name)
    requirement = installed_requirement() if requirement is None else requirement
    context.update(lightning_gc_requirement=requirement.spec, lightning_gc_origin=requirement.origin)
    try:
        with _stopped_by_signals(), _created_parents(path.parent):
            _remove_abandoned_renders(path.parent)
            _render_into(template, context, path)
    except OSError as err:
        raise TemplateError(f"could not create {str(path)!r}: {err.strerror or err}") from err
    return path


def _environment() -> SandboxedEnvironment:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    # keep_trailing_newline: files end as they do in the template (cookiecutter does the same).
    return SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)


def _render_into(template: Template, context: Mapping[str, str], destination: Path) -> None:
    environment = _environment()
    (root,) = (p for p in template.path.iterdir() if p.is_dir() and "{{" in p.name)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-", dir=destination.parent))
    project = tmp / "project"  # made by mkdir, so it gets the user's umask (mkdtemp's folder is private)
    try:
        project.mkdir()
        for source in sorted(root.rglob("*")):
            if "__pycache__" in source.parts:  # left by running a template's tests in place
                continue
            target = project / _render_path(source.relative_to(root), context)
            if source.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            text = environment.from_string(source.read_text(encoding="utf-8")).render(cookiecutter=context)
            _write_file(target, text, stat.S_IMODE(source.stat().st_mode))
        if destination.is_dir():  # empty: checked before rendering
            destination.rmdir()
        os.replace(project, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_file(target: Path, text: str, mode: int) -> None:
    target.write_text(text, encoding="utf-8")
    target.chmod(mode)


def _render_path(relative: Path, context: Mapping[str, str]) -> Path:
    def value(match: re.Match[str]) -> str:
        return context[match.group(1)]

    return Path(*(_PATH_VARIABLE.sub(value, part) for part in relative.parts))


def _remove_abandoned_renders(folder: Path) -> None:
    """Remove temporary folders of renders whose process is gone (a SIGKILL leaves them behind)."""
    for leftover in folder.glob(f"{TEMPORARY_PREFIX}*"):
        pid = leftover.name[len(TEMPORARY_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class _Stopped(BaseException):
    """Raised in the rendering thread by a termination signal, so that cleanup runs before the exit."""


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception while rendering (SIGINT already is one), then re-deliver it."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise _Stopped

    names = [s for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s)]
    previous = {name: signal.signal(getattr(signal, name), stop) for name in names}
    try:
        yield
    except _Stopped:
        pass
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
    if received:  # cleaned up: now end as the signal would have
        os.kill(os.getpid(), received[0])
        raise SystemExit(128 + received[0])


@contextlib.contextmanager
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
