"""``lightning-gc compare`` end to end on a tiny real project, read back with TensorBoard's reader and server."""

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from slurm_cluster import requires_slurm  # noqa: F401  (the fixture)
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
        (["--arms", "baseline,gc_update"], "`--arms`: configs/gc_update.yaml not found in"),
        (["--arms", "gc"], "argument --arms: --arms must be two or more comma-separated arm names, got 'gc'"),
        (["--sweep", "model.lr"], "`--sweep` must be KEY=V1,V2,... with a LightningCLI key such as model.lr"),
        (["--sweep", "model.lr=1", "--", "--model.lr", "2"], "`--sweep model.lr` and `-- --model.lr ...` both set"),
        (["--jobs", "0"], "argument --jobs: --jobs must be an integer >= 1, got '0'"),
        (["--launcher", "pbs"], "argument --launcher: invalid choice: 'pbs'"),
        (["--slurm-partition", "gpu"], "`--slurm-partition` applies to `--launcher slurm` only"),
        (["--launcher", "slurm", "--jobs", "2"], "`--jobs` applies to `--launcher local` (the default) only"),
        (["--launcher", "slurm", "--slurm-time", "2h"], "`--slurm-time`: time must be in sbatch --time syntax"),
        (["--launcher", "slurm", "--slurm-arg", "qos=high"], "`--slurm-arg`: sbatch_args: each must be '--name=value'"),
        (["--launcher", "slurm", "--slurm-partition", ""], "`--slurm-partition`: partition must be a non-empty"),
        (["--slurm-gpus-per-run", "-1"], "argument --slurm-gpus-per-run: --slurm-gpus-per-run must be an integer >= 0"),
        (["--chance", "nan"], "`--chance` must be a finite number, got nan"),
    ],
)
def test_bad_options_are_refused_naming_the_option(args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: --devices-per-run is refused below
    code, _, stderr = _compare(TINY_PROJECT, "--out", tmp_path / "out", *args)
    assert code == 2 and message in stderr
    assert not (tmp_path / "out").exists()


def test_devices_per_run_without_gpus_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code, _, stderr = _compare(TINY_PROJECT, "--out", tmp_path / "out", "--devices-per-run", 1)
    assert code == 2 and "`--devices-per-run` 1: no GPU is visible" in stderr
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
    assert "baseline seed_0: starting | study 0% | 0 done, 1 running, 1 left" in stdout
    assert "gc seed_0: finished in" in stdout and "study 100% | 2 done, 0 running, 0 left" in stdout
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
    assert rows["gc", "final"]["display"] == f"{float(rows['gc', 'final']['mean']):.4g}"  # one seed: one value
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "comparison.json").read_text())["max_epochs"] == 2
    # the TensorBoard arm view, written at the end of the comparison
    arm = EventAccumulator(str(out / "arms" / "gc"), size_guidance={"scalars": 0})
    arm.Reload()
    assert {"train/loss/mean", "train/loss/mean-std", "train/loss/mean+std"} <= set(arm.Tags()["scalars"])


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


# -- sweeps, parallel runs, records that rerun ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "lr"
    code, stdout, stderr = _compare(
        TINY_PROJECT, "--seeds", 1, "--max-epochs", 1, "--out", out, "--jobs", 2,
        "--sweep", "model.lr=0.05,1e6",
    )  # fmt: skip
    assert code == 0, stdout + stderr
    return out, stdout


@pytest.mark.slow
def test_a_sweep_runs_every_point_arm_and_seed_and_summarises_the_sweep(tiny_sweep):
    out, stdout = tiny_sweep
    for point in ("model.lr=0.05", "model.lr=1e6"):
        for arm in ("baseline", "gc"):
            record = json.loads((out / point / arm / "seed_0" / "run.json").read_text())
            assert record["point"] == point
        assert "| runs " in (out / point / "summary.md").read_text()
        assert (out / point / "curves.png").is_file()
        assert (out / point / "arms" / "gc").is_dir()  # each point's TensorBoard arm view
    hparams = (out / "model.lr=1e6" / "gc" / "seed_0" / "hparams.yaml").read_text()
    assert "lr: 1000000.0" in hparams  # the point's value reached the model
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["model.lr"], r["arm"]) for r in rows] == [
        ("0.05", "baseline"), ("0.05", "gc"), ("1e6", "baseline"), ("1e6", "gc")
    ]  # fmt: skip
    assert [r["stable"] for r in rows] == ["yes", "yes", "no", "no"]  # 1e6 diverges
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    summary = (out / "summary.md").read_text()
    assert "- baseline: model.lr 0.05 (1 of 2 values); not at 1e6 (diverged 1/1)" in summary
    assert stdout.count("| model.lr | arm") == 1  # the sweep table is printed once
    assert "4 runs: 2 point(s) x 2 arms x 1 seed(s), 2 at once on this machine" in stdout


