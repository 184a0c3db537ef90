"""``lightning-gc new``: listing, rendering, refusals that leave nothing behind, and templates inside the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import lightning_gc
from lightning_gc import templating
from lightning_gc.cli import main

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = sorted(p.parent for p in (REPO / "templates").glob("*/cookiecutter.json"))


def test_list_shows_every_template_with_its_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(TEMPLATES) >= 1
    for template, line in zip(TEMPLATES, lines):
        description = json.loads((template / "cookiecutter.json").read_text())["_description"]
        assert line.split(maxsplit=1) == [template.name, description]


def test_templates_follow_the_conventions() -> None:
    for template in TEMPLATES:
        context = json.loads((template / "cookiecutter.json").read_text())
        assert {"project_name", "project_slug", "package_name", "_description"} <= set(context), template.name
        assert (template / "{{cookiecutter.project_slug}}" / "{{cookiecutter.package_name}}").is_dir()


def test_render_with_a_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new", "digits-cnn", str(tmp_path / "proj"), "--name", "My Digits"]) == 0
    project = tmp_path / "proj"
    out = capsys.readouterr().out
    assert "Created" in out and f"requires 'lightning-gc @ {REPO.as_uri()}'" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]  # no temporary folder left beside it
    for path in (
        "train.py",
        "README.md",
        ".gitignore",
        "configs/gc.yaml",
        "configs/baseline.yaml",
        "configs/settings/high_lr.yaml",
        "my_digits/model.py",
        "my_digits/data.py",
        "tests/test_smoke.py",
    ):
        assert (project / path).is_file(), path
    assert 'name = "my-digits"' in (project / "pyproject.toml").read_text()
    assert "from my_digits import" in (project / "train.py").read_text()
    assert (project / "README.md").read_text().startswith("# My Digits\n")
    for path in project.rglob("*"):
        if path.is_file():
            assert "cookiecutter" not in path.read_text(), f"unrendered template text in {path}"


def test_default_name_is_the_folder_name_and_an_empty_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "digits-2").mkdir()
    assert main(["new", "digits-cnn", str(tmp_path / "digits-2")]) == 0
    assert (tmp_path / "digits-2" / "digits_2" / "model.py").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-2"]


def test_missing_parents_are_created(tmp_path: Path) -> None:
    project = templating.render("digits-cnn", tmp_path / "a" / "b" / "mnist", "Mnist")
    assert (project / "mnist" / "data.py").is_file()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("2digits", "not a valid Python package name"),
        ("my.digits", "may hold only ASCII letters, digits, spaces"),
        ("chiffres déjà", "may hold only ASCII letters, digits, spaces"),
        ("2 digits", "not a valid Python package name"),
        ("class", "Python keyword"),
        ("json", "standard library"),
        ("train", "shadow a module or folder the project uses"),
        ("torch", "shadow a module or folder the project uses"),
        (" digits", "pip cannot install"),
    ],
)
def test_invalid_project_names_are_refused(
    name: str, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["new", "digits-cnn", str(tmp_path / "x" / "proj"), "--name", name]) == 2
    err = capsys.readouterr().err
    assert reason in err and repr(name) in err
    assert list(tmp_path.iterdir()) == []


def test_non_empty_destination_is_refused_and_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "notes.txt").write_text("mine")
    assert main(["new", "digits-cnn", str(tmp_path / "proj")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "proj").iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("")
    assert main(["new", "digits-cnn", str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_unknown_template_lists_the_available_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new", "digits", str(tmp_path / "proj")]) == 2
    assert "unknown template 'digits'; available: " in capsys.readouterr().err
    assert main(["new", "digits-cnn"]) == 2  # no destination
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_rendering_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = []

    def write_until_the_disk_is_full(target: Path, text: str, mode: int) -> None:
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        target.write_text(text)
        written.append(target)

    monkeypatch.setattr(templating, "_write_file", write_until_the_disk_is_full)
    with pytest.raises(templating.TemplateError, match="No space left on device"):
        templating.render("digits-cnn", tmp_path / "new" / "proj", "proj")
    assert len(written) == 3
    assert list(tmp_path.iterdir()) == []  # neither the project, nor the temporary folder, nor the parent made for it


@pytest.mark.slow
def test_wheel_ships_the_templates(tmp_path: Path) -> None:
    """Build the wheel, install it alone into a fresh venv, and render from there, outside the source tree."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("lightning_gc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for template in TEMPLATES:
        assert f"lightning_gc/_templates/{template.name}/cookiecutter.json" in names
    assert "lightning_gc/native/kernel.c" in names  # the fused kernel's source, compiled on first use
    assert "lightning_gc/py.typed" in names  # users' type checkers read the annotations (PEP 561)
    metadata = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "Requires-Python: >=3.11" in metadata
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "-q", "--no-deps", str(wheel)],
        check=True,
    )
    # The dependencies come from this interpreter's site-packages: a plain path entry, so that the editable
    # install of lightning_gc (a .pth hook there) stays invisible and the wheel's copy is the one imported.
    site = next(env_dir.glob("lib/python*/site-packages"), env_dir / "Lib" / "site-packages")
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "cookiecutter").is_dir())
    (site / "dependencies.pth").write_text(f"{deps}\n")
    run = {"cwd": tmp_path, "capture_output": True, "text": True, "check": True}
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import lightning_gc.templating as t; print(t.templates_root())"], **run
    ).stdout.strip()
    assert Path(where) == site / "lightning_gc" / "_templates"
    native = subprocess.run(
        [str(bin_dir / "python"), "-c", "import lightning_gc.native as n; print(n.status())"],
        env={**os.environ, "LIGHTNING_GC_CACHE_DIR": str(tmp_path / "kernels")},
        **run,
    ).stdout
    assert "available=True" in native, native
    listing = subprocess.run([str(bin_dir / "lightning-gc"), "new", "--list"], **run).stdout
    assert [line.split()[0] for line in listing.splitlines()] == [t.name for t in TEMPLATES]
    created = subprocess.run([str(bin_dir / "lightning-gc"), "new", "digits-cnn", "my-digits"], **run).stdout
    # Installed from a file: the project requires that file, and its README says so.
    requirement = f"lightning-gc @ {wheel.resolve().as_uri()}"
    assert f"requires {requirement!r} (from the wheel {wheel.resolve()})" in created
    assert f'"{requirement}",' in (tmp_path / "my-digits" / "pyproject.toml").read_text()
    assert f"requires `{requirement}`" in (tmp_path / "my-digits" / "README.md").read_text()
    version = subprocess.run([str(bin_dir / "lightning-gc"), "--version"], **run).stdout
    assert version == f"lightning-gc {lightning_gc.__version__}\n"
    assert (tmp_path / "my-digits" / "my_digits" / "model.py").read_text() == (
        REPO / "templates/digits-cnn/{{cookiecutter.project_slug}}/{{cookiecutter.package_name}}/model.py"
    ).read_text().replace("{{ cookiecutter.package_name }}", "my_digits")
