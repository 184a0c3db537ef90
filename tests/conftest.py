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
