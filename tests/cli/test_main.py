"""The lightning-gc command itself: --version, and help text that reads as plain text."""

from __future__ import annotations

import importlib.metadata

import pytest

import lightning_gc
from lightning_gc.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"lightning-gc {lightning_gc.__version__}\n"
    # One version: the metadata pip records is built from the same line (hatch reads __init__.py).
    assert importlib.metadata.version("lightning-gc") == lightning_gc.__version__


@pytest.mark.parametrize("argv", [["--help"], ["new", "--help"], ["compare", "--help"]])
def test_help_has_no_markup(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(argv)
    text = capsys.readouterr().out
    assert text.startswith("usage: lightning-gc")
    for markup in ("``", ":class:", ":func:", ":mod:", "**"):
        assert markup not in text, (markup, text)