@pytest.mark.slow
def test_runs_record_a_command_that_reruns_them(tiny_sweep, tmp_path):
    out, _ = tiny_sweep
    record = json.loads((out / "model.lr=0.05" / "gc" / "seed_0" / "run.json").read_text())
    assert record["command"] == (out / "model.lr=0.05" / "gc" / "seed_0" / "train.log").read_text().splitlines()[0][2:]
    # rerun into another folder: the recorded line works as it is, but for where it logs
    line = record["command"].replace(str(out), str(tmp_path / "again"))
    result = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "again" / "model.lr=0.05" / "gc" / "seed_0" / "hparams.yaml").is_file()


@pytest.mark.slow
def test_a_template_is_kept_in_the_output_folder_so_its_runs_can_be_rerun(tmp_path, monkeypatch):
    # Issue 18: a template name rendered into a temporary folder; its runs' commands pointed into it.
    from lightning_gc.compare import project as project_module

    def render(template, destination):
        return Path(shutil.copytree(TINY_PROJECT, destination))

    monkeypatch.setattr(project_module, "template_names", lambda: ["tiny-template"])
    monkeypatch.setattr(project_module, "_render", render)
    code, stdout, stderr = _compare("tiny-template", "--seeds", 1, "--max-epochs", 1, "--out", tmp_path / "out")
    assert code == 0, stdout + stderr
    kept = tmp_path / "out" / "project"
    assert (kept / "train.py").is_file()
    record = json.loads((tmp_path / "out" / "gc" / "seed_0" / "run.json").read_text())
    assert record["command"].startswith(f"cd {kept} && ")
    assert "project" in json.loads((tmp_path / "out" / ".lightning-gc-written.json").read_text())


