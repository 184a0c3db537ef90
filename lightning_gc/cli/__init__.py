"""The lightning-gc command: "new" renders a template project, "compare" trains baseline and GC side by side."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-gc`` console script."""
    from lightning_gc import __version__

    parser = argparse.ArgumentParser(prog="lightning-gc", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lightning-gc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _subcommands():
        module.register(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    # Arguments after the first `--` are passed through untouched (e.g. to LightningCLI); argparse's own
    # handling of `--` in `parse_known_args` drops or keeps the marker depending on what precedes it.
    passthrough = argv[argv.index("--") :] if "--" in argv else []
    args, extra = parser.parse_known_args(argv[: len(argv) - len(passthrough)])
    extra += passthrough
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.run(args, extra) or 0)


def _subcommands() -> list[ModuleType]:
    """Each subcommand module exposes ``register(subparsers)`` setting ``run`` as the parser's default."""
    from lightning_gc.cli import compare, new

    return [new, compare]


if __name__ == "__main__":
    sys.exit(main())
