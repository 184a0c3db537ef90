"""The update placement on 2 gloo ranks: DDP, FSDP2, tensor parallel and FSDP1 exact; DeepSpeed refused.

Every result is compared with a float64 single-process reference over the union of all ranks' batches
(tests/update/update_cases.py); the ranks stay up for the whole module (tests/sharding/dist_pool.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from models import make_batches
from reference import gc_reference
from torch import nn

sys.path.insert(0, str(Path(__file__).parent.parent / "sharding"))  # dist_pool, dtensor_scenarios
from dist_pool import LazyPool
from dtensor_scenarios import ConvNet, TPNet, conv_data, seeded, token_data
from update_cases import reference_adam_update_gc
from update_ranks import Layer, ddp_fit, dtensor_layer, fsdp1_fit, fsdp1_functional, parallel_fit

from lightning_gc import GradientCentralization
from lightning_gc.sharding.guard import UnsupportedGradientLayoutError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks():
    pool = LazyPool(2)
    yield pool
    pool.close()


# name -> (layer, values all-reduced per step: 0 when every rank holds whole units)
LAYERS = {
    "linear rows sharded: no communication": (Layer("linear", (7, 5), "S0"), 0),
    "linear columns sharded (RowwiseParallel)": (Layer("linear", (5, 7), "S1"), 5),
    "rank 1 holds no rows": (Layer("linear", (1, 5), "S0"), 0),
    "conv kernel dim sharded": (Layer("conv", (5, 3, 3), "S2"), 5),
    "transposed conv, sharded input dim is reduced": (Layer("transposed", (5, 4, 3), "S0"), 4),
    "transposed conv, output dim sharded": (Layer("transposed", (5, 4, 3), "S1"), 0),
    "grouped transposed conv, output dim sharded": (Layer("transposed", (9, 2, 3), "S1", groups=3), 0),
    "grouped transposed conv, a block split across ranks": (Layer("transposed", (9, 2, 3), "S0", groups=3), 6),
    "mode=tensor over sharded rows": (Layer("linear", (7, 5), "S0", mode="tensor"), 1),
    "replicated weight": (Layer("linear", (7, 5), "R"), 0),
    "float32, columns sharded": (Layer("linear", (5, 7), "S1", dtype="float32"), 5),
}
OUT_DIM = {"linear": 0, "conv": 0, "transposed": 1}


@pytest.mark.parametrize("name", LAYERS)
def test_dtensor_weights_are_corrected_exactly_reducing_only_unit_sums(ranks, name):
    layer, reduced = LAYERS[name]
    weight, change = layer.tensors()
    weight = weight.to(getattr(torch, layer.dtype)).double()
    change = (weight + change.to(getattr(torch, layer.dtype)).double()) - weight  # what the step really added
    expected = weight + gc_reference(change, OUT_DIM[layer.kind], layer.groups, layer.mode)
    tolerance = 1e-13 if layer.dtype == "float64" else 1e-6
    results = ranks.run(dtensor_layer, layer)
    for result in results:
        np.testing.assert_allclose(result["weight"], expected.numpy(), rtol=tolerance, atol=tolerance)
        assert sum(result["reduced"]) == reduced
    np.testing.assert_array_equal(results[0]["weight"], results[1]["weight"])


def test_ddp_is_exact_and_identical_on_every_rank(ranks):
    steps, lr, decay = 3, 0.01, 0.05
    results = ranks.run(ddp_fit, steps, lr, decay)
    torch.manual_seed(0)
    from models import TinyModule

    initial = {k: v.detach().clone() for k, v in TinyModule("adam").net.state_dict().items()}
    batches = make_batches(2 * steps)
    per_step = [[batches[2 * k], batches[2 * k + 1]] for k in range(steps)]  # rank 0's and rank 1's
    expected = reference_adam_update_gc(initial, per_step, lr=lr, weight_decay=decay)
    for name, value in results[0].items():
        np.testing.assert_array_equal(value, results[1][name])
        assert np.linalg.norm(value - expected[name].numpy()) <= 1e-12 * np.linalg.norm(expected[name].numpy()), name


def _collate(samples):
    return torch.stack([x for x, _ in samples]), torch.stack([y for _, y in samples])


@pytest.mark.parametrize("layout", ["fsdp2", "tp"])
def test_fsdp2_and_tensor_parallel_match_the_reference_on_every_rank(ranks, layout):
    steps, lr, decay = 3, 0.01, 0.05
    results = ranks.run(parallel_fit, layout, steps, lr, decay, {})
    net = seeded(ConvNet if layout == "fsdp2" else TPNet)
    initial = {k: v.detach().clone() for k, v in net.state_dict().items()}
    layouts = {n: lay for n, lay in net.LAYOUTS.items() if n != "emb.weight"}  # embeddings excluded by default
    if layout == "fsdp2":
        data = conv_data(6 * steps)
        own = [data[0::2], data[1::2]]
        per_step = [[_collate(own[r][3 * k : 3 * k + 3]) for r in (0, 1)] for k in range(steps)]
    else:
        data = token_data(3 * steps)
        per_step = [[_collate(data[3 * k : 3 * k + 3])] for k in range(steps)]
    expected = reference_adam_update_gc(initial, per_step, lr, decay, layouts=layouts, model=net)
    for result in results:
        assert result["steps"] == steps
        for name, value in result["weights"].items():
            want = expected[name].numpy()
            assert np.linalg.norm(value - want) <= 2e-6 * np.linalg.norm(want), (layout, name)
    for name, value in results[0]["weights"].items():
        np.testing.assert_array_equal(value, results[1]["weights"][name])
    # the test can fail: without GC of the update the weights differ by far more than the tolerance
    plain = reference_adam_update_gc(initial, per_step, lr, decay, layouts={}, model=net)
    name = "head.weight" if layout == "fsdp2" else "fc2.weight"
    assert np.linalg.norm(plain[name].numpy() - expected[name].numpy()) > 1e-3 * np.linalg.norm(expected[name].numpy())


def _tiny_reference(steps: int, lr: float, decay: float) -> dict[str, torch.Tensor]:
    from models import TinyModule

    torch.manual_seed(0)
    initial = {k: v.detach().clone() for k, v in TinyModule("adam").net.state_dict().items()}
    batches = make_batches(2 * steps)
    per_step = [[batches[2 * k], batches[2 * k + 1]] for k in range(steps)]  # rank 0's and rank 1's
    return reference_adam_update_gc(initial, per_step, lr=lr, weight_decay=decay)


FSDP1_CONFIGS = {
    "orig params, head wrapped apart": {"use_orig_params": True, "wrap": True},
    "flat params, one flat parameter": {"use_orig_params": False},
    "no_shard": {"sharding": "NO_SHARD"},
}


@pytest.mark.parametrize("name", FSDP1_CONFIGS)
def test_fsdp1_matches_the_reference_on_every_rank(ranks, name):
    steps, lr, decay = 3, 0.01, 0.05
    results = ranks.run(fsdp1_fit, FSDP1_CONFIGS[name], steps, lr, decay)
    expected = _tiny_reference(steps, lr, decay)
    if name != "no_shard":
        assert results[0]["cut_rows"] > 0  # shard boundaries cut some rows: their change of sum is all-reduced
    for result in results:
        for key, value in result["weights"].items():
            want = expected[key].numpy()
            assert np.linalg.norm(value - want) <= 2e-6 * np.linalg.norm(want), (name, key)
    for key, value in results[0]["weights"].items():
        np.testing.assert_array_equal(value, results[1]["weights"][key])


def test_fsdp1_functional_api_matches_the_reference(ranks):
    steps, lr = 3, 0.01
    results = ranks.run(fsdp1_functional, steps, lr)
    expected = _tiny_reference(steps, lr, 0.0)
    for result in results:
        for key, value in result.items():
            want = expected[key].numpy()
            assert np.linalg.norm(value - want) <= 2e-6 * np.linalg.norm(want), key
    from models import TinyModule

    torch.manual_seed(0)
    initial = {k: v.detach().clone() for k, v in TinyModule("adam").net.state_dict().items()}
    batches = make_batches(2 * steps)
    per_step = [[batches[2 * k], batches[2 * k + 1]] for k in range(steps)]
    plain = reference_adam_update_gc(initial, per_step, lr=lr, layouts={})  # the check above can fail
    assert np.linalg.norm(plain["head.weight"].numpy() - expected["head.weight"].numpy()) > 1e-4


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_is_refused_at_setup_naming_the_alternative(stage):
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    trainer = SimpleNamespace(strategy=DeepSpeedStrategy(stage=stage))
    with pytest.raises(UnsupportedGradientLayoutError, match="does not support DeepSpeed") as error:
        GradientCentralization(apply_to="update").setup(trainer, nn.Linear(2, 2), "fit")  # type: ignore[arg-type]
    assert "ModelParallelStrategy (FSDP2) or DDP" in str(error.value)
