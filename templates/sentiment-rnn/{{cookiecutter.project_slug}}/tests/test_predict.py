"""``python train.py predict`` on raw reviews, after reloading a checkpoint written by ``fit``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import PROJECT

import train
from {{ cookiecutter.package_name }}.model import ENCODER_KEY, SentimentRNN

REVIEWS = [
    "A moving, beautifully acted film; one of the year's best.",
    "",
    "Dull, lifeless and far too long.<br /><br />Avoid.",
    "?!...",
    "Amélie était géniale — un film merveilleux 😀",
    "   ",
    "The plot is a mess but the cast is terrific, and the ending lands.",
]


def outputs(project: Path) -> set[Path]:
    """What a run could add: entries of the project folder, of runs/ and of lightning_logs/."""
    return {p for d in (project, project / "runs", project / "lightning_logs") if d.is_dir() for p in d.iterdir()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A short fit of configs/gc.yaml (40 steps) run the way the compare tool runs it, and its log folder."""
    out = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(PROJECT)
        patch.setattr(sys, "argv", ["train.py"])
        args = (
            "fit --config configs/gc.yaml --seed_everything 3 --trainer.max_steps 40 --trainer.val_check_interval 20"
            " --trainer.limit_val_batches 5 --trainer.limit_test_batches 5 --trainer.enable_progress_bar false"
            " --trainer.logger.init_args.version seed_3"
        ).split()
        args += ["--trainer.logger.init_args.save_dir", str(out / "gc"), "--trainer.logger.init_args.name", ""]
        cli = train.main(args)
    return cli, out / "gc" / "seed_3"


def test_fit_checkpoints_logs_and_tests_the_best(trained) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli, log_dir = trained
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert best.parent == log_dir / "checkpoints" and (log_dir / "config.yaml").is_file()
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint[ENCODER_KEY]["tokens"] == cli.datamodule.vocabulary.tokens
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    expected = {"train/loss", "train/grad_norm", "gc/removed_norm_ratio", "gc/grad_norm"}
    expected |= {f"{stage}/{name}" for stage in ("val", "test") for name in ("loss", "acc", "f1", "auroc")}
    assert expected <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val/acc")] == [19, 39]


def test_predict_prints_label_and_probability_per_review(trained, in_project, tmp_path, capsys) -> None:
    reviews = tmp_path / "reviews.txt"
    reviews.write_text("\n".join(REVIEWS) + "\n", encoding="utf-8")
    cli = trained[0]
    checkpoint = cli.trainer.checkpoint_callback.best_model_path
    capsys.readouterr()
    files_before = outputs(in_project)

    train.main(["predict", "--ckpt_path", checkpoint, "--data.predict_file", str(reviews)])
    lines = capsys.readouterr().out.splitlines()  # nothing but the predictions: no progress bar
    assert outputs(in_project) == files_before  # no logs, no saved config

    kept = [text for text in REVIEWS if text.strip()]  # blank lines are skipped
    assert len(lines) == len(kept)
    # Reference: the model object that fit tested, on the same raw texts.
    expected = cli.model.predict_proba(kept)
    for line, text, p_positive in zip(lines, kept, expected.tolist()):
        label, probability, excerpt = line.split("\t")
        assert label == ("positive" if p_positive >= 0.5 else "negative")
        assert float(probability) == pytest.approx(max(p_positive, 1 - p_positive), abs=1e-4)
        assert text.startswith(excerpt.removesuffix("..."))


def test_load_from_checkpoint_restores_vocabulary_and_weights(trained) -> None:
    cli = trained[0]
    model = SentimentRNN.load_from_checkpoint(cli.trainer.checkpoint_callback.best_model_path)
    assert model.encoder == cli.model.encoder
    torch.testing.assert_close(model.predict_proba(REVIEWS), cli.model.predict_proba(REVIEWS))


def test_predict_without_checkpoint_says_what_to_do(in_project, tmp_path) -> None:
    reviews = tmp_path / "reviews.txt"
    reviews.write_text("Fine.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="--ckpt_path"):
        train.main(["predict", "--data.predict_file", str(reviews), "--trainer.logger", "false"])
