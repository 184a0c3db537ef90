from pathlib import Path

import pytest

# The fixture project is run by the tests, not collected by them (it has its own modules named like packages).
collect_ignore = ["fixtures"]

TINY_PROJECT = Path(__file__).parent / "fixtures" / "tiny_project"


@pytest.fixture
def tiny_project() -> Path:
    """A project following the template convention that trains in a second (see fixtures/tiny_project)."""
    return TINY_PROJECT
