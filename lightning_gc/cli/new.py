"""``lightning-gc new``: render a template project (the command line; the work is in :mod:`lightning_gc.templating`).

Example:
    lightning-gc new --list
    lightning-gc new digits-cnn my-digits --name "My Digits"
"""

from __future__ import annotations

import argparse
import sys

from lightning_gc.templating import TemplateError, find_templates, installed_requirement, render

__all__ = ["TemplateError", "register", "run"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    requirement = installed_requirement()
    try:
        project = render(args.template, args.destination, args.name, requirement=requirement)
    except TemplateError as err:
        print(f"lightning-gc new: error: {err}", file=sys.stderr)
        return 2
    print(f"Created {project}")
    print(
        f"Its pyproject.toml requires {requirement.spec!r} (from {requirement.origin}); README.md says how to change it."
    )
    print(f"Next: cd {project} and follow README.md's set-up section")
    return 0
