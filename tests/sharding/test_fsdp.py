"""Exact GC under FSDP1 (Lightning's FSDPStrategy): 2 CPU ranks (gloo) against a float64 reference.

One launch trains :mod:`_fsdp_case` under every configuration below (2 optimizer steps of 2 accumulated
micro-batches per rank) and records, at each optimizer step, the full gradients before and after GC as
FSDP itself gathers them, the diagnostics each rank logged, and the final parameters. The reference
trains one float64 model on the union of all ranks' batches.
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
from lightning_gc.sharding.fsdp import (
    TESTED_TORCH_VERSIONS,
    FSDPAdapter,
    check_flat_param_metadata,
    torch_version_tested,
)
from lightning_gc.sharding.guard import UnsupportedGradientLayoutError

CONFIGS: list[dict[str, Any]] = [
    {"name": "full_shard-orig-wrapped", "wrap": True},
    {"name": "full_shard-flat-wrapped", "use_orig_params": False, "wrap": True},
    # One FlatParameter for the whole model: rank 1 holds no piece of the convolutions at all.
    {"name": "full_shard-orig-root-exclude", "exclude": ["net.head.weight"]},
    {"name": "shard_grad_op-flat-root", "sharding": "SHARD_GRAD_OP", "use_orig_params": False},
    {"name": "hybrid_shard-orig-wrapped", "sharding": "HYBRID_SHARD", "mesh": [1, 2], "wrap": True},
    {"name": "no_shard-orig", "sharding": "NO_SHARD"},
    {"name": "no_shard-flat-decay", "sharding": "NO_SHARD", "use_orig_params": False, "weight_decay": 0.1},
    {"name": "tensor_mode-orig-wrapped", "mode": "tensor", "wrap": True},
    {"name": "adam_decay-orig-wrapped", "optimizer": "adam", "weight_decay": 0.1, "wrap": True},
    {"name": "mp_bf16_fp32reduce-orig-wrapped", "mixed_precision": ["bfloat16", "float32"], "wrap": True},
    {
        "name": "mp_bf16_bf16reduce-flat-decay",
        "mixed_precision": ["bfloat16", "bfloat16"],
        "use_orig_params": False,
        "wrap": True,
        "weight_decay": 0.1,
    },
    {"name": "bf16_mixed-orig-wrapped", "precision": "bf16-mixed", "wrap": True},
    {"name": "bf16_true-orig-wrapped", "precision": "bf16-true", "wrap": True},
    # Each sharding strategy once more, in low precision and with the other `use_orig_params`.
    {"name": "shard_grad_op-orig-bf16_mixed", "sharding": "SHARD_GRAD_OP", "precision": "bf16-mixed", "wrap": True},
    {
        "name": "hybrid_shard-flat-mp_bf16_fp32reduce",
        "sharding": "HYBRID_SHARD",
        "mesh": [1, 2],
        "use_orig_params": False,
        "mixed_precision": ["bfloat16", "float32"],
        "wrap": True,
    },
    {"name": "no_shard-orig-bf16_true", "sharding": "NO_SHARD", "precision": "bf16-true"},
    {"name": "functional-flat-decay", "functional": True, "use_orig_params": False, "wrap": True, "weight_decay": 0.1},
    {"name": "functional-orig-root", "functional": True},
]
LIGHTNING_CONFIGS = [c for c in CONFIGS if not c.get("functional")]


def _ids(configs: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in configs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("fsdp")
    launch(Path(__file__).parent / "_fsdp_worker.py", [str(out), json.dumps(CONFIGS)], world=case.WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(case.WORLD)]


def _reference(config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    exclude = tuple(e.removeprefix("net.") for e in config.get("exclude", ()))
    return case.reference_run(
        mode=config.get("mode", "channel"),
        exclude=exclude,
        weight_decay=config.get("weight_decay", 0.0),
        optimizer=config.get("optimizer", "sgd"),
    )


def _low_precision(config: dict[str, Any]) -> bool:
    return bool(config.get("mixed_precision")) or config.get("precision", "32-true") != "32-true"


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=_ids(CONFIGS))
def test_parameters_match_float64_reference(runs: list[dict[str, Any]], config: dict[str, Any]) -> None:
    expected, _ = _reference(config)
    atol = 8e-3 if config.get("precision") == "bf16-true" else 2e-3 if _low_precision(config) else 1e-6
    for rank_results in runs:
        got = rank_results[config["name"]]["params"]
        assert set(got) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, atol=atol, rtol=0, msg=f"{config['name']}: {name}")


@pytest.mark.slow
@pytest.mark.parametrize("config", LIGHTNING_CONFIGS, ids=_ids(LIGHTNING_CONFIGS))
def test_centralized_gradient_is_exact_gc_of_fsdp_gradient(runs: list[dict[str, Any]], config: dict[str, Any]) -> None:
    """After the hook, every full gradient equals the float64 GC of the full gradient before it.

    Full gradients are gathered by FSDP's own code, so this checks every cut row in the run's precision.
    """
    result = runs[0][config["name"]]
    owners = case.owners()
    decay = config.get("weight_decay", 0.0)
    excluded = {e.removeprefix("net.") for e in config.get("exclude", ())}
    tol = 8e-3 if config.get("precision") == "bf16-true" else 1e-6  # grads are bf16 only under bf16-true
    assert len(result["pre"]) == case.STEPS
    for pre, post, weights in zip(result["pre"], result["post"], result["weights"]):
        for name, before in pre.items():
            if before.ndim < 2 or name in excluded:
                expected = before
            else:
                w = weights[name]
                expected = (
                    case.gc_reference(name, before + decay * w, owners[name], config.get("mode", "channel")) - decay * w
                )
            scale = (before.abs() + decay * weights[name].abs()).max()  # the compensation is part of what is subtracted
            assert (post[name] - expected).abs().max() <= tol * scale, f"{config['name']}: {name}"


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=_ids(CONFIGS))
def test_diagnostics_are_global_and_identical_on_every_rank(runs: list[dict[str, Any]], config: dict[str, Any]) -> None:
    _, expected = _reference(config)
    rtol = 2e-2 if _low_precision(config) else 1e-5
    per_rank = [r[config["name"]]["metrics"] for r in runs]
    assert per_rank[0] == per_rank[1]
    assert len(per_rank[0]) == case.STEPS
    for logged, reference in zip(per_rank[0], expected):
        assert logged["gc/grad_norm"] == pytest.approx(reference["grad_norm"], rel=rtol)
        assert logged["gc/removed_norm_ratio"] == pytest.approx(reference["removed_norm_ratio"], rel=rtol)


@pytest.mark.slow
def test_shard_boundaries_cut_rows_and_only_those_travel(runs: list[dict[str, Any]]) -> None:
    """The matrix really exercises rows split across ranks, interleaved (transposed-conv) rows included."""
    wrapped = runs[0]["full_shard-orig-wrapped"]
    assert wrapped["generic"]["net.up.weight"] and wrapped["generic"]["net.gup.weight"]
    assert wrapped["cut_rows"]["net.up.weight"] == 6 and wrapped["cut_rows"]["net.gup.weight"] == 9
    assert wrapped["cut_rows"]["net.fc1.weight"] == 1 and not wrapped["generic"]["net.fc1.weight"]
    for config in LIGHTNING_CONFIGS:
        result = runs[0][config["name"]]
        assert result["cut_rows"] == runs[1][config["name"]]["cut_rows"]
        slots = sum(result["cut_rows"].values()) * (2 if config.get("weight_decay") else 1)
        sharded = config.get("sharding", "FULL_SHARD") != "NO_SHARD"
        assert result["bytes_per_step"] == ((slots + 2) * 4 if sharded else 0), config["name"]
        if sharded:
            assert slots > 0, config["name"]


def test_reference_is_sensitive_to_gc() -> None:
    """Without GC the reference moves far more than the tolerances above, so the comparisons can fail."""
    with_gc, _ = case.reference_run()
    without, _ = case.reference_run(gc=False)
    assert max((with_gc[n] - without[n]).abs().max().item() for n in with_gc) > 1e-3


# ---- single process --------------------------------------------------------------------------------------


def test_running_torch_is_a_tested_version() -> None:
    """The flat-parameter layout is verified (above) on the pinned torch; a new pin must be re-verified."""
    assert torch_version_tested(), f"torch {torch.__version__} is not in TESTED_TORCH_VERSIONS {TESTED_TORCH_VERSIONS}"
    assert not torch_version_tested("1.13.1")


def test_missing_flat_parameter_metadata_raises() -> None:
    old = SimpleNamespace(_fqns=("w",), _shapes=((2, 2),))
    with pytest.raises(UnsupportedGradientLayoutError, match=r"missing \['_strides'.*verified on torch"):
        check_flat_param_metadata(old)


def test_fsdp_with_tensor_parallel_extensions_is_refused() -> None:
    info = SimpleNamespace(
        _fields=("in_shard", "offset_in_shard", "numel_in_shard", "intra_param_start_idx", "intra_param_end_idx")
    )
    flat = SimpleNamespace(
        **{
            a: ()
            for a in (
                "_numels",
                "_numels_with_padding",
                "_is_padding_mask",
                "_param_infos",
                "_sharded_size",
                "_strides",
                "_shapes",
            )
        }
    )
    flat._fqns, flat._shard_param_infos, flat._param_extensions = ("w",), (info,), (object(),)
    with pytest.raises(UnsupportedGradientLayoutError, match="ModelParallelStrategy"):
        check_flat_param_metadata(flat)


def test_fsdp_strategy_gets_the_fsdp_adapter() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = FSDPStrategy()
    adapter = adapter_for(strategy)
    assert isinstance(adapter, FSDPAdapter)
    assert adapter.root() is None  # not set up: the adapter falls back to the module it is given


def test_functional_refuses_bare_fsdp_flattened_parameters() -> None:
    from lightning_gc import centralize_gradients

    flat = torch.nn.Parameter(torch.zeros(7))
    flat._fsdp_flattened = True  # what FSDP1 marks its 1-D shard views with
    with pytest.raises(UnsupportedGradientLayoutError, match="Pass the FSDP-wrapped module"):
        centralize_gradients([flat])
