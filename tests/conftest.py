import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import `reference` and `models` as plain modules
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "templates"))  # and `rendering`

# The fixture project is run by the tests, not collected by them (it has its own modules named like packages).
collect_ignore = ["compare/fixtures"]

TINY_PROJECT = Path(__file__).parent / "compare" / "fixtures" / "tiny_project"


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_project() -> Path:
    """A project following the template convention that trains in a second (see compare/fixtures/tiny_project)."""
    return TINY_PROJECT


@pytest.fixture
def eager_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans built in this test leave the fused CPU kernel aside (lightning_gc.native), so the eager routes run."""
    monkeypatch.setenv("LIGHTNING_GC_NATIVE", "0")


@pytest.fixture(params=["native", "eager"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test once with the fused CPU kernel and once with the eager routes."""
    from lightning_gc import native

    monkeypatch.setenv("LIGHTNING_GC_NATIVE", "1" if request.param == "native" else "0")
    if request.param == "native" and not native.status().available:
        pytest.skip(f"fused kernel unavailable: {native.status().reason}")
    return request.param
