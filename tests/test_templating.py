"""lightning_gc.templating: user text is data, destinations are checked first, interrupted renders leave nothing."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_gc import templating
from lightning_gc.cli import main
from lightning_gc.templating import Requirement, TemplateError, render, requirement_for

REPO = Path(__file__).resolve().parents[1]
# Payloads that would run a command if the name were parsed by Jinja: each touches a marker file.
PAYLOADS = [
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ cookiecutter.__class__.__mro__ }}",
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
    "{{ c(['touch', 'MARKER']) }}{% endif %}{% endfor %}",
    "{% set x = self.__init__.__globals__.__builtins__.__import__('os').system('touch MARKER') %}",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_jinja_in_the_name_is_refused_and_runs_nothing(
    payload: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = payload.replace("MARKER", str(tmp_path / "ran"))
    assert main(["new", "digits-cnn", str(tmp_path / "out" / "proj"), "--name", payload]) == 2
    assert "may hold only ASCII letters, digits, spaces" in capsys.readouterr().err
    assert main(["new", "digits-cnn", str(tmp_path / "out" / payload.replace("/", "_"))]) == 2
    assert not (tmp_path / "ran").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even the parent folder


def test_values_are_rendered_as_data_never_evaluated(tmp_path: Path) -> None:
    """Jinja in a value (here the requirement's origin, and a parent folder's name) is written out literally."""
    origin = "{{ 7 * 7 }} {% if true %}yes{% endif %}"
    parent = tmp_path / "{{ 6 * 7 }}"
    project = render("digits-cnn", parent / "proj", "Proj", Requirement("lightning-gc==0.1.0", origin))
    readme = (project / "README.md").read_text()
    assert origin in readme and "49 yes" not in readme
    assert "lightning-gc==0.1.0" in (project / "pyproject.toml").read_text()
    assert project.parent.name == "{{ 6 * 7 }}"


def test_rendering_matches_the_template_with_the_names_substituted(tmp_path: Path) -> None:
    project = render("sentiment-rnn", tmp_path / "mood", "Movie Mood", Requirement("lightning-gc==0.1.0", "x"))
    root = REPO / "templates" / "sentiment-rnn" / "{{cookiecutter.project_slug}}"
    sources = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    rendered = sorted(p.relative_to(project) for p in project.rglob("*") if p.is_file())
    assert rendered == sorted(Path(str(p).replace("{{cookiecutter.package_name}}", "movie_mood")) for p in sources)
    model = (project / "movie_mood" / "model.py").read_text()
    expected = (root / "{{cookiecutter.package_name}}" / "model.py").read_text()
    assert model == expected.replace("{{ cookiecutter.package_name }}", "movie_mood")
    assert oct(project.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's private 0o700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_destination_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("mine")
    with pytest.raises(TemplateError, match="is a file, not a folder"):
        render("digits-cnn", tmp_path / "file" / "sub" / "proj")
    assert (tmp_path / "file").read_text() == "mine"


def test_destination_that_is_a_symlink_to_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(TemplateError, match="is a symbolic link"):
        render("digits-cnn", tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and list((tmp_path / "empty").iterdir()) == []


def test_destination_that_is_a_dangling_symlink(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(TemplateError, match="is a symbolic link"):
        render("digits-cnn", tmp_path / "link")


def test_destination_under_a_broken_symlink(tmp_path: Path) -> None:
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(TemplateError, match="is a broken symbolic link"):
        render("digits-cnn", tmp_path / "gone" / "proj")
    assert not (tmp_path / "nowhere").exists()


def test_destination_that_exists(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(TemplateError, match="exists and is not an empty folder"):
        render("digits-cnn", tmp_path / "full")
    (tmp_path / "file").write_text("")
    with pytest.raises(TemplateError, match="exists and is not a folder"):
        render("digits-cnn", tmp_path / "file")


def test_destination_whose_parent_cannot_be_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # /proc takes no new folders, not even from root: the OS's reason is reported, not a traceback.
    assert main(["new", "digits-cnn", "/proc/lightning-gc-test/proj"]) == 2
    assert "could not create '/proc/lightning-gc-test/proj'" in capsys.readouterr().err
    if os.geteuid() != 0:  # root may write anywhere else
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(TemplateError, match="no permission to write in"):
            render("digits-cnn", locked / "proj")


_SLOW_RENDER = """
import signal, sys, time
# Ctrl-C as in a terminal, even where the suite was started in the background (which inherits SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
from lightning_gc import templating
write = templating._write_file
def slow_write(*args):
    write(*args)
    print("writing", flush=True)
    time.sleep(60)
