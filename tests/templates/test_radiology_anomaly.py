"""The radiology-anomaly template renders with cookiecutter and its project's own tests pass (offline, in place)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cookiecutter.main import cookiecutter

TEMPLATE = Path(__file__).resolve().parents[2] / "templates" / "radiology-anomaly"


def _render(tmp_path: Path) -> Path:
    config = {"cookiecutters_dir": str(tmp_path / "cc"), "replay_dir": str(tmp_path / "replay")}
    return Path(cookiecutter(str(TEMPLATE), no_input=True, output_dir=str(tmp_path),
                             extra_context={"project_name": "Radiology Test"}, default_config=config))


@pytest.mark.slow
def test_rendered_project_passes_its_own_tests(tmp_path: Path) -> None:
    project = _render(tmp_path)
    assert project.name == "radiology-test" and (project / "radiology_test" / "model.py").is_file()
    for path in project.rglob("*"):  # every Jinja expression was rendered
        if path.is_file() and path.suffix in {".py", ".toml", ".md", ".yaml"}:
            assert "cookiecutter" not in path.read_text(), path
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout and "failed" not in result.stdout
