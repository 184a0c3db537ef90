"""`benchmarks/bench_gc.py` runs end to end in its tiny mode and writes what it prints (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gc.py"


@pytest.mark.slow
def test_quick_benchmark_writes_a_complete_report(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--quick", "--rounds", "2", "--training-steps", "3", "--out", str(out)]
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["environment"]["device_type"] in ("cpu", "cuda")
    assert [(r["set"], r["dtype"]) for r in result["rows"]] == [("tiny", "float32"), ("tiny", "bfloat16")]
    for row in result["rows"]:
        for key in ("ours_over_floor", "official_over_floor", "ours_over_official", "peak_extra_fraction"):
            assert math.isfinite(row[key]) and row[key] >= 0, key
    share = result["training"]["digits-cnn"]
    assert share["steps"] == 3 and 0 < share["hook_share"] < 1
    assert "| tiny | float32 |" in run.stdout and "| digits-cnn | 3 |" in run.stdout


def test_unknown_sets_and_dtypes_are_refused(capsys):
    spec = importlib.util.spec_from_file_location("bench_gc", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit):
        bench.parse_args(["--sets", "resnet50,vgg"])
    assert "--sets: unknown ['vgg']; accepted: ['resnet50', 'gpt2-small', 'many-small']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--dtypes", "int8"])
    assert "--dtypes: unknown ['int8']" in capsys.readouterr().err


def test_parameter_sets_have_the_real_models_sizes():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from param_sets import count_parameters, gpt2_small_shapes, many_small_shapes, resnet50_shapes
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert (len(resnet50_shapes()), count_parameters(resnet50_shapes())) == (161, 25_557_032)  # torchvision
    assert (len(gpt2_small_shapes()), count_parameters(gpt2_small_shapes())) == (148, 124_439_808)  # HF gpt2
    assert sum(len(s) >= 2 for s in resnet50_shapes()) == 54  # 53 convolutions and the classifier
    assert many_small_shapes() == [(64, 64)] * 2000


def test_the_per_call_benchmark_prints_every_figure_for_both_shapes():
    script = SCRIPT.parent / "per_call.py"
    run = subprocess.run(
        [sys.executable, str(script), "--rounds", "2", "--tensors", "20"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("kernel: ") and len(lines) == 3
    for line in lines[1:]:
        assert "plan.apply us per tensor" in line and "centralize_gradients / floor" in line
