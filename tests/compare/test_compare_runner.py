"""The training command follows the template convention, then the monitor, the user's args and the sweep
point; runs are spread over the machine's GPUs and CPU threads; the scheduler keeps what --resume may keep."""

import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_gc.compare.launchers import LocalLauncher, SlurmBackend
from lightning_gc.compare.output import prepare_output
from lightning_gc.compare.progress import Progress
from lightning_gc.compare.project import ProjectError, load_project
from lightning_gc.compare.runner import JOB_FILE, PROCESS_FILE, RECORD_FILE, note_process, plans, running_process
from lightning_gc.compare.scheduler import run_all


def test_the_command_is_the_convention_then_the_monitor_then_extra_args(tiny_project, tmp_path):
    project = load_project(tiny_project, configs=["configs/settings/huge_lr.yaml"])
    todo = plans(project, range(2), tmp_path, max_epochs=5, lightning_args=["--data.batch_size", "8"])
    assert [(p.arm, p.seed) for p in todo] == [("baseline", 0), ("gc", 0), ("baseline", 1), ("gc", 1)]
    plan = todo[3]
    assert plan.run_dir == tmp_path / "gc" / "seed_1" and plan.key == "gc/seed_1"
    root = Path(tiny_project).resolve()
    assert plan.command(python="python") == [
        "python", "train.py", "fit",
        "--config", str(root / "configs" / "gc.yaml"),
        "--config", str(root / "configs" / "settings" / "huge_lr.yaml"),
        "--seed_everything", "1",
        "--trainer.max_epochs", "5",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "gc"),
        "--trainer.logger.init_args.name", "",
        "--trainer.logger.init_args.version", "seed_1",
        "--trainer.callbacks+=lightning_gc.compare.RunMonitor",
        "--trainer.callbacks.init_args.status_file", str(tmp_path / "gc" / "seed_1" / "status.json"),
        "--trainer.callbacks.init_args.arm", "gc",
        "--trainer.callbacks.init_args.seed", "1",
        "--data.batch_size", "8",
    ]  # fmt: skip


def test_a_sweep_point_goes_last_and_into_its_own_folder(tiny_project, tmp_path):
    project = load_project(tiny_project)
    points = [("model.lr=0.1", ("--model.lr", "0.1")), ("model.lr=1", ("--model.lr", "1"))]
    todo = plans(project, [0], tmp_path, 2, ["--data.batch_size", "8"], points, trainer_devices=2)
    assert [p.key for p in todo] == [
        "model.lr=0.1/baseline/seed_0", "model.lr=0.1/gc/seed_0", "model.lr=1/baseline/seed_0", "model.lr=1/gc/seed_0"
    ]  # fmt: skip
    command = todo[3].command()
    assert command[-4:] == ["--data.batch_size", "8", "--model.lr", "1"]
    assert command[command.index("--trainer.logger.init_args.save_dir") + 1] == str(tmp_path / "model.lr=1" / "gc")
    assert command[command.index("--trainer.devices") + 1] == "2"


def test_the_recorded_shell_line_reruns_from_anywhere(tiny_project, tmp_path):
    plan = plans(load_project(tiny_project), [0], tmp_path, 1, [])[1]
    line = plan.shell_line({"OMP_NUM_THREADS": "1"})
    assert line.startswith(
        f"cd {shlex.quote(str(Path(tiny_project).resolve()))} && OMP_NUM_THREADS=1 {sys.executable} train.py fit"
    )
    assert shlex.split(line)[4:] == plan.command()


def test_without_max_epochs_the_configs_value_is_kept(tiny_project, tmp_path):
    plan = plans(load_project(tiny_project), [0], tmp_path, max_epochs=None, lightning_args=[])[0]
    assert "--trainer.max_epochs" not in plan.command()


