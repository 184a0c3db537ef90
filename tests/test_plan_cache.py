"""The one plan cache (lightning_gc.plan_cache), shared by the callback and centralize_gradients."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from lightning_gc import centralize_gradients
from lightning_gc.config import GCConfig
from lightning_gc.plan_cache import PlanCache
from lightning_gc.sharding.dense import DenseAdapter

COMPILES: list[int] = []


@pytest.fixture
def counting_backend() -> str:
    """A torch.compile backend that counts compilations and runs the graph as traced."""
    from torch._dynamo import list_backends, register_backend

    name = "lightning_gc_test_counting_plan_cache"
    if name not in list_backends(exclude_tags=()):

        @register_backend(name=name)
        def _count(gm, example_inputs):  # type: ignore[no-untyped-def]
            COMPILES.append(1)
            return gm.forward

    COMPILES.clear()
    return name


def _grads(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        for d in range(grad.ndim):  # a different non-zero mean along every axis
            shape = [1] * grad.ndim
            shape[d] = -1
            grad = grad + torch.randn(grad.shape[d], generator=gen, dtype=torch.float64).view(shape)
        p.grad = grad.to(p.dtype)
        out[name] = grad
    return out


def test_compile_after_an_uncompiled_call_uses_the_compiled_route(counting_backend):
    """The cache key used to leave `compile` out: the uncompiled plan was reused and nothing compiled."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    _grads(model, seed=0)
    centralize_gradients(model)
    grads = _grads(model, seed=1)
    centralize_gradients(model, compile=counting_backend)
    assert len(COMPILES) == 1
    for name, p in model.named_parameters():
        if p.ndim == 2:
            expected = grads[name] - grads[name].mean(dim=1, keepdim=True)
            torch.testing.assert_close(p.grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_plans_are_reused_until_the_parameters_change():
    cache, model = PlanCache(), nn.Linear(4, 3)
    first = cache.plan(DenseAdapter(), GCConfig(), model)
    assert cache.plan(DenseAdapter(), GCConfig(), model) is first
    assert cache.builds == 1
    model.weight = nn.Parameter(torch.zeros(3, 4))
    assert cache.plan(DenseAdapter(), GCConfig(), model) is not first
    assert cache.builds == 2


@pytest.mark.parametrize("options", [{"mode": "tensor"}, {"compile": "eager"}, {"exclude": "weight"}])
def test_every_option_that_changes_the_plan_is_in_the_key(options):
    cache, model = PlanCache(), nn.Linear(4, 3)
    first = cache.plan(DenseAdapter(), GCConfig(), model)
    assert cache.plan(DenseAdapter(), GCConfig(**options), model) is not first


def test_optimizer_plans_are_keyed_on_the_module_and_the_param_groups():
    cache = PlanCache()
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = cache.plan(DenseAdapter(), GCConfig(), model, optimizer)
    assert cache.plan(DenseAdapter(), GCConfig(), model, optimizer) is first
    assert cache.plan(DenseAdapter(), GCConfig(), model[0], optimizer) is not first  # another module
    optimizer.param_groups[0]["weight_decay"] = 0.1
    assert cache.plan(DenseAdapter(), GCConfig(), model, optimizer) is not first


def test_the_remembered_plan_answers_only_the_same_call():
    """The last plan is matched by identity first: another adapter or a restriction to some parameters is not it."""

    class OtherAdapter(DenseAdapter):
        pass

    cache = PlanCache()
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = GCConfig()
    first = cache.plan(DenseAdapter(), config, model, optimizer)
    assert cache.plan(DenseAdapter(), config, model, optimizer) is first
    assert cache.plan(OtherAdapter(), config, model, optimizer) is not first
    restricted = cache.plan(DenseAdapter(), config, [model[0].weight], optimizer)
    assert [t.param for t in restricted.targets] == [model[0].weight]  # type: ignore[attr-defined]
    assert cache.plan(DenseAdapter(), GCConfig(), model, optimizer) is first  # an equal config: the same plan
    assert cache.builds == 3


def _in_place_changes() -> dict[str, object]:
    """Changes to an optimizer's parameters that keep the optimizer, its param_groups list and each group."""

    def extra_layer(model: nn.Sequential, optimizer: torch.optim.Optimizer) -> None:
        optimizer.add_param_group({"params": list(nn.Linear(2, 2).parameters())})

    return {
        "requires_grad_": lambda model, optimizer: model[1].weight.requires_grad_(False),
        "data_swap": lambda model, optimizer: setattr(model[1].weight, "data", model[1].weight.data.double()),
        "params_list_mutated": lambda model, optimizer: optimizer.param_groups[0]["params"].pop(),
        "params_list_replaced_item": lambda model, optimizer: optimizer.param_groups[0]["params"].__setitem__(
            0, nn.Parameter(torch.zeros(3, 4))
        ),
        "add_param_group": extra_layer,
        "maximize": lambda model, optimizer: optimizer.param_groups[0].__setitem__("maximize", True),
    }


@pytest.mark.parametrize("change", list(_in_place_changes()))
def test_in_place_changes_to_the_optimizer_replan(change):
    """No new object to notice: the signature reads every parameter's id, requires_grad and dtype each call."""
    cache = PlanCache()
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    groups, group = optimizer.param_groups, optimizer.param_groups[0]
    first = cache.plan(DenseAdapter(), GCConfig(), model, optimizer)
    _in_place_changes()[change](model, optimizer)  # type: ignore[operator]
    assert optimizer.param_groups is groups and optimizer.param_groups[0] is group
    assert cache.plan(DenseAdapter(), GCConfig(), model, optimizer) is not first


def test_bare_parameters_have_no_owner_and_are_planned_every_call():
    cache, model = PlanCache(), nn.Linear(4, 3)
    first = cache.plan(DenseAdapter(), GCConfig(), list(model.parameters()))
    assert cache.plan(DenseAdapter(), GCConfig(), list(model.parameters())) is not first
    assert len(cache) == 0


def test_the_cache_does_not_keep_models_alive():
    cache, model = PlanCache(), nn.Linear(4, 3)
    cache.plan(DenseAdapter(), GCConfig(), model)
    alive = weakref.ref(model)
    assert len(cache) == 1
    del model
    gc.collect()
    assert alive() is None
    assert len(cache) == 0


def test_the_callback_plans_through_the_cache_and_picks_the_adapter_from_the_strategy():
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from lightning_gc import GradientCentralization

    class TrainerStub:
        strategy = SingleDeviceStrategy(device=torch.device("cpu"))

    callback, model = GradientCentralization(), nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert callback.plans == []
    first = callback._plan_for(optimizer, model, TrainerStub())  # what on_before_optimizer_step calls
    assert callback._plan_for(optimizer, model, TrainerStub()) is first
    assert callback.plans == [first]


def test_a_cache_pickles_empty_for_spawned_processes():
    import pickle

    cache, model = PlanCache(), nn.Linear(4, 3)
    cache.plan(DenseAdapter(), GCConfig(), model)
    copy = pickle.loads(pickle.dumps(cache))
    assert len(copy) == 0 and copy.plans() == []


@pytest.mark.parametrize("optimizer", [False, True])
def test_a_dtype_change_replans_so_means_use_the_new_precision(optimizer, eager_route):
    model = nn.Linear(6, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if optimizer else None
    _grads(model, seed=0)
    centralize_gradients(model, optimizer=opt)
    model.double()  # the same Parameter objects, now float64
    grads = _grads(model, seed=1)
    centralize_gradients(model, optimizer=opt)
    expected = grads["weight"] - grads["weight"].mean(dim=1, keepdim=True)
    torch.testing.assert_close(model.weight.grad, expected, rtol=1e-12, atol=1e-12)


def test_a_plan_made_before_a_lazy_layer_has_its_shape_is_not_reused():
    cache, model = PlanCache(), nn.Sequential(nn.LazyLinear(3))
    before = cache.plan(DenseAdapter(), GCConfig(), model)
    assert before.targets == []  # type: ignore[attr-defined]
    model(torch.randn(2, 5))  # materializes the weight in place: same Parameter object, same id
    after = cache.plan(DenseAdapter(), GCConfig(), model)
    assert [t.name for t in after.targets] == ["0.weight"]  # type: ignore[attr-defined]
    assert cache.plan(DenseAdapter(), GCConfig(), model) is after


def test_the_binding_reads_the_signature_as_plan_signature_compares_it():
    """``same_signature`` (C) must say "same" exactly when a fresh ``plan_signature`` equals the old one."""
    from lightning_gc.native import kernel
    from lightning_gc.plan_cache import plan_signature

    fused = kernel()
    if fused is None or fused.same_signature is None:
        pytest.skip("the kernel's binding is not built here")

    def changes(model: nn.Sequential, optimizer: torch.optim.Optimizer):
        yield "nothing", lambda: None
        yield "requires_grad_", lambda: model[0].weight.requires_grad_(False)
        yield ".data to float64", lambda: setattr(model[1].weight, "data", model[1].weight.data.double())
        yield (
            "params replaced in place",
            lambda: optimizer.param_groups[0]["params"].__setitem__(0, nn.Parameter(torch.ones(3))),
        )
        yield "params appended", lambda: optimizer.param_groups[0]["params"].append(nn.Parameter(torch.ones(2)))
        yield "params reordered", lambda: optimizer.param_groups[0]["params"].reverse()
        yield "weight_decay", lambda: optimizer.param_groups[0].__setitem__("weight_decay", 0.5)
        yield "maximize", lambda: optimizer.param_groups[0].__setitem__("maximize", True)
        yield (
            "decoupled_weight_decay added",
            lambda: optimizer.param_groups[0].__setitem__("decoupled_weight_decay", False),
        )
        yield "group added", lambda: optimizer.add_param_group({"params": [nn.Parameter(torch.ones(4))]})
        yield "lr (not in the signature)", lambda: optimizer.param_groups[0].__setitem__("lr", 3.0)

    for index in range(11):
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.0)
        name, change = list(changes(model, optimizer))[index]
        before = plan_signature(optimizer)
        change()
        expected = plan_signature(optimizer) == before
        assert fused.same_signature(optimizer.param_groups, before) is expected, name
        assert expected is (name in ("nothing", "lr (not in the signature)")), name


def test_the_functional_path_decides_the_adapter_again_only_when_the_parameters_change(monkeypatch):
    """A repeated call skips the adapter decision (a walk of the module tree); any parameter change redoes it."""
    import lightning_gc.functional as functional

    decided: list[object] = []
    decide = functional.adapter_for_model
    monkeypatch.setattr(functional, "adapter_for_model", lambda target: decided.append(target) or decide(target))
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = _grads(model, seed=0)
    for _ in range(3):
        centralize_gradients(model, optimizer=optimizer)
    assert len(decided) == 1
    expected = grads["0.weight"] - grads["0.weight"].mean(dim=1, keepdim=True)
    torch.testing.assert_close(model[0].weight.grad.double(), expected, rtol=1e-5, atol=1e-6)
    model[1].weight.requires_grad_(False)
    centralize_gradients(model, optimizer=optimizer)
    assert len(decided) == 2
    centralize_gradients(model)  # no optimizer: the module's signature, read through the cache's table
    assert len(decided) == 3
