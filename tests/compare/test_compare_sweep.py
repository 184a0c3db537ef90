"""Sweeps: parsing, the grid, folder names, each arm's stable range, sweep.csv and sweep.png."""

import csv
import re
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_gc.compare.project import ProjectError
from lightning_gc.compare.summary import DIVERGED, FAILED, FINISHED, RunRecord, summarize
from lightning_gc.compare.sweep import (
    Axis,
    grid,
    parse_sweeps,
    plot_sweep,
    stable_ranges,
    sweep_markdown,
    write_sweep_csv,
)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("model.lr", "`--sweep` must be KEY=V1,V2,... with a LightningCLI key such as model.lr, got 'model.lr'"),
        ("=0.1", "`--sweep` must be KEY=V1,V2,..."),
        ("model..lr=0.1", "`--sweep` must be KEY=V1,V2,..."),
        ("model.lr=", "`--sweep model.lr=...` needs one or more comma-separated values, got ''"),
        ("model.lr=0.1,,0.2", "needs one or more comma-separated values"),
        ("model.lr=0.1,0.1", "`--sweep model.lr=...` lists a value twice"),
    ],
)
def test_bad_sweeps_are_refused_naming_the_option(spec, message):
    with pytest.raises(ProjectError, match=re.escape(message)):
        parse_sweeps([spec])


def test_a_key_swept_twice_is_refused():
    with pytest.raises(ProjectError, match="`--sweep` names model.lr more than once"):
        parse_sweeps(["model.lr=0.1", "model.lr=0.2"])


def test_repeated_sweeps_make_a_grid_of_safe_folder_names():
    axes = parse_sweeps(["model.norm=none,batch", "model.lr=0.01,1e-1"])
    points = grid(axes)
    assert [p.name for p in points] == [
        "model.norm=none,model.lr=0.01", "model.norm=none,model.lr=1e-1",
        "model.norm=batch,model.lr=0.01", "model.norm=batch,model.lr=1e-1",
    ]  # fmt: skip
    assert points[1].args == ("--model.norm", "none", "--model.lr", "1e-1")
    odd = grid([Axis("data.path", ("a/b", "c d"))])
    assert [p.name for p in odd] == ["data.path=a_b", "data.path=c_d"]
    assert odd[0].args == ("--data.path", "a/b")  # the value itself is passed as given
    with pytest.raises(ProjectError, match="several points would share the folder data.path=a_b"):
        grid([Axis("data.path", ("a/b", "a b"))])


def _record(root: Path, point: str, arm: str, seed: int, status: str, final: float) -> RunRecord:
    run_dir = root / point / arm / f"seed_{seed}"
    if status != FAILED:
        writer = SummaryWriter(str(run_dir))
        for step in range(12):
            writer.add_scalar("train/loss", 1.0 / (step + 1), step)
            writer.add_scalar("train/grad_norm", 1.0, step)
        writer.add_scalar("val/acc", final, 12)
        writer.close()
    return RunRecord(
        arm, seed, status, run_dir, run_dir / "train.log", 0, 5 if status == DIVERGED else None, 1.0, point
    )


# model.lr -> arm -> (status, final val/acc) per seed
OUTCOMES = {
    "0.01": {"baseline": [(FINISHED, 0.90), (FINISHED, 0.92)], "gc": [(FINISHED, 0.91), (FINISHED, 0.93)]},
    "0.1": {"baseline": [(FINISHED, 0.94), (FINISHED, 0.96)], "gc": [(FINISHED, 0.95), (DIVERGED, 0.5)]},
    "1": {"baseline": [(DIVERGED, 0.1), (FINISHED, 0.50)], "gc": [(FINISHED, 0.97), (FINISHED, 0.99)]},
}


@pytest.fixture
def sweep(tmp_path):
    axes = parse_sweeps(["model.lr=" + ",".join(OUTCOMES)])
    points = grid(axes)
    summaries = []
    for point in points:
        value = point.value("model.lr")
        records = [
            _record(tmp_path, point.name, arm, seed, status, final)
            for arm, runs in OUTCOMES[value].items()
            for seed, (status, final) in enumerate(runs)
        ]
        summaries.append(summarize(records, "val/acc", "max", arms=["baseline", "gc"]))
    return axes, points, summaries


def test_stable_range_is_where_every_seed_finished(sweep):
    ranges = stable_ranges(*sweep)
    assert ranges["baseline"] == "model.lr 0.01 to 0.1 (2 of 3 values); not at 1 (diverged 1/2)"
    # gc is stable at 0.01 and 1 but not in between: not a range
    assert ranges["gc"] == "model.lr 0.01, 1 (2 of 3 values); not at 0.1 (diverged 1/2)"


def test_sweep_table_csv_and_plot(sweep, tmp_path):
    axes, points, summaries = sweep
    text = sweep_markdown(axes, points, summaries, "sweep", ["context"])
    assert "| model.lr | arm      | runs                       | final val/acc | best val/acc  |" in text
    assert "| 0.01     | baseline | 2/2 finished               | 0.910 ± 0.014 | 0.910 ± 0.014 |" in text
    assert "| 1        | baseline | 1/2 finished, diverged 1/2 | 0.5           | 0.5           |" in text
    assert "every seed of the arm finished at that value, none collapsed, diverged or failed" in text
    write_sweep_csv(axes, points, summaries, tmp_path / "sweep.csv")
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [(r["model.lr"], r["arm"], r["stable"]) for r in rows] == [
        ("0.01", "baseline", "yes"), ("0.01", "gc", "yes"), ("0.1", "baseline", "yes"),
        ("0.1", "gc", "no"), ("1", "baseline", "no"), ("1", "gc", "yes"),
    ]  # fmt: skip
    assert float(rows[0]["metric_mean"]) == pytest.approx(0.91) and rows[0]["metric_display"] == "0.910 ± 0.014"
    assert (rows[3]["finished"], rows[3]["diverged"], rows[3]["point"]) == ("1", "1", "model.lr=0.1")
    plot_sweep(axes, points, summaries, tmp_path / "sweep.png", title="t")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_a_categorical_grid_is_plotted_in_panels(tmp_path):
    axes = parse_sweeps(["model.norm=none,batch", "model.lr=0.1,0.2"])
    points = grid(axes)
    summaries = [
        summarize([_record(tmp_path, p.name, arm, 0, FINISHED, 0.9) for arm in ("baseline", "gc")], "val/acc", "max")
        for p in points
    ]
    plot_sweep(axes, points, summaries, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert stable_ranges(axes, points, summaries)["gc"].startswith("model.norm none, model.lr 0.1; model.norm none")
