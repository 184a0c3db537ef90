"""How adapters are picked: from the strategy (callback) or from the model (functional API)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gc import UnsupportedGradientLayoutError
from lightning_gc.config import GCConfig
from lightning_gc.sharding import adapter_for_model, warn_if_compile_unused
from lightning_gc.sharding.deepspeed import DeepSpeedAdapter
from lightning_gc.sharding.dense import DenseAdapter
from lightning_gc.sharding.fsdp import FSDPAdapter


def _named(name: str) -> type[nn.Module]:
    return type(name, (nn.Module,), {})


def test_a_plain_model_is_dense():
    assert isinstance(adapter_for_model(nn.Linear(2, 2)), DenseAdapter)
    assert isinstance(adapter_for_model(list(nn.Linear(2, 2).parameters())), DenseAdapter)


def test_a_model_holding_fsdp1_modules_gets_the_flat_shard_adapter():
    model = nn.Sequential(_named("FullyShardedDataParallel")())
    assert isinstance(adapter_for_model(model), FSDPAdapter)


def test_a_model_holding_a_deepspeed_engine_gets_the_zero_adapter_bound_to_it():
    engine = _named("DeepSpeedEngine")()
    adapter = adapter_for_model(nn.Sequential(engine))
    assert isinstance(adapter, DeepSpeedAdapter) and adapter.engine() is engine


def test_bare_fsdp_flattened_parameters_are_refused():
    flat = nn.Parameter(torch.zeros(6))
    flat._fsdp_flattened = True  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedGradientLayoutError, match="FSDP-wrapped module"):
        adapter_for_model([flat])


def test_compile_is_said_to_do_nothing_under_sharded_adapters_only():
    messages: list[str] = []
    warn_if_compile_unused(GCConfig(compile="eager"), DenseAdapter(), messages.append)
    assert messages == []
    warn_if_compile_unused(GCConfig(compile="eager"), FSDPAdapter(strategy_name="FSDPStrategy"), messages.append)
    assert len(messages) == 1 and "no effect under FSDPStrategy" in messages[0]
