"""The Triton route under Triton's CPU interpreter, each check in a subprocess (``TRITON_INTERPRET=1`` must be
set before Triton is imported, and a bad address in a kernel kills the process, not the suite)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_gc.triton_kernel import ENV_SWITCH, enabled, triton_route

CHECKS = Path(__file__).with_name("interpreted_checks.py")
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("numpy") is None,
    reason="the `triton` extra (triton, numpy) is not installed",
)


@needs_triton
@pytest.mark.parametrize(
    "check",
    ["plans", "float32", "float64", "float16", "channels_last", "removed_norm", "launches", "declines", "weight_decay"],
)
def test_interpreted_kernel(check):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(CHECKS), check], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    assert result.stdout.strip().endswith("ok")


def test_off_unless_asked_for(monkeypatch):
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    assert not enabled()
    assert triton_route([]) is None
    monkeypatch.setenv(ENV_SWITCH, "1")
    assert enabled()
