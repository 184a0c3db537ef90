"""lightning_gc.compare.slurm against a real SLURM cluster (.ci/slurm-up starts one on this machine)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import requires_slurm  # noqa: F401  (the fixture)

from lightning_gc.compare.slurm import SlurmJob, SlurmLauncher, SlurmOptions, SlurmRun

WAIT_S = 180  # bounded waits: a job array of small commands ends within seconds on an idle node


def _wait(jobs, timeout=WAIT_S, until=lambda job: job.done()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(until(job) for job in jobs):
            return
        time.sleep(0.5)
    states = {job.job_id: job.state() for job in jobs}
    pytest.fail(f"jobs not there after {timeout}s: {states}")


def _python_run(key, code, cwd, log, env=None):
    return SlurmRun(key, [sys.executable, "-c", code], cwd, {} if env is None else env, log)


def _scontrol(job_id):
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True, check=True)
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


# --- options: checked before anything is submitted -------------------------------------------------------


@pytest.mark.parametrize(
    ("time_spec", "minutes"),
    [("90", 90), ("0:30", 1), ("5:00", 5), ("02:00:00", 120), ("1:30:01", 91), ("1-0", 1440), ("2-03:04", 3064),
     ("1-00:00:30", 1441)],
)  # fmt: skip
def test_sbatch_time_syntax_in_minutes(time_spec, minutes):
    assert SlurmOptions(time=time_spec).sbatch_time_minutes == minutes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"time": "2h"}, "time must be in sbatch --time syntax"),
        ({"time": "0"}, "time must be in sbatch --time syntax"),
        ({"partition": ""}, "partition must be a non-empty"),
        ({"gpus_per_run": -1}, "gpus_per_run must be an integer >= 0"),
        ({"gpus_per_run": 1.5}, "gpus_per_run must be an integer >= 0"),
        ({"cpus_per_run": 0}, "cpus_per_run must be an integer >= 1"),
        ({"sbatch_args": ("-q high",)}, "sbatch_args: each must be '--name=value' or '--flag'"),
        ({"sbatch_args": "--qos=high"}, "sbatch_args must be a tuple"),
    ],
)
def test_bad_options_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlurmOptions(**kwargs)


def test_options_map_to_submitit_parameters():
    options = SlurmOptions(
        "gpu", "1-00:00:00", gpus_per_run=2, cpus_per_run=8, sbatch_args=("--qos=high", "--exclusive")
    )
    parameters = options.executor_parameters()
    assert parameters["partition"] == "gpu" and parameters["time"] == 1440
    assert parameters["gpus_per_task"] == 2 and parameters["cpus_per_task"] == 8
    assert parameters["additional_parameters"] == {"qos": "high", "exclusive": True}
    defaults = SlurmOptions().executor_parameters()
    assert defaults["time"] is None and defaults["partition"] is None and "gpus_per_task" not in defaults


def test_missing_submitit_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "submitit", None)  # makes `import submitit` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "lightning-gc\[slurm\]"'):
        SlurmLauncher(tmp_path, SlurmOptions())


def test_duplicate_keys_and_bad_job_ids_are_refused(tmp_path):
    launcher = SlurmLauncher(tmp_path, SlurmOptions())
    run = _python_run("same", "pass", tmp_path, tmp_path / "log")
    with pytest.raises(ValueError, match="runs: keys must be unique"):
        launcher.submit([run, run])
    with pytest.raises(ValueError, match="job_id must be a SLURM job id"):
        launcher.attach("12;rm")


# --- the real cluster ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("requires_slurm")
def test_a_job_array_runs_each_command_in_its_folder_with_its_env_and_log(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_GC_FROM_SUBMITTER", "submitter")  # sbatch copies it into the job
    monkeypatch.setenv("LIGHTNING_GC_OVERRIDDEN", "submitter")
    code = (
        "import json, os, sys\n"
        "print('out of', os.environ['RUN_NAME'])\n"
        "print('err of', os.environ['RUN_NAME'], file=sys.stderr)\n"
        "names = ['RUN_NAME', 'LIGHTNING_GC_FROM_SUBMITTER', 'LIGHTNING_GC_OVERRIDDEN', 'SLURM_JOB_ID',\n"
        "         'SLURM_ARRAY_TASK_ID', 'PATH']\n"
        "json.dump({'cwd': os.getcwd(), 'env': {n: os.environ.get(n) for n in names}}, open('seen.json', 'w'))\n"
        "sys.exit(int(os.environ['EXIT_CODE']))\n"
    )
    exit_codes = [0, 3, 0]
    runs = []
    for index, exit_code in enumerate(exit_codes):
        cwd = tmp_path / f"run{index}"
        cwd.mkdir()
        run_env = {  # overrides only, as compare passes them
            "RUN_NAME": f"run{index}",
            "EXIT_CODE": str(exit_code),
            "LIGHTNING_GC_OVERRIDDEN": "run",
            "SLURM_JOB_ID": "from-run-env",
        }
        runs.append(_python_run(f"lr=0.1/arm{index}/seed_0", code, cwd, tmp_path / "logs" / f"run{index}.log", run_env))
    launcher = SlurmLauncher(tmp_path / "submitit", SlurmOptions(time="00:10:00", sbatch_args=("--comment=lgc-test",)))
    jobs = launcher.submit(runs)

    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1 and [job.job_id.split("_")[1] for job in jobs] == ["0", "1", "2"]  # one job array
    fields = _scontrol(jobs[0].job_id)
    assert fields["Comment"] == "lgc-test" and fields["TimeLimit"] == "00:10:00" and fields["NumCPUs"] == "1"
    _wait(jobs)

    assert [job.returncode() for job in jobs] == exit_codes
    assert [job.state() for job in jobs] == ["COMPLETED", "FAILED", "COMPLETED"]
    for index, (run, job) in enumerate(zip(runs, jobs)):
        seen = json.loads((run.cwd / "seen.json").read_text())
        assert Path(seen["cwd"]) == run.cwd
        assert seen["env"]["RUN_NAME"] == f"run{index}"
        assert seen["env"]["LIGHTNING_GC_OVERRIDDEN"] == "run" and seen["env"]["PATH"] == os.environ["PATH"]
        assert seen["env"]["LIGHTNING_GC_FROM_SUBMITTER"] == "submitter"
        # the allocation's variables are the job's own, whatever the run's env says
        assert seen["env"]["SLURM_ARRAY_TASK_ID"] == str(index) and seen["env"]["SLURM_JOB_ID"].isdigit()
        # stdout and stderr in the one log (their order depends on the child's buffering)
        assert sorted(run.log.read_text().splitlines()) == [f"err of run{index}", f"out of run{index}"]


@pytest.mark.slow
@pytest.mark.usefixtures("requires_slurm")
def test_attach_from_a_fresh_process_finds_the_job_and_its_return_code(tmp_path):
    folder = tmp_path / "submitit"
    run = _python_run("only", "import time, sys; time.sleep(3); sys.exit(5)", tmp_path, tmp_path / "run.log")
    (job,) = SlurmLauncher(folder, SlurmOptions()).submit([run])
    assert "_" not in job.job_id  # a single run is a plain job, not an array
    attach = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from lightning_gc.compare.slurm import SlurmLauncher, SlurmOptions\n"
        "job = SlurmLauncher(Path(sys.argv[1]), SlurmOptions()).attach(sys.argv[2])\n"
        "first = job.state()\n"
        f"deadline = time.monotonic() + {WAIT_S}\n"
        "while not job.done() and time.monotonic() < deadline:\n"
        "    time.sleep(0.5)\n"
        "print(json.dumps([first, job.state(), job.returncode(), job.done()]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", attach, str(folder), job.job_id], capture_output=True, text=True, timeout=WAIT_S + 60
    )
    assert result.returncode == 0, result.stderr
    first, state, returncode, done = json.loads(result.stdout)
    assert first in {"PENDING", "CONFIGURING", "RUNNING"}  # attached while the job was still queued or running
    assert (state, returncode, done) == ("FAILED", 5, True)


@pytest.mark.slow
@pytest.mark.usefixtures("requires_slurm")
def test_cancel_stops_a_sleeping_job(tmp_path):
    started = tmp_path / "started"
    code = f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(600); print('woke up')"
    (job,) = SlurmLauncher(tmp_path / "submitit", SlurmOptions()).submit(
        [_python_run("sleep", code, tmp_path, tmp_path / "run.log")]
    )
    _wait([job], until=lambda j: started.exists())
    assert job.state() == "RUNNING" and not job.done() and job.returncode() is None
    job.cancel()
    _wait([job], timeout=90)
    assert job.state() == "CANCELLED"
    # scancel's SIGTERM ends the command (the task records -15) unless SLURM's SIGKILL took the task first
    assert job.returncode() in (None, -signal.SIGTERM)
    assert "woke up" not in job_log_text(tmp_path / "run.log")
    job.cancel()  # cancelling an ended job is harmless


@pytest.mark.slow
@pytest.mark.usefixtures("requires_slurm")
def test_a_request_the_cluster_cannot_grant_is_an_error_naming_the_submission(tmp_path):
    launcher = SlurmLauncher(tmp_path / "submitit", SlurmOptions(gpus_per_run=2))  # the test cluster has no GPUs
    with pytest.raises(Exception, match=r"(?i)gres|gpu|resource"):
        launcher.submit([_python_run("gpu", "pass", tmp_path, tmp_path / "run.log")])
    scripts = list((tmp_path / "submitit").glob("*.sh")) or list((tmp_path / "submitit").rglob("*submission*"))
    assert any("--gpus-per-task=2" in path.read_text() for path in scripts)


@pytest.mark.usefixtures("requires_slurm")
def test_a_job_nobody_knows_is_not_found_and_done(tmp_path):
    job = SlurmJob("999999999", tmp_path)
    assert job.state() == "NOT_FOUND" and job.done() and job.returncode() is None


def job_log_text(path):
    return path.read_text() if path.exists() else ""