def test_gpus_are_given_one_group_per_run_and_never_shared_unless_asked():
    launcher = LocalLauncher(jobs=2, devices_per_run=2, gpus=["0", "1", "2", "3"], cpus=8, environ={})
    assert [e["CUDA_VISIBLE_DEVICES"] for e in launcher.slot_env] == ["0,1", "2,3"]
    assert launcher.slot_env[0]["OMP_NUM_THREADS"] == "4"
    with pytest.raises(
        ProjectError, match=r"`--jobs` 3 x `--devices-per-run` 2 needs 6 GPUs, 4 visible \(0,1,2,3\).*--share-devices"
    ):
        LocalLauncher(jobs=3, devices_per_run=2, gpus=["0", "1", "2", "3"], environ={})
    shared = LocalLauncher(jobs=3, devices_per_run=2, share_devices=True, gpus=["0", "1", "2", "3"], environ={})
    assert [e["CUDA_VISIBLE_DEVICES"] for e in shared.slot_env] == ["0,1", "2,3", "0,1"]
    with pytest.raises(ProjectError, match=r"`--devices-per-run` 3: only 2 GPU\(s\) visible"):
        LocalLauncher(devices_per_run=3, gpus=["0", "1"], environ={})
    with pytest.raises(ProjectError, match="`--devices-per-run` 1: no GPU is visible"):
        LocalLauncher(devices_per_run=1, gpus=[], environ={})


def test_cpu_threads_are_split_unless_the_user_chose_them():
    assert LocalLauncher(jobs=3, gpus=[], cpus=8, environ={}).slot_env[2] == {
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
    }
    assert LocalLauncher(jobs=4, gpus=[], cpus=2, environ={}).slot_env[0]["OMP_NUM_THREADS"] == "1"
    assert LocalLauncher(jobs=2, gpus=[], cpus=8, environ={"OMP_NUM_THREADS": "3"}).slot_env == [{}, {}]
    visible = LocalLauncher(jobs=1, cpus=1, environ={"CUDA_VISIBLE_DEVICES": "5,7"})
    assert visible.slot_env[0]["CUDA_VISIBLE_DEVICES"] == "5"  # the GPUs the user made visible, one per run


def test_resume_refuses_to_delete_the_folder_of_a_run_still_running(tiny_project, tmp_path):
    # Issue 15: after `kill -9` of compare, `--resume` deleted the folder of the still-running child.
    project = load_project(tiny_project)
    todo = plans(project, [0], tmp_path / "out", 1, [])
    folder, _ = prepare_output(tmp_path / "out", {"project": "p"})
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        todo[0].run_dir.mkdir(parents=True)
        note_process(todo[0].run_dir, sleeper.pid)
        (todo[0].run_dir / "events.out").write_text("being written")
        progress = Progress(len(todo), stream=open(os.devnull, "w"), tty=False)
        with pytest.raises(ProjectError, match=rf"baseline/seed_0 is still running as process {sleeper.pid}"):
            run_all(todo, LocalLauncher(gpus=[], environ={}), progress, folder, resume=True)
        assert (todo[0].run_dir / "events.out").read_text() == "being written"
        assert running_process(todo[0].run_dir) == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
        folder.close()
    assert running_process(todo[0].run_dir) is None  # ended: the next resume may rerun it


class FakeJob:
    """A SLURM job as the pinned interface describes it, driven by the test."""

    def __init__(self, job_id, state="PENDING"):
        self.job_id, self._state, self.cancelled = job_id, state, False

    def state(self):
        return self._state

    def done(self):
        return self._state not in ("PENDING", "RUNNING")

    def returncode(self):
        return 0 if self._state == "COMPLETED" else None

    def cancel(self):
        self.cancelled, self._state = True, "CANCELLED"


