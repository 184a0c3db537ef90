"""Progress over the whole comparison, as a log shows it (one line per event)."""

import io
from pathlib import Path

from lightning_gc.compare.progress import Progress
from lightning_gc.compare.summary import DIVERGED, FAILED, FINISHED, RunRecord


def test_progress_names_the_run_and_the_share_of_the_whole_comparison():
    stream = io.StringIO()
    progress = Progress(4, stream=stream, tty=False)
    progress.skip(1, RunRecord("baseline", 0, FINISHED, Path("b0"), Path("b0/train.log")))
    progress.start(2, "gc", 0)
    progress.update({"epoch": 0, "max_epochs": 2, "step": 3, "total_steps": 10})
    progress.update({"epoch": 0, "max_epochs": 2, "step": 4, "total_steps": 10})  # same epoch: no new line
    progress.update({"epoch": 1, "max_epochs": 2, "step": 5, "total_steps": 10})
    assert progress.fraction == (1 + 0.5) / 4
    progress.finish(RunRecord("gc", 0, DIVERGED, Path("g0"), Path("g0/train.log"), 0, 5, 12.0), "g0/train.log")
    progress.start(3, "baseline", 1)
    progress.finish(RunRecord("baseline", 1, FAILED, Path("b1"), Path("b1/train.log"), 1, None, 3.0), "b1/train.log")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[1/4] baseline seed_0: finished earlier, skipped (--resume)"
    assert lines[1] == "[2/4] gc seed_0: starting"
    assert lines[2].startswith("[2/4] gc seed_0: epoch 1/2, step 3/10 | comparison 32%")
    assert lines[3].startswith("[2/4] gc seed_0: epoch 2/2, step 5/10 | comparison 38%")
    assert lines[4].startswith(
        "[2/4] gc seed_0: DIVERGED at step 5 (non-finite loss), stopped early in 12 s | comparison 50%"
    )
    assert "~0:00:24 left" in lines[4]  # 2 runs to go at 12 s each
    assert lines[6].startswith("[3/4] baseline seed_1: FAILED (exit code 1), see b1/train.log; continuing")
    assert len(lines) == 7


def test_a_terminal_gets_one_line_rewritten_in_place():
    stream = io.StringIO()
    progress = Progress(2, stream=stream, tty=True)
    progress.start(1, "gc", 0)
    progress.update({"epoch": 0, "max_epochs": 1, "step": 1, "total_steps": 2})
    assert stream.getvalue().count("\n") == 0 and stream.getvalue().count("\r\033[K") == 2
