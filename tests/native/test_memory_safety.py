"""The fused kernel is never handed memory it does not describe (issue 15): model changes between calls.

``model_changes.py`` drives random sequences of changes (dtype casts, ``.data`` swaps to other sizes and
dtypes, gradients of other dtypes, sizes and layouts, layers added, ``requires_grad`` toggled) and checks
every call against its own float64 reference. It runs in a subprocess: a crash (SIGSEGV, ``malloc():
invalid size``) fails the test instead of killing the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_gc import native

DRIVER = Path(__file__).with_name("model_changes.py")
SEEDS = range(8)


def run_driver(seed: int, route: str, changes: int = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, native.ENV_SWITCH: "1" if route == "native" else "0"}
    return subprocess.run(
        [sys.executable, "-W", "ignore", str(DRIVER), "--seed", str(seed), "--changes", str(changes)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("route", ["native", "eager"])
@pytest.mark.parametrize("seed", SEEDS)
def test_random_model_changes_match_the_float64_reference(seed, route):
    if route == "native" and not native.status().available:
        pytest.skip(f"fused kernel unavailable: {native.status().reason}")
    result = run_driver(seed, route)
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    assert result.stdout.strip().endswith("ok")
