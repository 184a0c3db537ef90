"""Rendering a template with cookiecutter and running the rendered project's own tests, for every template."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def render(template: str, output_dir: Path, project_name: str) -> Path:
    """Render ``templates/<template>`` into ``output_dir``; cookiecutter's replay and cache stay there too."""
    from cookiecutter.main import cookiecutter

    config = {"cookiecutters_dir": str(output_dir / "cc"), "replay_dir": str(output_dir / "replay")}
    path = cookiecutter(
        str(TEMPLATES / template),
        no_input=True,
        output_dir=str(output_dir),
        extra_context={"project_name": project_name},
        default_config=config,
    )
    return Path(path)


def assert_fully_rendered(project: Path) -> None:
    """No Jinja expression is left anywhere in the rendered text files."""
    leftovers = [p for p in project.rglob("*") if p.is_file() and "cookiecutter" in p.read_text(errors="ignore")]
    assert not leftovers, f"unrendered template variables in {leftovers}"


def assert_project_tests_pass(project: Path, timeout: float = 900) -> None:
    """Run the project's pytest in place with this interpreter; every test must pass, none skipped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q"], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout and "failed" not in result.stdout
