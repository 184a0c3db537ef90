"""One validator for every entry point: GCConfig, used by the callback, centralize_gradients and describe alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gc import GradientCentralization, centralize_gradients, describe
from lightning_gc.config import GCConfig
from lightning_gc.selection import select


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    for p in model.parameters():
        p.grad = torch.randn_like(p) + 1.0
    return model


def _outcome(call):  # type: ignore[no-untyped-def]
    """``("ok", None)`` or ``("ValueError", message)``: what an entry point made of the options."""
    try:
        call()
    except ValueError as error:
        return "ValueError", str(error)
    return "ok", None


ENTRY_POINTS = {
    "callback": lambda options: GradientCentralization(**options),
    "functional": lambda options: centralize_gradients(_model(), **options),
    "describe": lambda options: describe(_model(), **options),
    "config": lambda options: GCConfig(**options),
}

OPTIONS = [
    {"exclude": None},
    {"exclude": "0.*"},
    {"exclude": ["0.*", 3]},
    {"exclude": 5},
    {"exclude_modules": "Linear"},
    {"exclude_modules": nn.Linear},
    {"exclude_modules": ["Linear", ""]},
    {"exclude_modules": None},
    {"mode": "rows"},
    {"conv_only": "yes"},
    {"centralize_weight_decay": 1},
    {"compile": "no-such-backend"},
    {"apply_to": "weights"},
    {"apply_to": "update", "centralize_weight_decay": True},
]


@pytest.mark.parametrize("options", OPTIONS, ids=[str(o) for o in OPTIONS])
def test_every_entry_point_accepts_or_refuses_options_the_same_way(options):
    points = {n: m for n, m in ENTRY_POINTS.items() if n != "functional" or "apply_to" not in options}
    outcomes = {name: _outcome(lambda make=make: make(options)) for name, make in points.items()}
    assert len({outcome for outcome, _ in outcomes.values()}) == 1, outcomes
    outcome, message = outcomes["config"]
    if outcome == "ValueError":
        argument = next(iter(options)) if len(options) == 1 else "centralize_weight_decay"
        assert f"`{argument}`" in message


def test_exclude_as_one_string_is_one_pattern_everywhere():
    model = _model()
    assert [t.name for t in select(model, GCConfig(exclude="0.*")).targets] == ["1.weight"]
    before = model[0].weight.grad.clone()
    centralize_gradients(model, exclude="0.*")  # once split into characters, "*" matched everything
    assert torch.equal(model[0].weight.grad, before)
    assert model[1].weight.grad.sum(dim=1).abs().max() < 1e-5


def test_functional_refuses_an_optimizer_that_is_not_one():
    with pytest.raises(ValueError, match="`optimizer`"):
        centralize_gradients(_model(), optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`optimizer`"):
        describe(_model(), optimizer="sgd")  # type: ignore[arg-type]


def test_functional_validates_compute_stats():
    with pytest.raises(ValueError, match="`compute_stats`"):
        centralize_gradients(_model(), compute_stats="yes")  # type: ignore[arg-type]


def test_describe_refuses_unknown_options_naming_them():
    with pytest.raises(ValueError, match="conv_onyl"):
        describe(_model(), conv_onyl=True)


def test_unmatched_exclude_modules_warn_like_unmatched_patterns():
    from models import TinyModule, loader, make_batches, trainer

    with pytest.warns(UserWarning, match=r"`exclude_modules` entries matched no module: \['NoSuchModule'\]"):
        centralize_gradients(_model(), exclude_modules=["NoSuchModule"])
    with pytest.warns(UserWarning, match=r"`exclude_modules` entries matched no module: \['NoSuchModule'\]"):
        callback = GradientCentralization(exclude_modules=["NoSuchModule"])
        trainer(callbacks=[callback]).fit(TinyModule(), loader(make_batches(1)))


def test_the_default_embedding_exclusion_never_warns(recwarn):
    centralize_gradients(_model())
    assert not [w for w in recwarn if "exclude_modules" in str(w.message)]


def test_plan_key_includes_compile_but_the_state_key_does_not():
    assert GCConfig().key() == GCConfig(compile="eager").key()
    assert GCConfig().plan_key() != GCConfig(compile="eager").plan_key()
    assert GCConfig().key() != GCConfig(apply_to="update").key()