# -- compare owns what it starts (issue 15) -------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@contextlib.contextmanager
def _long_comparison(out: Path):
    """`compare` in its own process, on a run that takes minutes; yields (compare, its train.py child) once the
    run has started, and kills both on the way out whatever happened."""
    compare = subprocess.Popen(
        [sys.executable, "-m", "lightning_gc", "compare", str(TINY_PROJECT), "--seeds", "1", "--max-epochs", "2000",
         "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (out / "baseline" / "seed_0" / "status.json").is_file() and time.monotonic() < deadline:
            assert compare.poll() is None, compare.stderr.read().decode()
            time.sleep(0.2)
        children = _children(compare.pid)
        assert len(children) == 1, f"compare's children: {children}"
        yield compare, children[0]
    finally:
        for pid in [compare.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        compare.wait()


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state == "Z":
            return True  # ended; its parent (init or the test) has not reaped it yet
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_run_stops_when_compare_is_killed(tmp_path):
    # Issue 15: after `kill -9` of compare, its train.py child kept running.
    with _long_comparison(tmp_path / "killed") as (compare, child):
        compare.kill()
        compare.wait()
        assert _gone_within(child, 30), f"train.py (pid {child}) outlived its SIGKILLed compare"


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_compare_ended_by_a_signal_ends_its_runs_and_says_how_to_resume(tmp_path, sig):
    with _long_comparison(tmp_path / sig) as (compare, child):
        compare.send_signal(getattr(signal, sig))
        assert compare.wait(60) == 130
        assert f"stopped by {sig}; its runs were stopped" in compare.stderr.read().decode()
        assert _gone_within(child, 5)


# -- SLURM: the one-node cluster of .ci/slurm-up ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("requires_slurm")
def test_compare_on_slurm_runs_each_run_as_a_job_and_records_it(tmp_path):
    out = tmp_path / "slurm"
    code, stdout, stderr = _compare(
        TINY_PROJECT, "--seeds", 1, "--max-epochs", 1, "--out", out, "--launcher", "slurm", "--slurm-cpus-per-run", 1,
        "--slurm-time", "00:10:00",
    )  # fmt: skip
    assert code == 0, stdout + stderr
    jobs = {arm: json.loads((out / arm / "seed_0" / "run.json").read_text())["job_id"] for arm in ("baseline", "gc")}
    assert all(jobs.values()) and len(set(jobs.values())) == 2
    assert jobs["baseline"].split("_")[0] == jobs["gc"].split("_")[0]  # one job array
    assert (
        "Testing" in (out / "gc" / "seed_0" / "train.log").read_text()
        or (out / "gc" / "seed_0" / "hparams.yaml").is_file()
    )
    runs = {r["arm"]: r for r in csv.DictReader(open(out / "runs.csv"))}
    assert runs["gc"]["job_id"] == jobs["gc"] and runs["gc"]["status"] == "finished"


@pytest.mark.slow
@pytest.mark.usefixtures("requires_slurm")
def test_resume_on_slurm_attaches_to_running_jobs_and_a_signal_cancels_them(tmp_path):
    out = tmp_path / "attach"
    args = [sys.executable, "-m", "lightning_gc", "compare", str(TINY_PROJECT), "--seeds", "1", "--max-epochs", "2000",
            "--out", str(out), "--launcher", "slurm"]  # fmt: skip
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job_file = out / "gc" / "seed_0" / "job.json"
    deadline = time.monotonic() + 120
    while not job_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.3)
    first.kill()  # SIGKILL: no chance to cancel; the jobs live on in SLURM, as they should
    first.wait()
    job_ids = [json.loads((out / arm / "seed_0" / "job.json").read_text())["job_id"] for arm in ("baseline", "gc")]
    second = subprocess.Popen([*args, "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    while len([line for line in lines if "waiting for it (--resume)" in line]) < 2:
        line = second.stdout.readline()
        assert line, second.stderr.read()
        lines.append(line)
    assert not any("starting" in line for line in lines)  # attached, not submitted a second time
    second.send_signal(signal.SIGTERM)
    assert second.wait(60) == 130
    for job_id in job_ids:  # 2000 epochs take many minutes: a job that left the queue now was cancelled
        deadline = time.monotonic() + 60
        queued = "?"
        while time.monotonic() < deadline:
            queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip()
            if not queued:
                break
            time.sleep(0.5)
        assert not queued, f"job {job_id} still queued or running after compare's SIGTERM: {queued}"


@pytest.mark.slow
@pytest.mark.usefixtures("requires_slurm")
def test_a_submission_the_cluster_refuses_is_a_clear_error(tmp_path):
    code, _, stderr = _compare(
        TINY_PROJECT, "--seeds", 1, "--out", tmp_path / "refused", "--launcher", "slurm", "--slurm-gpus-per-run", 64
    )
    assert code == 2 and "`--launcher slurm`: the jobs could not be submitted:" in stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_overwrite_keeps_the_files_a_user_put_in_out(tmp_path):
    # Issue 15: `compare --overwrite` removed the whole --out folder, including files the user put there.
    out = tmp_path / "mine"
    args = [TINY_PROJECT, "--seeds", 1, "--max-epochs", 1, "--out", out]
    assert _compare(*args)[0] == 0
    (out / "notes.txt").write_text("my notes")
    (out / "gc" / "plot-by-hand.py").write_text("print(1)")
    code, stdout, stderr = _compare(*args, "--overwrite")
    assert code == 0, stderr
    assert (out / "notes.txt").read_text() == "my notes" and (out / "gc" / "plot-by-hand.py").is_file()
    assert "left the rest: gc/plot-by-hand.py, notes.txt" in stdout


@pytest.mark.slow
def test_a_second_compare_on_the_same_out_is_refused_naming_the_first(tmp_path):
    # Issue 15: two `compare --resume` on one --out both ran every run into the same folders.
    out = tmp_path / "busy"
    with _long_comparison(out) as (first, _):
        second = subprocess.run(
            [sys.executable, "-m", "lightning_gc", "compare", str(TINY_PROJECT), "--seeds", "1", "--max-epochs", "2000",
             "--out", str(out), "--resume"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 2
        assert f"is in use by another lightning-gc compare (pid {first.pid})" in second.stderr
