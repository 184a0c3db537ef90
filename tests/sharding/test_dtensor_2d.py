"""Exact GC of DTensor gradients on a 2 x 2 mesh (data x tensor parallel), 4 gloo ranks.

A separate module so its 4 ranks are up only while these tests run. Ranks are numbered row-major over the
mesh: rank = 2 * data_rank + tensor_rank.
"""

from __future__ import annotations

import pytest
from dist_pool import LazyPool
from dtensor_reference import assert_case_result, assert_fit_matches, assert_hook_centralized, reference_fit
from dtensor_scenarios import Case, Run, adapter_case, fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks():
    pool = LazyPool(4)
    yield pool
    pool.close()


# (case, row values all-reduced by each rank; a tuple gives them rank by rank)
CASES = {
    "FSDP2 over RowwiseParallel: rows on data, columns on tensor": (Case((7, 5), ("S0", "S1"), (2, 2)), (4, 4, 3, 3)),
    "FSDP2 over ColwiseParallel: strided rows, fast path": (Case((11, 6), ("SS0", "S0"), (2, 2)), 0),
    "columns split twice": (Case((5, 9), ("S1", "S1"), (2, 2)), 10),
    "replicated over data, columns on tensor": (Case((5, 7), ("R", "S1"), (2, 2)), 5),
    "partial over data, columns on tensor": (Case((5, 7), ("P", "S1"), (2, 2)), 5),
    "partial over data, reduced into the weight's row shards": (
        Case((5, 7), ("P", "S1"), (2, 2), param=("S0", "S1")),
        (3, 3, 2, 2),
    ),
    "grouped transposed conv, dim 0 split twice": (Case((9, 2, 3), ("S0", "S0"), (2, 2), out_dim=1, groups=3), 12),
    "transposed conv, output on data, input on tensor": (Case((5, 4, 3), ("S1", "S0"), (2, 2), out_dim=1), 2),
    "mode=tensor over both mesh dims": (Case((7, 5), ("S0", "S1"), (2, 2), mode="tensor"), 2),
    "weight decay, rows on data, columns on tensor": (Case((6, 5), ("S0", "S1"), (2, 2), decay=0.1), 6),
}


@pytest.mark.parametrize("name", CASES)
def test_adapter_on_a_2x2_mesh_centralizes_exactly_and_reduces_only_row_sums(ranks, name):
    case, row_elements = CASES[name]
    assert_case_result(case, ranks.run(adapter_case, case), row_elements)


def test_grouped_transposed_conv_with_strided_input_shards_is_refused(ranks):
    results = ranks.run(adapter_case, Case((8, 2, 3), ("SS0", "S0"), (2, 2), out_dim=1, groups=2))
    for result in results:
        assert "grouped transposed convolution" in result["error"] and "_StridedShard" in result["error"]


def test_fsdp2_over_tensor_parallel_training_matches_float64_reference(ranks):
    run = Run("2d", accumulate=2, weight_decay=0.05, gc_kwargs={"centralize_weight_decay": True})
    results = ranks.run(fit, run)
    placements = results[0]["grad_placements"]
    assert placements["fc2.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert placements["fc1.weight"].startswith("(_StridedShard(dim=0")
    assert_hook_centralized(run, results, rtol=1e-5, atol=1e-6)
    assert_fit_matches(run, results, reference_fit(run), rtol=1e-4, atol=1e-5)
