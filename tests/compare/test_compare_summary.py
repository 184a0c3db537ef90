"""Per-arm summaries from event files written like Lightning writes them, checked against hand-computed values."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_gc.compare.events import read_scalars
from lightning_gc.compare.report import markdown, write_runs_csv, write_summary_csv
from lightning_gc.compare.summary import DIVERGED, FAILED, FINISHED, RunRecord, summarize

NAN = float("nan")
TRAIN_STEPS = list(range(0, 21))

# arm, seed, status, val/acc at steps 10 and 20, train/loss slope, grad norms
RUNS = [
    ("baseline", 0, FINISHED, [0.7, 0.8]),
    ("baseline", 1, FINISHED, [0.6, 0.9]),
    ("baseline", 2, FAILED, None),
    ("gc", 0, FINISHED, [0.9, 0.95]),
    ("gc", 1, DIVERGED, [0.5, NAN]),
    ("gc", 2, DIVERGED, [0.99, NAN]),  # its early best must not set the target: it diverged
]


def _write_run(run_dir: Path, val_acc: list, finite: bool) -> None:
    writer = SummaryWriter(str(run_dir))
    for step in TRAIN_STEPS:
        loss = 1.0 - 0.02 * step + (0.1 if step % 2 else 0.0)  # zig-zag: second differences of 0.2
        writer.add_scalar("train/loss", loss if finite or step < 15 else NAN, step)
        writer.add_scalar("train/grad_norm", 2.0 if step % 2 else 4.0, step)  # mean 3, std 1 (11 x 4, 10 x 2)
    for step, acc in zip((10, 20), val_acc):
        writer.add_scalar("val/acc", acc, step)
        writer.add_scalar("val/loss", 0.5, step)
    writer.add_scalar("test/acc", val_acc[-1] - 0.01, 20)
    writer.close()


@pytest.fixture
def records(tmp_path):
    out = []
    for arm, seed, status, val_acc in RUNS:
        run_dir = tmp_path / arm / f"seed_{seed}"
        run_dir.mkdir(parents=True)
        if val_acc is not None:
            _write_run(run_dir, val_acc, finite=status != DIVERGED)
        diverged_at = 15 if status == DIVERGED else None
        out.append(
            RunRecord(arm, seed, status, run_dir, run_dir / "train.log", 0 if status != FAILED else 1, diverged_at)
        )
    return out


def test_read_scalars_returns_every_point_as_logged(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    for step, value in enumerate([3.0, 2.0, NAN, float("inf")]):
        writer.add_scalar("train/loss", value, step)
    writer.close()
    writer = SummaryWriter(str(tmp_path))  # a second event file, as `trainer.test` after `fit` writes
    writer.add_scalar("test/acc", 0.5, 3)
    writer.close()
    scalars = read_scalars(tmp_path)
    assert scalars["train/loss"].steps.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(scalars["train/loss"].values, [3.0, 2.0, NAN, float("inf")])
    assert scalars["test/acc"].last == 0.5


def test_summary_counts_diverged_and_failed_runs_and_leaves_them_out(records):
    summary = summarize(records, "val/acc", "max")
    baseline, gc = summary.arms["baseline"], summary.arms["gc"]
    assert (baseline.count(FINISHED), baseline.count(FAILED), baseline.count(DIVERGED)) == (2, 1, 0)
    assert (gc.count(FINISHED), gc.count(DIVERGED)) == (1, 2)

    final = baseline.aggregates["final"]
    assert (final.n, final.mean, final.std) == (2, pytest.approx(0.85), pytest.approx(math.sqrt(2 * 0.05**2)))
    assert (gc.aggregates["final"].n, gc.aggregates["final"].mean) == (1, pytest.approx(0.95))
    assert gc.aggregates["best"].mean == pytest.approx(0.95)  # not the diverged run's 0.99
    assert baseline.aggregates["test"].mean == pytest.approx(0.84)

    # 0.95 is the best finished value: target 0.95 * 0.95; only gc seed_0 reaches it, at step 20
    assert summary.target == pytest.approx(0.9025) and not summary.target_given
    assert baseline.aggregates["steps_to_target"].n == 0
    assert gc.aggregates["steps_to_target"].mean == 20

    # zig-zag train/loss: |second difference| = 0.2 everywhere; grad norms: population std 0.9988 / mean 2.9524
    assert baseline.aggregates["loss_oscillation"].mean == pytest.approx(0.2)
    norms = np.array([2.0 if s % 2 else 4.0 for s in TRAIN_STEPS])
    assert baseline.aggregates["grad_norm_cv"].mean == pytest.approx(norms.std() / norms.mean())
    # last validation interval (10, 20]: mean of the zig-zag there
    window = [1.0 - 0.02 * s + (0.1 if s % 2 else 0.0) for s in range(11, 21)]
    assert baseline.aggregates["train_val_gap"].mean == pytest.approx(0.5 - sum(window) / len(window))


def test_given_target_is_used_as_is(records):
    summary = summarize(records, "val/acc", "max", target=0.85)
    assert summary.target_given
    assert summary.arms["baseline"].aggregates["steps_to_target"].mean == 20  # seed_1 only: 0.9 at step 20
    assert summary.arms["gc"].aggregates["steps_to_target"].mean == 10


def test_markdown_and_csv_say_what_was_left_out(records, tmp_path):
    summary = summarize(records, "val/acc", "max")
    text = markdown(summary, "demo", relative_to=tmp_path)
    assert "2/3 finished, failed 1/3" in text
    assert "1/3 finished, diverged 2/3" in text
    assert "gc: diverged 2/3 (seed_1 at step 15, seed_2 at step 15)" in text
    assert "baseline seed_2 failed (exit code 1), see baseline/seed_2/train.log" in text
    assert "0.85 ± 0.07" in text and "n/a (reached 0/2)" in text  # rounded to the spread's first digit
    assert "| +0.10         |" in text  # gc - baseline of the final metric: 0.95 - 0.85, to the baseline spread's 0.07

    write_summary_csv(summary, tmp_path / "summary.csv")
    rows = {(r["arm"], r["measure"]): r for r in csv.DictReader(open(tmp_path / "summary.csv"))}
    assert float(rows["baseline", "final"]["mean"]) == pytest.approx(0.85)
    assert rows["gc", "final"]["n"] == "1" and rows["gc", "final"]["diverged"] == "2"
    assert rows["gc", "final"]["std"] == ""  # one run: no spread
    assert rows["baseline", "final"]["display"] == "0.85 ± 0.07" and rows["gc", "final"]["display"] == "0.95"
    write_runs_csv(summary, tmp_path / "runs.csv")
    runs = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert [(r["arm"], r["seed"], r["status"]) for r in runs] == [(a, str(s), st) for a, s, st, _ in RUNS]
    assert runs[4]["diverged_at_step"] == "15" and runs[2]["log"].endswith("train.log")
