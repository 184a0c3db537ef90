"""Progress over the whole study, as a log shows it (one line per event): done, running, left, time left."""

import io
from pathlib import Path

from lightning_gc.compare.progress import Progress
from lightning_gc.compare.summary import DIVERGED, FAILED, FINISHED, RunRecord


def _record(arm, seed, status, seconds, returncode=0, diverged_at=None):
    folder = Path(f"{arm}{seed}")
    return RunRecord(arm, seed, status, folder, folder / "train.log", returncode, diverged_at, seconds)


def test_progress_names_the_run_and_the_state_of_the_whole_study():
    stream = io.StringIO()
    progress = Progress(5, stream=stream, tty=False, parallel=2)
    progress.skip("baseline seed_0", _record("baseline", 0, FINISHED, 0))
    progress.start("gc seed_0")
    progress.start("baseline seed_1")
    progress.update("gc seed_0", {"epoch": 0, "max_epochs": 2, "step": 3, "total_steps": 10})
    progress.update("gc seed_0", {"epoch": 0, "max_epochs": 2, "step": 4, "total_steps": 10})  # same epoch: no line
    progress.update("gc seed_0", {"epoch": 1, "max_epochs": 2, "step": 5, "total_steps": 10})
    assert progress.fraction == (1 + 0.5) / 5
    progress.finish("gc seed_0", _record("gc", 0, DIVERGED, 12.0, diverged_at=5))
    progress.finish("baseline seed_1", _record("baseline", 1, FAILED, 4.0, returncode=1))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith(
        "baseline seed_0: finished earlier, skipped (--resume) | study 20% | 1 done, 0 running, 4 left"
    )
    assert lines[1].startswith("gc seed_0: starting | study 20% | 1 done, 1 running, 3 left")
    assert lines[2].startswith("baseline seed_1: starting | study 20% | 1 done, 2 running, 2 left")
    assert lines[3].startswith("gc seed_0: epoch 1/2, step 3/10 | study 26% | 1 done, 2 running, 2 left")
    assert lines[4].startswith("gc seed_0: epoch 2/2, step 5/10 | study 30%")
    assert lines[5].startswith("gc seed_0: DIVERGED at step 5 (non-finite loss), stopped early in 12 s | study 40%")
    assert lines[5].endswith("~0:00:18 left")  # 3 runs to go at 12 s each, 2 at once
    assert lines[6].startswith("baseline seed_1: FAILED (exit code 1), see baseline1/train.log; continuing in 4 s")
    assert "3 done, 0 running, 2 left" in lines[6] and lines[6].endswith("~0:00:08 left")  # 2 x mean(12, 4) / 2
    assert len(lines) == 7


def test_a_terminal_gets_the_latest_run_rewritten_in_place():
    stream = io.StringIO()
    progress = Progress(2, stream=stream, tty=True)
    progress.start("gc seed_0")
    progress.update("gc seed_0", {"epoch": 0, "max_epochs": 1, "step": 1, "total_steps": 2})
    assert stream.getvalue().count("\n") == 0 and stream.getvalue().count("\r\033[K") == 2
    assert stream.getvalue().endswith(
        "gc seed_0: epoch 1/1, step 1/2 | study 25% | 0 done, 1 running, 1 left | 0:00:00 elapsed"
    )
