"""The sentiment-rnn template renders, and the rendered project's own tests pass with this interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parents[2] / "templates" / "sentiment-rnn"


def render(output_dir: Path, project_name: str) -> Path:
    from cookiecutter.main import cookiecutter

    # Replay files and downloaded templates stay in the test's folder, not in ~/.cookiecutter*.
    config = {"cookiecutters_dir": str(output_dir / "cc"), "replay_dir": str(output_dir / "replay")}
    path = cookiecutter(
        str(TEMPLATE), no_input=True, output_dir=str(output_dir), extra_context={"project_name": project_name},
        default_config=config,
    )
    return Path(path)


def test_cookiecutter_json_follows_the_template_conventions() -> None:
    spec = json.loads((TEMPLATE / "cookiecutter.json").read_text())
    assert set(spec) == {"project_name", "project_slug", "package_name", "_description"}
    assert spec["_description"] and "\n" not in spec["_description"]


@pytest.mark.slow
def test_rendered_project_passes_its_own_tests(tmp_path: Path) -> None:
    project = render(tmp_path, "Movie Mood")
    assert project.name == "movie-mood" and (project / "movie_mood" / "model.py").is_file()
    leftovers = [p for p in project.rglob("*") if p.is_file() and "cookiecutter" in p.read_text(errors="ignore")]
    assert not leftovers, f"unrendered template variables in {leftovers}"

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q"],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout and "failed" not in result.stdout
