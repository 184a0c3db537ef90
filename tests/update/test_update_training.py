"""The update placement in training: Trainer, plain loops, Fabric, AMP, accumulation, manual optimization, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from models import LAYOUTS, TinyConvNet, TinyModule, loader, make_batches, net_state, trainer
from torch import nn
from update_cases import reference_adam_update_gc, relative_error, unit_means

from lightning_gc import GradientCentralization, centralize_updates
from lightning_gc.update import UpdateHandle

CENTRALIZED = {f"net.{name}": layout for name, layout in LAYOUTS.items()}


def test_adam_with_coupled_decay_equals_the_authors_gc_loc_false_adam_in_64_true():
    batches = make_batches(6)
    module = TinyModule("adam", lr=0.01, weight_decay=0.05)
    initial = net_state(module)
    gc = GradientCentralization(apply_to="update")
    trainer(callbacks=[gc], precision="64-true").fit(module, loader(batches))
    expected = reference_adam_update_gc(initial, [[b] for b in batches], lr=0.01, weight_decay=0.05)
    for name, value in net_state(module).items():
        assert relative_error(value, expected[name]) < 1e-12, name
    assert gc.optimizer_steps == 6
    # the test can fail: GC of the gradient (or none) is a different trajectory under Adam
    without = reference_adam_update_gc(initial, [[b] for b in batches], lr=0.01, weight_decay=0.05, layouts={})
    assert relative_error(expected["conv.weight"], without["conv.weight"]) > 1e-4


OPTIMIZERS = {
    "sgd momentum nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05, weight_decay=1e-3),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2, decoupled_weight_decay=True, weight_decay=0.1),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=1e-3),
    "adamw foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
}


def _drift_bound(weight: torch.Tensor, steps: int, unit_roundoff: float) -> float:
    """Worst case of what rounding alone can move a unit mean: each step rounds every entry once (at most
    ``u * |w|`` each), and the next step starts from the rounded weights, so errors add up over steps."""
    return steps * unit_roundoff * float(weight.detach().abs().max())


def _train_plain(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, dtype=torch.float32) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 1, 7, 7, generator=generator).to(dtype) + 0.5
        y = torch.randint(0, 3, (8,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        optimizer.step()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_unit_means_stay_fixed_over_200_steps_for_every_optimizer(name):
    model = TinyConvNet()
    optimizer = OPTIMIZERS[name](model.parameters())
    means = {n: unit_means(p, *LAYOUTS[n]) for n, p in model.named_parameters() if n in LAYOUTS}
    handle = centralize_updates(model, optimizer)
    start = copy.deepcopy(model.state_dict())
    _train_plain(model, optimizer, 200)
    assert handle.steps == 200
    for n, p in model.named_parameters():
        if n in LAYOUTS:
            drift = float((unit_means(p, *LAYOUTS[n]) - means[n]).abs().max())
            assert drift <= _drift_bound(p, 200, 2.0**-24), (n, drift)
            assert not torch.equal(p.detach(), start[n])  # it trained
    handle.remove()
    _train_plain(model, optimizer, 5)  # without the hooks the means move again: the check above could fail
    moved = max(
        float((unit_means(p, *LAYOUTS[n]) - means[n]).abs().max()) for n, p in model.named_parameters() if n in LAYOUTS
    )
    assert moved > 100 * _drift_bound(model.head.weight, 200, 2.0**-24)


def test_gradient_gc_does_not_keep_means_under_adam_but_update_gc_does_in_a_trainer():
    drifts = {}
    for placement in ("gradient", "update"):
        module = TinyModule("adamw", lr=1e-2, weight_decay=0.1)
        means = {n: unit_means(p, *CENTRALIZED[n]) for n, p in module.named_parameters() if n in CENTRALIZED}
        trainer(callbacks=[GradientCentralization(apply_to=placement)], max_steps=40, max_epochs=-1).fit(
            module, loader(make_batches(40))
        )
        drifts[placement] = max(
            float((unit_means(p, *CENTRALIZED[n]) - means[n]).abs().max())
            for n, p in module.named_parameters()
            if n in CENTRALIZED
        )
    assert drifts["update"] <= _drift_bound(module.net.head.weight, 40, 2.0**-24)
    assert drifts["gradient"] > 1e3 * drifts["update"]


def test_bf16_true_keeps_unit_means_to_bfloat16_rounding():
    """bf16-true: the weights are bfloat16, unit sums float32, and the correction rounds once into bfloat16.

    What is left is that rounding: each step rounds every entry to nearest (an error uniform within one ulp,
    standard deviation ulp / sqrt(12)), a unit mean averages ``n`` of them, and the next step starts from the
    rounded weights, so the mean random-walks: after ``s`` steps its standard deviation is
    ``sqrt(s) * ulp / sqrt(12 n)``. Tolerance: 6 of those (ulp of the largest entry). Measured (200 steps,
    Adam lr 1e-2): drift 0.010 / 0.0029 / 0.0015 (conv / transposed conv / head) against tolerances
    0.016 / 0.011 / 0.012; GC of the gradient drifts 0.017 / 0.021 / 0.015 and no GC 0.060 / 0.084 / 0.028,
    so this test fails for both.
    """
    module = TinyModule("adam", lr=1e-2)
    batches = make_batches(200, seed=4)
    gc = GradientCentralization(apply_to="update")
    t = trainer(callbacks=[gc], precision="bf16-true")
    initial = {n: p.detach().bfloat16() for n, p in module.named_parameters()}  # bf16-true rounds them first
    t.fit(module, loader(batches))
    assert module.net.head.weight.dtype == torch.bfloat16
    assert gc.optimizer_steps == 200
    final = dict(module.named_parameters())
    for name, (out_dim, groups) in CENTRALIZED.items():
        weight = final[name]
        per_unit = weight.numel() // (weight.shape[out_dim] * groups)
        ulp = 2.0 ** (math.floor(math.log2(float(weight.detach().abs().max()))) - 7)
        tolerance = 6 * math.sqrt(200) * ulp / math.sqrt(12 * per_unit)
        drift = float((unit_means(weight, out_dim, groups) - unit_means(initial[name], out_dim, groups)).abs().max())
        assert drift <= tolerance, (name, drift, tolerance)


def test_functional_api_under_fabric_matches_the_reference():
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, precision="64-true")
    net = TinyConvNet()
    initial = {k: v.detach().clone() for k, v in net.state_dict().items()}
    with fabric.init_module():
        model = TinyConvNet()
    model.load_state_dict(initial)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.05)
    model, optimizer = fabric.setup(model, optimizer)
    handle = centralize_updates(model, optimizer)
    batches = make_batches(4)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # Fabric casts module outputs to the default dtype
    try:
        for x, y in batches:
            optimizer.zero_grad()
            fabric.backward(nn.functional.cross_entropy(model(x.double()), y))
            optimizer.step()
    finally:
        torch.set_default_dtype(default)
    assert handle.steps == 4
    expected = reference_adam_update_gc(initial, [[b] for b in batches], lr=0.01, weight_decay=0.05)
    for name, value in model.module.state_dict().items():
        assert relative_error(value, expected[name]) < 1e-12, name
    handle.remove()


def test_remove_restores_plain_optimizer_steps():
    model = TinyConvNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    handle = centralize_updates(model, optimizer)
    _train_plain(model, optimizer, 2)
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.active
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.Adam(twin.parameters(), lr=0.01)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # else the moments would be shared
    _train_plain(model, optimizer, 3)
    _train_plain(twin, twin_optimizer, 3)
    for (n, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), n
    assert handle.steps == 2
    centralize_updates(model, optimizer).remove()  # hooking again after remove() is allowed


def test_hooking_an_optimizer_twice_is_refused():
    model = TinyConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with centralize_updates(model, optimizer):
        with pytest.raises(ValueError, match="already centralized"):
            centralize_updates(model, optimizer)


class PoisonedAdam(TinyModule):
    """Adam; one batch's loss overflows in fp16, as a real overflow would."""

    def __init__(self, poisoned_batch: int) -> None:
        super().__init__("adam", lr=0.01)
        self.poisoned_batch = poisoned_batch
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1e30 if batch_idx == self.poisoned_batch else loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.snapshots.append({n: p.detach().clone() for n, p in self.named_parameters()})


