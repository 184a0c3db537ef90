"""The radiology-anomaly template renders and its project's own tests pass (offline, in place)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rendering import assert_fully_rendered, assert_project_tests_pass, render


@pytest.mark.slow
def test_rendered_project_passes_its_own_tests(tmp_path: Path) -> None:
    project = render("radiology-anomaly", tmp_path, "Radiology Test")
    assert project.name == "radiology-test" and (project / "radiology_test" / "model.py").is_file()
    assert_fully_rendered(project)
    assert_project_tests_pass(project)
