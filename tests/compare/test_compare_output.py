"""The output folder never mixes two comparisons' results, is held by one comparison at a time, and
`--overwrite` removes only what comparisons wrote."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lightning_gc.compare.output import AGAIN_VARIABLE, LOCK_FILE, MANIFEST, WRITTEN, prepare_output
from lightning_gc.compare.project import ProjectError

SETTINGS = {"project": "p", "configs": [], "max_epochs": 2, "lightning_args": [], "seeds": 2, "metric": None}


def _prepare(out, settings=SETTINGS, **flags):
    folder, left = prepare_output(out, settings, **flags)
    folder.close()
    return folder, left


def test_a_new_or_empty_folder_is_used_and_records_the_settings(tmp_path):
    _prepare(tmp_path / "new")
    assert json.loads((tmp_path / "new" / MANIFEST).read_text()) == SETTINGS
    (tmp_path / "empty").mkdir()
    _prepare(tmp_path / "empty")


def test_an_earlier_comparison_needs_resume_or_overwrite(tmp_path, monkeypatch):
    monkeypatch.delenv(AGAIN_VARIABLE, raising=False)
    folder, _ = _prepare(tmp_path)
    folder.record(tmp_path / "gc" / "seed_0")
    (tmp_path / "gc" / "seed_0").mkdir(parents=True)
    with pytest.raises(ProjectError, match="already holds a comparison: pass `--resume` .* or pass `--overwrite`"):
        _prepare(tmp_path)
    _prepare(tmp_path, {**SETTINGS, "seeds": 3, "metric": "val/loss"}, resume=True)  # more seeds: fine
    assert (tmp_path / "gc" / "seed_0").is_dir()
    _, left = _prepare(tmp_path, overwrite=True)
    assert not (tmp_path / "gc").exists() and (tmp_path / MANIFEST).is_file() and left == []


def test_a_wrapper_names_its_own_way_to_pass_a_flag(tmp_path, monkeypatch):
    # `make demo` users cannot pass --overwrite; the Makefile says how they can
    monkeypatch.setenv(AGAIN_VARIABLE, "make demo DEMO_ARGS={flag}")
    _prepare(tmp_path)
    with pytest.raises(ProjectError, match=r"max_epochs: was 2, now 5\); run `make demo DEMO_ARGS=--overwrite`$"):
        _prepare(tmp_path, {**SETTINGS, "max_epochs": 5}, resume=True)
    with pytest.raises(ProjectError) as refused:
        _prepare(tmp_path)
    assert "`--" not in str(refused.value).replace("`make demo DEMO_ARGS=--", "")  # no flag make users cannot pass


def test_resume_with_other_settings_is_refused(tmp_path):
    _prepare(tmp_path)
    with pytest.raises(ProjectError, match=r"`--resume` would mix results: .*max_epochs: was 2, now 5"):
        _prepare(tmp_path, {**SETTINGS, "max_epochs": 5}, resume=True)


def test_a_folder_that_is_not_a_comparison_is_never_deleted(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(ProjectError, match="is not empty and holds no comparison"):
            _prepare(tmp_path, **flags)
    assert (tmp_path / "thesis.tex").read_text() == "precious"
    assert not (tmp_path / LOCK_FILE).exists()  # refused before anything was written


def test_overwrite_removes_only_what_comparisons_wrote_and_says_what_it_left(tmp_path):
    # Issue 15: `--overwrite` removed the whole --out folder, files the user put there included.
    folder, _ = _prepare(tmp_path)
    run = tmp_path / "model.lr=0.1" / "gc" / "seed_0"
    run.mkdir(parents=True)
    (run / "events.out").write_text("run output")
    (tmp_path / "summary.md").write_text("table")
    folder.record(run, tmp_path / "summary.md")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "model.lr=0.1" / "gc" / "look-at-this.txt").write_text("mine too")
    _, left = _prepare(tmp_path, overwrite=True)
    assert not run.exists() and not (tmp_path / "summary.md").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "model.lr=0.1" / "gc" / "look-at-this.txt").read_text() == "mine too"
    assert left == ["model.lr=0.1/gc/look-at-this.txt", "notes.txt"]
    assert json.loads((tmp_path / WRITTEN).read_text()) == [MANIFEST, LOCK_FILE]


def test_the_written_list_never_reaches_outside_the_folder(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    out = tmp_path / "out"
    _prepare(out)
    (out / WRITTEN).write_text(json.dumps([MANIFEST, "../outside.txt"]))
    _prepare(out, overwrite=True)
    assert outside.read_text() == "keep"


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ProjectError, match="`--resume` and `--overwrite` exclude each other"):
        prepare_output(tmp_path, SETTINGS, resume=True, overwrite=True)


def test_a_second_comparison_on_a_held_folder_is_refused_naming_the_holder(tmp_path):
    # Issue 15: two `compare --resume` on one --out both ran every run into the same folders.
    folder, _ = prepare_output(tmp_path, SETTINGS)
    try:
        with pytest.raises(ProjectError, match=rf"is in use by another lightning-gc compare \(pid {os.getpid()}\)"):
            prepare_output(tmp_path, SETTINGS, resume=True)
    finally:
        folder.close()
    prepare_output(tmp_path, SETTINGS, resume=True)[0].close()  # released: usable again


@pytest.mark.slow
def test_the_lock_is_released_by_the_system_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from lightning_gc.compare.output import prepare_output
            held = prepare_output(Path({str(tmp_path)!r}), {SETTINGS!r})
            print("held", flush=True)
            time.sleep(120)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ProjectError, match=rf"in use by another lightning-gc compare \(pid {holder.pid}\)"):
            prepare_output(tmp_path, SETTINGS, resume=True)
    finally:
        holder.kill()
        holder.wait()
    prepare_output(tmp_path, SETTINGS, resume=True)[0].close()