class FakeSlurm(SlurmBackend):
    """compare's SLURM backend over a fake launcher: the runs are "run" by writing their files, no cluster."""

    def __init__(self, earlier=None):
        self.parallel, self.options, self.submitted = 1_000_000, None, []
        self.jobs = dict(earlier or {})

    def start(self, plans):
        from lightning_gc.compare.launchers import SlurmRunning

        started = []
        for plan in plans:
            job = FakeJob(f"100_{len(self.submitted)}", "COMPLETED")
            self.submitted.append(plan.key)
            plan.run_dir.mkdir(parents=True, exist_ok=True)
            (plan.run_dir / JOB_FILE).write_text(json.dumps({"job_id": job.job_id}))
            started.append(SlurmRunning(plan, "cmd", job))
        return started

    def attach(self, plan, job_id):
        from lightning_gc.compare.launchers import SlurmRunning

        job = self.jobs[job_id]
        return SlurmRunning(plan, "cmd", job) if not job.done() else None


def test_resume_waits_for_slurm_jobs_still_queued_instead_of_submitting_them_again(tiny_project, tmp_path):
    project = load_project(tiny_project)
    todo = plans(project, [0], tmp_path / "out", 1, [])  # baseline/seed_0, gc/seed_0
    folder, _ = prepare_output(tmp_path / "out", {"project": "p"})
    queued = FakeJob("7_0", "PENDING")
    for plan, job in zip(todo, ("7_0", "7_1")):
        plan.run_dir.mkdir(parents=True)
        (plan.run_dir / JOB_FILE).write_text(json.dumps({"job_id": job}))
    launcher = FakeSlurm({"7_0": queued, "7_1": FakeJob("7_1", "CANCELLED")})  # 7_1 ended without a record
    stream = io.StringIO()

    import threading

    threading.Timer(1.0, lambda: setattr(queued, "_state", "COMPLETED")).start()
    records = run_all(todo, launcher, Progress(2, stream=stream, tty=False), folder, resume=True, poll_seconds=0.05)
    folder.close()
    assert launcher.submitted == ["gc/seed_0"]  # only the job that had ended without a result is submitted again
    assert "baseline seed_0: still queued or running as SLURM job 7_0, waiting for it (--resume)" in stream.getvalue()
    assert [(r.arm, r.job_id) for r in records] == [("baseline", "7_0"), ("gc", "100_0")]
    assert json.loads((todo[0].run_dir / RECORD_FILE).read_text())["job_id"] == "7_0"


def test_an_interrupted_study_cancels_its_slurm_jobs(tiny_project, tmp_path):
    project = load_project(tiny_project)
    todo = plans(project, [0], tmp_path / "out", 1, [])
    folder, _ = prepare_output(tmp_path / "out", {"project": "p"})
    job = FakeJob("9_0", "RUNNING")
    todo[0].run_dir.mkdir(parents=True)
    (todo[0].run_dir / JOB_FILE).write_text(json.dumps({"job_id": "9_0"}))
    launcher = FakeSlurm({"9_0": job})

    class Stop(Progress):
        def update(self, label, status):
            raise KeyboardInterrupt

    (todo[0].run_dir / "status.json").write_text(json.dumps({"state": "running", "epoch": 0}))
    with pytest.raises(KeyboardInterrupt):
        run_all(todo[:1], launcher, Stop(1, stream=io.StringIO(), tty=False), folder, resume=True)
    folder.close()
    assert job.cancelled
    assert not (todo[0].run_dir / PROCESS_FILE).exists()


def test_a_run_that_cannot_start_is_a_failed_run_and_the_others_go_on(tiny_project, tmp_path):
    from dataclasses import replace

    project = load_project(tiny_project)
    gone = replace(project, root=tmp_path / "deleted-project")  # the working directory vanished
    todo = plans(gone, [0], tmp_path / "out", 1, [])
    folder, _ = prepare_output(tmp_path / "out", {"project": "p"})
    stream = io.StringIO()
    records = run_all(todo, LocalLauncher(jobs=2, gpus=[], environ={}), Progress(2, stream=stream, tty=False), folder)
    folder.close()
    assert [(r.status, r.returncode) for r in records] == [("failed", None), ("failed", None)]
    assert "could not start" in (todo[0].run_dir / "train.log").read_text()
    assert "baseline seed_0: FAILED (baseline seed_0: could not start:" in stream.getvalue()
