"""Checking a project before any run: the convention, the GC callback in the right arm, the primary metric."""

import shutil

import pytest
import yaml

from lightning_gc.compare.project import ProjectError, load_project, resolve_project_dir, template_names


@pytest.fixture
def project(tiny_project, tmp_path):
    """An editable copy of the fixture project."""
    return shutil.copytree(tiny_project, tmp_path / "proj")


def _edit(path, change):
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))


def test_reads_the_metric_and_mode_from_the_model_checkpoint(project):
    loaded = load_project(project)
    assert (loaded.metric, loaded.mode, loaded.name) == ("val/acc", "max", "proj")
    assert loaded.arm_config("gc") == project / "configs" / "gc.yaml"


def test_metric_and_mode_can_be_overridden(project):
    assert load_project(project, metric="val/loss", mode="min").mode == "min"
    assert load_project(project, mode="min").metric == "val/acc"
    with pytest.raises(ProjectError, match=r"`--metric val/loss` is not the checkpoint's monitor: pass `--mode`"):
        load_project(project, metric="val/loss")
    with pytest.raises(ProjectError, match=r"`--mode` must be one of \('min', 'max'\), got 'up'"):
        load_project(project, mode="up")


def test_a_setting_config_is_found_in_the_project_and_applied_after_the_arm(project):
    loaded = load_project(project, configs=["configs/settings/huge_lr.yaml"])
    assert loaded.overlays == (project / "configs" / "settings" / "huge_lr.yaml",)
    with pytest.raises(
        ProjectError,
        match=r"`--config` 'configs/settings/nope.yaml' not found.*settings available: configs/settings/huge_lr.yaml",
    ):
        load_project(project, configs=["configs/settings/nope.yaml"])


def test_unknown_folder_and_missing_files_are_named(project, tmp_path):
    with pytest.raises(ProjectError, match="is not a folder"):
        load_project(tmp_path / "nowhere")
    (project / "configs" / "baseline.yaml").unlink()
    (project / "train.py").unlink()
    with pytest.raises(ProjectError, match="missing train.py, configs/baseline.yaml"):
        load_project(project)


def test_gc_config_without_the_callback_is_refused(project):
    _edit(project / "configs" / "gc.yaml", lambda c: c["trainer"]["callbacks"].pop())
    with pytest.raises(ProjectError, match="configs/gc.yaml has no lightning_gc.GradientCentralization"):
        load_project(project)


def test_a_setting_that_replaces_the_callbacks_is_seen(project):
    # LightningCLI replaces a list given again: this setting drops GC from the GC arm
    setting = project / "configs" / "settings" / "plain.yaml"
    setting.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": "val/acc", "mode": "max"}}
    ]}}))  # fmt: skip
    with pytest.raises(
        ProjectError, match=r"configs/gc.yaml \(after .*plain.yaml\) has no lightning_gc.GradientCentralization"
    ):
        load_project(project, configs=["configs/settings/plain.yaml"])


def test_baseline_with_the_callback_is_refused(project):
    shutil.copy(project / "configs" / "gc.yaml", project / "configs" / "baseline.yaml")
    with pytest.raises(
        ProjectError, match="configs/baseline.yaml has the lightning_gc.GradientCentralization callback"
    ):
        load_project(project)


def test_a_logger_other_than_tensorboard_is_refused(project):
    _edit(
        project / "configs" / "baseline.yaml",
        lambda c: c["trainer"].update(logger={"class_path": "lightning.pytorch.loggers.CSVLogger"}),
    )
    with pytest.raises(
        ProjectError,
        match="configs/baseline.yaml: trainer.logger must be a lightning.pytorch.loggers.TensorBoardLogger",
    ):
        load_project(project)


def test_no_monitor_needs_metric_and_mode(project):
    def drop_monitor(config):
        config["trainer"]["callbacks"] = [
            c for c in config["trainer"]["callbacks"] if "ModelCheckpoint" not in c["class_path"]
        ]

    for arm in ("gc", "baseline"):
        _edit(project / "configs" / f"{arm}.yaml", drop_monitor)
    with pytest.raises(ProjectError, match="no ModelCheckpoint with a `monitor`: pass `--metric`"):
        load_project(project)
    assert load_project(project, metric="val/acc", mode="max").metric == "val/acc"


def test_arms_must_pick_the_best_checkpoint_the_same_way(project):
    _edit(project / "configs" / "baseline.yaml", lambda c: c["trainer"]["callbacks"][0]["init_args"].update(mode="min"))
    with pytest.raises(ProjectError, match="ModelCheckpoint monitor/mode differ"):
        load_project(project)


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(ProjectError, match=r"'no-such-template' is neither a folder nor a template name; templates: "):
        with resolve_project_dir("no-such-template"):
            pass


def test_a_folder_is_used_in_place(project):
    with resolve_project_dir(str(project)) as (root, name):
        assert (root.resolve(), name) == (project.resolve(), "proj")


@pytest.mark.skipif("digits-cnn" not in template_names(), reason="the digits-cnn template is not in this tree")
def test_a_template_name_is_rendered_into_a_temporary_folder():
    with resolve_project_dir("digits-cnn") as (root, name):
        loaded = load_project(root, name)
        assert (loaded.name, loaded.metric, loaded.mode) == ("digits-cnn", "val/acc", "max")
        assert (root / "train.py").is_file()
    assert not root.exists()


def test_arms_are_the_project_configs_named(project):
    shutil.copy(project / "configs" / "gc.yaml", project / "configs" / "gc_update.yaml")
    loaded = load_project(project, arms=["baseline", "gc", "gc_update"])
    assert loaded.arms == ("baseline", "gc", "gc_update")
    assert loaded.arm_config("gc_update") == project / "configs" / "gc_update.yaml"
    with pytest.raises(
        ProjectError, match=r"`--arms`: configs/gc_nope.yaml not found in .*; arms available: baseline, gc, gc_update"
    ):
        load_project(project, arms=["baseline", "gc_nope"])
    with pytest.raises(ProjectError, match="`--arms` must name at least 2 different arms"):
        load_project(project, arms=["gc"])
    with pytest.raises(ProjectError, match=r"`--arms`: '\.\./x' is not an arm name"):
        load_project(project, arms=["baseline", "../x"])


def test_an_arm_named_gc_needs_the_callback_and_all_arms_select_checkpoints_alike(project):
    shutil.copy(project / "configs" / "baseline.yaml", project / "configs" / "gc_update.yaml")
    with pytest.raises(ProjectError, match="configs/gc_update.yaml has no lightning_gc.GradientCentralization"):
        load_project(project, arms=["baseline", "gc_update"])
    shutil.copy(project / "configs" / "baseline.yaml", project / "configs" / "plain.yaml")
    _edit(project / "configs" / "plain.yaml", lambda c: c["trainer"]["callbacks"][0]["init_args"].update(mode="min"))
    with pytest.raises(
        ProjectError, match=r"monitor/mode differ \(gc \('val/acc', 'max'\), plain \('val/acc', 'min'\)\)"
    ):
        load_project(project, arms=["gc", "plain"])
