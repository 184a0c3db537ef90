"""``lightning-gc compare`` end to end on a tiny real project, read back with TensorBoard's reader and server."""

import contextlib
import csv
import io
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gc.cli import main

TINY_PROJECT = Path(__file__).parents[1] / "compare" / "fixtures" / "tiny_project"


def _compare(*args):
    """Run ``lightning-gc compare`` in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        env.setenv("OMP_NUM_THREADS", "1")  # the training runs inherit it: one thread each on a shared machine
        try:
            code = main(["compare", *map(str, args)])
        except SystemExit as exit:  # argparse's own errors
            code = exit.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "tiny"
    code, stdout, stderr = _compare(TINY_PROJECT, "--seeds", 1, "--max-epochs", 2, "--out", out)
    assert code == 0, stdout + stderr
    return out, stdout


# -- bad input: clear errors, before anything runs ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0"], "argument --seeds: --seeds must be an integer >= 1, got '0'"),
        (["--max-epochs", "x"], "argument --max-epochs: --max-epochs must be an integer >= 1, got 'x'"),
        (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
        (["--mode", "up"], "argument --mode: invalid choice: 'up'"),
        (["--bogus", "1"], "unrecognized arguments: --bogus 1 (LightningCLI arguments go after `--`)"),
        (["--config", "configs/settings/nope.yaml"], "`--config` 'configs/settings/nope.yaml' not found"),
    ],
)
def test_bad_options_are_refused_naming_the_option(args, message, tmp_path):
    code, _, stderr = _compare(TINY_PROJECT, "--out", tmp_path / "out", *args)
    assert code == 2 and message in stderr
    assert not (tmp_path / "out").exists()


def test_unknown_project_or_template_is_refused(tmp_path):
    code, _, stderr = _compare(tmp_path / "missing-project")
    assert code == 2 and "is neither a folder nor a template name; templates:" in stderr
    code, _, stderr = _compare("no-such-template")
    assert code == 2 and "'no-such-template' is neither a folder nor a template name" in stderr


def test_project_whose_gc_config_lacks_the_callback_is_refused(tmp_path):
    project = shutil.copytree(TINY_PROJECT, tmp_path / "project")
    shutil.copy(project / "configs" / "baseline.yaml", project / "configs" / "gc.yaml")
    code, _, stderr = _compare(project, "--out", tmp_path / "out")
    assert code == 2 and "configs/gc.yaml has no lightning_gc.GradientCentralization in trainer.callbacks" in stderr


# -- a tiny real comparison -------------------------------------------------------------------------


@pytest.mark.slow
def test_comparison_shows_progress_and_writes_the_summary_files(tiny_comparison):
    out, stdout = tiny_comparison
    assert "[1/2] baseline seed_0: starting" in stdout
    assert "[2/2] gc seed_0: finished in" in stdout and "comparison 100%" in stdout
    assert f"tensorboard --logdir {out}" in stdout
    summary = (out / "summary.md").read_text()
    assert "| runs " in summary and "1/1 finished" in summary and "final val/acc" in summary
    assert summary in stdout
    rows = {(r["arm"], r["measure"]): r for r in csv.DictReader(open(out / "summary.csv"))}
    for arm in ("baseline", "gc"):
        assert rows[arm, "final"]["n"] == "1" and 0.0 <= float(rows[arm, "final"]["mean"]) <= 1.0
        assert float(rows[arm, "loss_oscillation"]["mean"]) > 0
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert [(r["arm"], r["status"]) for r in runs] == [("baseline", "finished"), ("gc", "finished")]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "comparison.json").read_text())["max_epochs"] == 2


@pytest.mark.slow
def test_event_files_hold_both_arms_from_the_same_start(tiny_comparison):
    out, _ = tiny_comparison
    scalars = {}
    for arm in ("baseline", "gc"):
        accumulator = EventAccumulator(str(out / arm / "seed_0"), size_guidance={"scalars": 0})
        accumulator.Reload()
        tags = set(accumulator.Tags()["scalars"])
        assert {"train/loss", "train/grad_norm", "val/loss", "val/acc", "test/acc"} <= tags
        assert ("gc/removed_norm_ratio" in tags) == (arm == "gc")
        scalars[arm] = [e.value for e in accumulator.Scalars("train/loss")]
    assert len(scalars["baseline"]) == len(scalars["gc"]) == 12  # 2 epochs x 6 batches, logged every step
    # same seed: same initial weights and first batch, so the loss before any update is identical ...
    assert scalars["baseline"][0] == scalars["gc"][0]
    # ... and GC changed the updates after it
    assert scalars["baseline"][-1] != scalars["gc"][-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(opener, url):
    with opener.open(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_server_shows_both_arms_side_by_side(tiny_comparison):
    out, _ = tiny_comparison
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy: only this local server
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(out), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wanted_runs = {"baseline/seed_0", "gc/seed_0"}
        deadline, runs, tags = time.monotonic() + 90, [], {}
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                runs = _get_json(opener, f"{base}/data/runs")
                tags = _get_json(opener, f"{base}/data/plugin/scalars/tags")
            except OSError:
                pass  # not listening yet
            if set(runs) >= wanted_runs and all("test/acc" in tags.get(r, {}) for r in wanted_runs):
                break
            time.sleep(0.5)
        assert set(runs) >= wanted_runs
        for run in wanted_runs:
            assert {"train/loss", "train/grad_norm", "val/acc"} <= set(tags[run])
        assert "gc/removed_norm_ratio" in tags["gc/seed_0"]
        assert "gc/removed_norm_ratio" not in tags["baseline/seed_0"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_same_out_is_refused_without_resume_and_resume_skips_finished_runs(tiny_comparison):
    out, _ = tiny_comparison
    before = (out / "summary.md").read_text()
    code, _, stderr = _compare(TINY_PROJECT, "--seeds", 1, "--max-epochs", 2, "--out", out)
    assert code == 2 and "already holds a comparison: pass `--resume`" in stderr
    code, _, stderr = _compare(TINY_PROJECT, "--seeds", 1, "--max-epochs", 3, "--out", out, "--resume")
    assert code == 2 and "max_epochs: was 2, now 3" in stderr
    code, stdout, _ = _compare(TINY_PROJECT, "--seeds", 1, "--max-epochs", 2, "--out", out, "--resume")
    assert code == 0 and stdout.count("finished earlier, skipped (--resume)") == 2
    assert (out / "summary.md").read_text() == before


@pytest.mark.slow
def test_a_failed_run_is_reported_and_a_diverged_run_is_counted(tmp_path):
    out = tmp_path / "broken"
    # a learning rate of 1e6 makes the loss overflow within a few steps; the baseline crashes on its first step
    code, stdout, _ = _compare(
        TINY_PROJECT, "--seeds", 1, "--max-epochs", 2, "--out", out, "--config", "configs/settings/huge_lr.yaml",
        "--", "--model.fail_at_step", 0, "--model.only_arm", "baseline",
    )  # fmt: skip
    assert code == 1  # a run failed; the comparison still finished
    log = out / "baseline" / "seed_0" / "train.log"
    assert "RuntimeError: injected failure" in log.read_text()
    summary = (out / "summary.md").read_text()
    assert "0/1 finished, failed 1/1" in summary and "0/1 finished, diverged 1/1" in summary
    assert f"baseline seed_0 failed (exit code 1), see {log}" in summary
    assert "gc: diverged 1/1 (seed_0 at step" in summary and "left out of the means" in summary
    record = json.loads((out / "gc" / "seed_0" / "run.json").read_text())
    assert record["status"] == "diverged"
    accumulator = EventAccumulator(str(out / "gc" / "seed_0"))
    accumulator.Reload()
    losses = accumulator.Scalars("train/loss")
    assert losses[-1].step == record["diverged_at_step"] < 11  # stopped early, at the non-finite loss
    assert losses[-1].value != losses[-1].value or abs(losses[-1].value) == float("inf")
