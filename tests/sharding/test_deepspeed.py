"""Exact GC under DeepSpeed ZeRO-1/2 (Lightning's DeepSpeedStrategy) on 2 CPU ranks; ZeRO-3 refused.

The multi-process tests need DeepSpeed (the ``deepspeed`` extra; ``make setup`` installs it) and skip
without it. With ``accumulate_grad_batches=k`` Lightning divides the loss by ``k`` and DeepSpeed divides it
again, so the reference scales its gradient by ``1 / k`` to train the same model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _fsdp_case as case
from _multiprocess import launch

from lightning_gc.sharding import adapter_for
from lightning_gc.sharding.deepspeed import check_zero_stage, zero_stage
from lightning_gc.sharding.guard import UnsupportedGradientLayoutError

CONFIGS: list[dict[str, Any]] = [
    {"name": "zero1", "stage": 1},
    {"name": "zero2", "stage": 2},
    # Two parameter groups: a partition boundary falls inside the transposed conv's interleaved rows.
    {"name": "zero2-groups-decay", "stage": 2, "optimizer": "sgd_groups", "weight_decay": 0.1},
    {"name": "zero1-tensor-adam", "stage": 1, "mode": "tensor", "optimizer": "adam"},
    {"name": "zero2-bf16_mixed", "stage": 2, "precision": "bf16-mixed"},  # bf16 gradient fragments
]
# Epochs of 3 micro-batches, accumulating 2: Lightning counts micro-batches per epoch, DeepSpeed over the run, so in
# the second epoch Lightning logs on micro-batches where DeepSpeed (and GC) wait for the next boundary.
DRIFTING = {"name": "zero2-drifting-boundaries", "stage": 2, "batches": 3, "epochs": 2}
GRAD_FACTOR = 1.0 / case.ACCUMULATE


def _ids(configs: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in configs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'lightning-gc[deepspeed]'")
    out = tmp_path_factory.mktemp("deepspeed")
    launch(
        Path(__file__).parent / "_deepspeed_worker.py", [str(out), json.dumps([*CONFIGS, DRIFTING])], world=case.WORLD
    )
    return [torch.load(out / f"rank{r}.pt") for r in range(case.WORLD)]


def _reference(config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    return case.reference_run(
        mode=config.get("mode", "channel"),
        weight_decay=config.get("weight_decay", 0.0),
        optimizer=config.get("optimizer", "sgd"),
        grad_factor=GRAD_FACTOR,
    )


def _bf16(config: dict[str, Any]) -> bool:
    return config.get("precision", "32-true") != "32-true"


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=_ids(CONFIGS))
def test_parameters_match_float64_reference(runs: list[dict[str, Any]], config: dict[str, Any]) -> None:
    expected, _ = _reference(config)
    for rank_results in runs:
        got = rank_results[config["name"]]["params"]
        assert set(got) == set(expected)
        atol = 2e-3 if _bf16(config) else 1e-6
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, atol=atol, rtol=0, msg=f"{config['name']}: {name}")


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=_ids(CONFIGS))
def test_centralized_gradient_is_exact_gc_of_deepspeed_gradient(
    runs: list[dict[str, Any]], config: dict[str, Any]
) -> None:
    """At each accumulation boundary, DeepSpeed's assembled gradient after the hook is GC of the one before."""
    result = runs[0][config["name"]]
    owners = case.owners()
    decay = config.get("weight_decay", 0.0)
    assert len(result["pre"]) == case.STEPS
    for pre, post, weights in zip(result["pre"], result["post"], result["weights"]):
        for name, before in pre.items():
            expected, w = before, weights[name]
            if before.ndim >= 2:
                expected = (
                    case.gc_reference(name, before + decay * w, owners[name], config.get("mode", "channel")) - decay * w
                )
            scale = (before.abs() + decay * w.abs()).max()  # the compensation is part of what is subtracted
            tol = 8e-3 if _bf16(config) else 1e-6  # bf16 fragments: the result is rounded to bf16
            assert (post[name] - expected).abs().max() <= tol * scale, f"{config['name']}: {name}"


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=_ids(CONFIGS))
def test_diagnostics_are_global_identical_and_only_at_boundaries(
    runs: list[dict[str, Any]], config: dict[str, Any]
) -> None:
    """Lightning calls the hook on every micro-batch under DeepSpeed; GC runs, is logged and counted at boundaries only."""
    _, expected = _reference(config)
    per_rank = [r[config["name"]]["metrics"] for r in runs]
    assert per_rank[0] == per_rank[1]
    boundary = [m for m in per_rank[0] if m]  # the worker keeps the gc/ keys only
    assert len(boundary) == case.STEPS, per_rank[0]  # no zeros logged for the micro-batches GC waited on
    pre = runs[0][config["name"]]["pre"][0]
    weights = [g for name, g in pre.items() if g.ndim >= 2 and not case.is_magnitude(name)]
    assert "gc/centralized_tensors" in boundary[0]  # the counts are logged when they change, so first
    for logged in boundary:
        assert logged.get("gc/centralized_tensors", len(weights)) == len(weights)
        assert logged.get("gc/centralized_elements", sum(g.numel() for g in weights)) == sum(g.numel() for g in weights)
    assert [r[config["name"]]["optimizer_steps"] for r in runs] == [case.STEPS] * case.WORLD
    rtol = 2e-2 if _bf16(config) else 1e-5
    for logged, reference in zip(boundary, expected):
        assert logged["gc/grad_norm"] == pytest.approx(reference["grad_norm"], rel=rtol)
        assert logged["gc/removed_norm_ratio"] == pytest.approx(reference["removed_norm_ratio"], rel=rtol)


