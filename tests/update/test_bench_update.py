"""benchmarks/bench_update.py runs and reports every ratio (values are the machine's: nothing asserted on them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_update_quick_run_reports_every_ratio(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_update.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "update GC / step" in result.stdout
    rows = json.loads(out.read_text())
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    for row in rows:
        for key in ("over_step", "over_copy", "held_fraction", "peak_temporary_fraction"):
            assert row[key] > 0, key