def test_fp16_amp_overflow_step_changes_nothing():
    module = PoisonedAdam(poisoned_batch=1)
    gc = GradientCentralization(apply_to="update")
    t = trainer(callbacks=[gc], plugins=[MixedPrecision("16-mixed", "cpu")])
    t.fit(module, loader(make_batches(4)))
    assert isinstance(t.precision_plugin.scaler, torch.amp.GradScaler)
    first, overflow, after_overflow = module.snapshots[0], module.snapshots[1], module.snapshots[2]
    for name in first:
        assert torch.equal(overflow[name], after_overflow[name]), name  # the skipped step changed nothing
    assert not torch.equal(first["net.head.weight"], overflow["net.head.weight"])  # a normal step did
    assert gc.optimizer_steps == 3  # the hooks ran for the three real steps only
    final = dict(module.named_parameters())
    for name, layout in CENTRALIZED.items():
        drift = (unit_means(final[name], *layout) - unit_means(first[name], *layout)).abs().max()
        assert float(drift) <= _drift_bound(final[name], 3, 2.0**-24), name


def test_gradient_accumulation_centralizes_the_accumulated_step():
    batches = make_batches(6)
    module = TinyModule("adam", lr=0.01, weight_decay=0.05)
    initial = net_state(module)
    trainer(callbacks=[GradientCentralization(apply_to="update")], precision="64-true", accumulate_grad_batches=2).fit(
        module, loader(batches)
    )
    steps = [batches[i : i + 2] for i in range(0, 6, 2)]
    expected = reference_adam_update_gc(initial, steps, lr=0.01, weight_decay=0.05)
    for name, value in net_state(module).items():
        assert relative_error(value, expected[name]) < 1e-12, name