@pytest.mark.slow
def test_no_zeros_logged_where_lightning_logs_between_deepspeed_boundaries(runs: list[dict[str, Any]]) -> None:
    per_rank = [r[DRIFTING["name"]] for r in runs]
    weights = [g for name, g in per_rank[0]["pre"][0].items() if g.ndim >= 2 and not case.is_magnitude(name)]
    logged = [m for m in per_rank[0]["metrics"] if m]
    assert len(logged) == 2  # Lightning's own boundaries: the 2nd micro-batch of each epoch
    assert "gc/centralized_tensors" in logged[0]  # the counts are logged when they change, so first
    for m in logged:  # what the last GC step did, never the zeros of a micro-batch it waited on
        assert m.get("gc/centralized_tensors", len(weights)) == len(weights)
        assert m.get("gc/centralized_elements", sum(g.numel() for g in weights)) == sum(g.numel() for g in weights)
        assert m["gc/grad_norm"] > 0
    assert [len(r["pre"]) for r in per_rank] == [3, 3]  # DeepSpeed's boundaries: micro-batches 2, 4 and 6
    assert [r["optimizer_steps"] for r in per_rank] == [3, 3]


@pytest.mark.slow
def test_partition_boundaries_cut_rows(runs: list[dict[str, Any]]) -> None:
    groups = runs[0]["zero2-groups-decay"]
    assert groups["cut_rows"]["net.up.weight"] == 6  # interleaved rows: all shared
    assert groups["cut_rows"] == runs[1]["zero2-groups-decay"]["cut_rows"]
    slots = 2 * sum(groups["cut_rows"].values())
    assert groups["bytes_per_step"] == (slots + 2) * 4


# ---- single process --------------------------------------------------------------------------------------


def _fake_strategy(stage: int | None) -> Any:
    DeepSpeedStrategy = type("DeepSpeedStrategy", (), {})
    strategy = DeepSpeedStrategy()
    strategy.config = {} if stage is None else {"zero_optimization": {"stage": stage}}
    return strategy


def test_zero3_is_refused_at_setup_with_alternatives() -> None:
    with pytest.raises(UnsupportedGradientLayoutError, match=r"ZeRO stage 3.*deepspeed_stage_2.*FSDPStrategy"):
        adapter_for(_fake_strategy(3))


def test_zero_stage_0_is_refused() -> None:
    with pytest.raises(UnsupportedGradientLayoutError, match="stage 0"):
        check_zero_stage(_fake_strategy(None))


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_and_2_get_the_deepspeed_adapter(stage: int) -> None:
    adapter = adapter_for(_fake_strategy(stage))
    assert type(adapter).__name__ == "DeepSpeedAdapter"
    assert zero_stage(SimpleNamespace(config={"zero_optimization": {"stage": stage}})) == stage


def test_real_zero3_strategy_is_refused() -> None:
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    with pytest.raises(UnsupportedGradientLayoutError, match="ZeRO stage 3"):
        adapter_for(DeepSpeedStrategy(stage=3))
