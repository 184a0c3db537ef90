"""The output folder never mixes two comparisons' results."""

import json

import pytest

from lightning_gc.compare.output import MANIFEST, prepare_output
from lightning_gc.compare.project import ProjectError

SETTINGS = {"project": "p", "configs": [], "max_epochs": 2, "lightning_args": [], "seeds": 2, "metric": None}


def test_a_new_or_empty_folder_is_used_and_records_the_settings(tmp_path):
    prepare_output(tmp_path / "new", SETTINGS)
    assert json.loads((tmp_path / "new" / MANIFEST).read_text()) == SETTINGS
    (tmp_path / "empty").mkdir()
    prepare_output(tmp_path / "empty", SETTINGS)


def test_an_earlier_comparison_needs_resume_or_overwrite(tmp_path):
    prepare_output(tmp_path, SETTINGS)
    (tmp_path / "gc").mkdir()
    with pytest.raises(ProjectError, match="already holds a comparison: pass `--resume` .* or `--overwrite`"):
        prepare_output(tmp_path, SETTINGS)
    prepare_output(tmp_path, {**SETTINGS, "seeds": 3, "metric": "val/loss"}, resume=True)  # more seeds: fine
    assert (tmp_path / "gc").is_dir()
    prepare_output(tmp_path, SETTINGS, overwrite=True)
    assert not (tmp_path / "gc").exists() and (tmp_path / MANIFEST).is_file()


def test_resume_with_other_settings_is_refused(tmp_path):
    prepare_output(tmp_path, SETTINGS)
    with pytest.raises(ProjectError, match=r"`--resume` would mix results: .*max_epochs: was 2, now 5"):
        prepare_output(tmp_path, {**SETTINGS, "max_epochs": 5}, resume=True)


def test_a_folder_that_is_not_a_comparison_is_never_deleted(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(ProjectError, match="is not empty and holds no comparison"):
            prepare_output(tmp_path, SETTINGS, **flags)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ProjectError, match="`--resume` and `--overwrite` exclude each other"):
        prepare_output(tmp_path, SETTINGS, resume=True, overwrite=True)