class TwoOptimizers(TinyModule):
    """Manual optimization: Adam on the convolutions, SGD with momentum on the head."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        convs, head = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        convs.zero_grad()
        head.zero_grad()
        self.manual_backward(loss)
        convs.step()
        head.step()

    def configure_optimizers(self):
        convs = [p for n, p in self.named_parameters() if not n.startswith("net.head")]
        return torch.optim.Adam(convs, lr=0.01), torch.optim.SGD(self.net.head.parameters(), lr=0.1, momentum=0.9)


def test_two_optimizers_with_manual_optimization():
    module = TwoOptimizers()
    means = {n: unit_means(p, *CENTRALIZED[n]) for n, p in module.named_parameters() if n in CENTRALIZED}
    start = net_state(module)
    gc = GradientCentralization(apply_to="update")
    trainer(callbacks=[gc], precision="64-true").fit(module, loader(make_batches(5)))
    assert gc.optimizer_steps == 10  # both optimizers, every batch
    for name, p in module.named_parameters():
        if name in CENTRALIZED:
            assert float((unit_means(p, *CENTRALIZED[name]) - means[name]).abs().max()) < 1e-14, name
            assert not torch.equal(p.detach().double(), start[name.removeprefix("net.")])


def test_lbfgs_centralizes_the_change_over_all_inner_iterations():
    module = TinyModule("lbfgs", lr=0.5, max_iter=4)
    means = {n: unit_means(p, *CENTRALIZED[n]) for n, p in module.named_parameters() if n in CENTRALIZED}
    gc = GradientCentralization(apply_to="update")
    trainer(callbacks=[gc], precision="64-true").fit(module, loader(make_batches(3)))
    assert gc.optimizer_steps == 3
    for name, p in module.named_parameters():
        if name in CENTRALIZED:
            assert float((unit_means(p, *CENTRALIZED[name]) - means[name]).abs().max()) < 1e-14, name


def test_resuming_from_a_checkpoint_is_identical_to_an_uninterrupted_run(tmp_path):
    batches = make_batches(3)

    def fit(module, epochs, ckpt_path=None):
        saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
        t = trainer(
            callbacks=[GradientCentralization(apply_to="update"), saver], max_epochs=epochs, enable_checkpointing=True
        )
        t.fit(module, loader(batches), ckpt_path=ckpt_path)

    torch.manual_seed(7)
    whole = TinyModule("adam", lr=0.01, weight_decay=0.05)
    fit(whole, 2)
    for path in tmp_path.glob("*.ckpt"):
        path.unlink()
    torch.manual_seed(7)
    first = TinyModule("adam", lr=0.01, weight_decay=0.05)
    fit(first, 1)
    halfway = net_state(first)
    resumed = TinyModule("adam", lr=0.01)  # other initial weights and options: the checkpoint restores them
    fit(resumed, 2, ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    for (name, a), b in zip(net_state(whole).items(), net_state(resumed).values()):
        assert torch.equal(a, b), name
    assert not torch.equal(halfway["head.weight"], net_state(whole)["head.weight"])


def test_hooks_are_removed_at_teardown():
    module = TinyModule("adam", lr=0.01)
    gc = GradientCentralization(apply_to="update")
    t = trainer(callbacks=[gc])
    t.fit(module, loader(make_batches(2)))
    assert gc._update is not None and gc._update.handles == []
    optimizer = t.optimizers[0]
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(apply_to="weights"), "`apply_to` must be one of"),
        (dict(apply_to="update", centralize_weight_decay=True), "cannot be combined with `apply_to='update'`"),
        (dict(apply_to="update", mode="rows"), "`mode` must be one of"),
    ],
)
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientCentralization(**kwargs)


def test_functional_options_are_validated_the_same_way():
    model = TinyConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="cannot be combined with `apply_to='update'`"):
        centralize_updates(model, optimizer, centralize_weight_decay=True)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        centralize_updates(model, optimizer, mode="rows")
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        centralize_updates(model, object())  # type: ignore[arg-type]


def test_selection_options_apply_as_for_gradient_gc():
    model = TinyConvNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with centralize_updates(model, optimizer, conv_only=True, exclude=["up.*"]) as handle:
        assert isinstance(handle, UpdateHandle)
        assert [w.name for w in handle.plan.weights] == ["conv.weight"]
    with pytest.warns(UserWarning, match="matched no parameter"):
        centralize_updates(model, optimizer, exclude=["nothing.*"]).remove()


def test_given_parameters_restrict_the_plan_to_them():
    model = TinyConvNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    means = {n: unit_means(p, *LAYOUTS[n]) for n, p in model.named_parameters() if n in LAYOUTS}
    with centralize_updates([model.conv.weight, model.head.weight], optimizer) as handle:
        assert [w.name for w in handle.plan.weights] == ["param_0", "param_1"]
        _train_plain(model, optimizer, 3)
    for name, p in model.named_parameters():
        if name in LAYOUTS:
            drift = float((unit_means(p, *LAYOUTS[name]) - means[name]).abs().max())
            assert (drift <= _drift_bound(p, 3, 2.0**-24)) == (name != "up.weight"), (name, drift)
    with pytest.raises(ValueError, match="does not step"):
        centralize_updates([nn.Parameter(torch.zeros(2, 2))], optimizer)