templating._write_file = slow_write
templating.render("digits-cnn", sys.argv[1], "Proj")
"""


def _start_slow_render(destination: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SLOW_RENDER), str(destination)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "writing\n"  # the render is under way
    return child


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_an_interrupted_render_leaves_nothing(signum: int, tmp_path: Path) -> None:
    child = _start_slow_render(tmp_path / "new" / "proj")
    assert any(p.name.startswith(".lightning-gc-new-") for p in (tmp_path / "new").iterdir())
    child.send_signal(signum)
    assert child.wait(timeout=30) != 0
    assert list(tmp_path.iterdir()) == []  # neither the project, the temporary folder, nor the parent made for it


def test_a_killed_render_is_cleaned_up_by_the_next_one(tmp_path: Path) -> None:
    child = _start_slow_render(tmp_path / "proj")
    child.kill()  # SIGKILL: nothing can run in the child
    child.wait(timeout=30)
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(f".lightning-gc-new-{child.pid}-")
    render("digits-cnn", tmp_path / "other", "Other")
    assert [p.name for p in tmp_path.iterdir()] == ["other"]


def _distribution(tmp_path: Path, direct_url: dict[str, object] | None) -> importlib.metadata.Distribution:
    info = tmp_path / "lightning_gc-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lightning-gc\nVersion: 1.2.3\n")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))
    return importlib.metadata.PathDistribution(info)


def test_requirement_from_an_index_pins_the_version(tmp_path: Path) -> None:
    assert requirement_for(tmp_path, _distribution(tmp_path, None)) == Requirement(
        "lightning-gc==1.2.3", "the package index"
    )


def test_requirement_from_a_wheel_file_names_the_file(tmp_path: Path) -> None:
    url = "file:///opt/my%20wheels/lightning_gc-1.2.3-py3-none-any.whl"
    requirement = requirement_for(tmp_path, _distribution(tmp_path, {"url": url, "archive_info": {}}))
    assert requirement == Requirement(
        f"lightning-gc @ {url}", "the wheel /opt/my wheels/lightning_gc-1.2.3-py3-none-any.whl"
    )


def test_requirement_from_an_editable_install_names_the_checkout(tmp_path: Path) -> None:
    direct = {"url": "file:///src/lightning-gc", "dir_info": {"editable": True}}
    assert requirement_for(tmp_path, _distribution(tmp_path / "installed", direct)) == Requirement(
        "lightning-gc @ file:///src/lightning-gc", "the folder /src/lightning-gc"
    )
    # The package being run from a checkout wins: that is the code the user has.
    assert requirement_for(REPO, _distribution(tmp_path, None)) == Requirement(
        f"lightning-gc @ {REPO.as_uri()}", f"the source checkout {REPO}"
    )


def test_requirement_from_git(tmp_path: Path) -> None:
    direct = {"url": "https://example.org/lightning-gc.git", "vcs_info": {"vcs": "git", "commit_id": "abc123"}}
    assert requirement_for(tmp_path, _distribution(tmp_path, direct)).spec == (
        "lightning-gc @ git+https://example.org/lightning-gc.git@abc123"
    )


def test_running_from_this_checkout_requires_this_checkout() -> None:
    assert templating.installed_requirement().spec == f"lightning-gc @ {REPO.as_uri()}"
