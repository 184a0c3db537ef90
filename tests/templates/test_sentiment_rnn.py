"""The sentiment-rnn template renders, and the rendered project's own tests pass with this interpreter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rendering import TEMPLATES, assert_fully_rendered, assert_project_tests_pass, render

TEMPLATE = TEMPLATES / "sentiment-rnn"


def test_cookiecutter_json_follows_the_template_conventions() -> None:
    spec = json.loads((TEMPLATE / "cookiecutter.json").read_text())
    assert set(spec) == {
        "project_name",
        "project_slug",
        "package_name",
        "lightning_gc_requirement",
        "lightning_gc_origin",
        "_description",
    }
    assert spec["_description"] and "\n" not in spec["_description"]


@pytest.mark.slow
def test_rendered_project_passes_its_own_tests(tmp_path: Path) -> None:
    project = render("sentiment-rnn", tmp_path, "Movie Mood")
    assert project.name == "movie-mood" and (project / "movie_mood" / "model.py").is_file()
    assert_fully_rendered(project)
    assert_project_tests_pass(project, timeout=600)
