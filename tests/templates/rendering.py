"""Rendering a template and running the rendered project's own tests, for every template."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def render(template: str, output_dir: Path, project_name: str) -> Path:
    """Render ``templates/<template>`` into ``output_dir/<slug>`` as ``lightning-gc new`` does."""
    from lightning_gc.templating import find_templates, project_names, render

    slug = project_names(find_templates(TEMPLATES)[template], project_name)["project_slug"]
    return render(template, output_dir / slug, project_name)


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
