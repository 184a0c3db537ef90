"""The callback inside a real Trainer: hook order, optimizers, accumulation, clipping, resume, CLI, diagnostics."""

import math

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from models import (
    LAYOUTS,
    GradRecorder,
    TinyModule,
    loader,
    make_batches,
    net_state,
    reference_sgd,
    trainer,
)
from reference import gc_reference
from torch import nn

from lightning_gc import GradientCentralization, UnsupportedGradientLayoutError
from lightning_gc.plan import GCPlan
from lightning_gc.selection import Target
from lightning_gc.sharding import check_dense_gradient


def assert_centralized(before: dict, after: dict, **tolerance) -> None:
    for name, grad in before.items():
        expected = (
            gc_reference(grad, *LAYOUTS[name.removeprefix("net.")]) if name.removeprefix("net.") in LAYOUTS else grad
        )
        torch.testing.assert_close(after[name], expected, msg=name, **tolerance)


def test_training_equals_float64_reference_sgd_with_momentum():
    batches = make_batches(8)
    module = TinyModule(lr=0.2, momentum=0.9)
    initial = net_state(module)
    trainer(callbacks=[GradientCentralization()], precision="64-true").fit(module, loader(batches))
    expected = reference_sgd(initial, [[b] for b in batches], lr=0.2, momentum=0.9)
    for name, value in expected.items():
        torch.testing.assert_close(net_state(module)[name], value, rtol=1e-10, atol=1e-12, msg=name)


def test_gradient_accumulation_centralizes_the_accumulated_gradient_once_per_step():
    batches = make_batches(6)
    module = TinyModule(lr=0.1, momentum=0.5)
    initial = net_state(module)
    recorder = GradRecorder()
    trainer(callbacks=[GradientCentralization(), recorder], accumulate_grad_batches=3, precision="64-true").fit(
        module, loader(batches)
    )
    assert len(recorder.seen) == 2
    expected = reference_sgd(initial, [batches[:3], batches[3:]], lr=0.1, momentum=0.5)
    for name, value in expected.items():
        torch.testing.assert_close(net_state(module)[name], value, rtol=1e-10, atol=1e-12, msg=name)


def test_centralize_weight_decay_in_trainer_matches_papers_gc_of_decayed_gradient():
    lam, lr = 0.1, 0.05
    batches = make_batches(3)
    module = TinyModule(lr=lr, weight_decay=lam)
    initial = net_state(module)
    trainer(callbacks=[GradientCentralization(centralize_weight_decay=True)], precision="64-true").fit(
        module, loader(batches)
    )
    from models import TinyConvNet

    ref = TinyConvNet().double()
    ref.load_state_dict(initial)
    for x, y in batches:
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x.double()), y).backward()
        with torch.no_grad():
            for name, p in ref.named_parameters():
                decayed = p.grad + lam * p
                p -= lr * (gc_reference(decayed, *LAYOUTS[name]) if name in LAYOUTS else decayed)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(net_state(module)[name], value, rtol=1e-10, atol=1e-12, msg=name)


def test_centralize_weight_decay_warns_for_adamw(tmp_path):
    module = TinyModule(optimizer="adamw", lr=1e-3, weight_decay=0.1)
    with pytest.warns(UserWarning, match="decoupled"):
        trainer(callbacks=[GradientCentralization(centralize_weight_decay=True)], max_steps=1).fit(
            module, loader(make_batches(1))
        )


class TwoOptimizerModule(TinyModule):
    """Manual optimization, GAN-style: `opt_head` steps first while the body's gradients already exist."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.body_grads_when_head_stepped: list[torch.Tensor] = []
        self.body_grads_before: list[torch.Tensor] = []

    def configure_optimizers(self):
        body = [*self.net.conv.parameters(), *self.net.up.parameters()]
        return torch.optim.SGD(self.net.head.parameters(), lr=0.1), torch.optim.SGD(body, lr=0.1)

    def training_step(self, batch, batch_idx):
        opt_head, opt_body = self.optimizers()
        x, y = batch
        opt_head.zero_grad()
        opt_body.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        self.body_grads_before.append(self.net.conv.weight.grad.clone())
        opt_head.step()
        self.body_grads_when_head_stepped.append(self.net.conv.weight.grad.clone())
        opt_body.step()


def test_manual_optimization_centralizes_only_the_stepped_optimizers_parameters(tmp_path):
    module = TwoOptimizerModule()
    recorder = GradRecorder()
    t = trainer(
        callbacks=[GradientCentralization(), recorder], max_steps=4, logger=CSVLogger(tmp_path), log_every_n_steps=1
    )
    t.fit(module, loader(make_batches(2)))
    assert len(recorder.seen) == 4  # 2 batches x 2 optimizers
    for before, at_head_step in zip(module.body_grads_before, module.body_grads_when_head_stepped):
        torch.testing.assert_close(at_head_step, before)  # the head's step left the body alone
    head_step, body_step = recorder.seen[0], recorder.seen[1]
    assert head_step["net.head.weight"].sum(dim=1).abs().max() < 1e-5
    assert head_step["net.conv.weight"].flatten(1).sum(dim=1).abs().max() > 1e-3
    assert body_step["net.conv.weight"].flatten(1).sum(dim=1).abs().max() < 1e-5
    assert {"gc/optimizer0/removed_norm_ratio", "gc/optimizer1/removed_norm_ratio"} <= set(t.logged_metrics)


class LBFGSModule(TinyModule):
    def __init__(self) -> None:
        super().__init__(optimizer="lbfgs", lr=0.5, max_iter=4)


def test_lbfgs_centralizes_every_closure_evaluation():
    batches = make_batches(2)
    module = LBFGSModule()
    initial = net_state(module)
    before, after = GradRecorder(), GradRecorder()
    trainer(callbacks=[before, GradientCentralization(), after], precision="64-true").fit(module, loader(batches))
    assert len(after.seen) > len(batches)  # LBFGS evaluates its closure several times per step
    for b, a in zip(before.seen, after.seen):
        assert_centralized(b, a, rtol=1e-10, atol=1e-12)

    from models import TinyConvNet

    ref = TinyConvNet().double()
    ref.load_state_dict(initial)
    optimizer = torch.optim.LBFGS(ref.parameters(), lr=0.5, max_iter=4)
    for x, y in batches:

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(ref(x.double()), y)
            loss.backward()
            for name, p in ref.named_parameters():
                if name in LAYOUTS:
                    p.grad.copy_(gc_reference(p.grad, *LAYOUTS[name]))
            return loss

        optimizer.step(closure)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(net_state(module)[name], value, rtol=1e-9, atol=1e-11, msg=name)


class StepRecordingSGD(torch.optim.SGD):
    """Records the gradients the update actually uses, i.e. after GC and clipping."""

    seen: list[dict[int, torch.Tensor]] = []

    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure()
        StepRecordingSGD.seen.append({id(p): p.grad.detach().double().clone() for p in self.param_groups[0]["params"]})
        super().step()
        return loss


class ClippedModule(TinyModule):
    def configure_optimizers(self):
        return StepRecordingSGD(self.parameters(), lr=0.1)


def test_gradient_clipping_sees_the_centralized_gradient():
    StepRecordingSGD.seen = []
    module = ClippedModule()
    before = GradRecorder()
    clip = 0.05
    trainer(callbacks=[before, GradientCentralization()], gradient_clip_val=clip, precision="64-true").fit(
        module, loader(make_batches(3))
    )
    names = {id(p): n for n, p in module.named_parameters()}
    for raw, used in zip(before.seen, StepRecordingSGD.seen):
        centralized = {n: gc_reference(g, *LAYOUTS[n[4:]]) if n[4:] in LAYOUTS else g for n, g in raw.items()}
        total = torch.sqrt(sum(g.square().sum() for g in centralized.values()))
        coef = min(1.0, clip / (float(total) + 1e-6))
        assert coef < 1.0  # clipping is active, so the order matters
        for pid, grad in used.items():
            torch.testing.assert_close(grad, centralized[names[pid]] * coef, rtol=1e-9, atol=1e-12)


def test_resuming_from_a_checkpoint_continues_identically(tmp_path):
    batches = make_batches(2)
    straight = TinyModule(lr=0.1, momentum=0.9)
    initial = {k: v.clone() for k, v in straight.state_dict().items()}
    trainer(callbacks=[GradientCentralization()], max_epochs=2).fit(straight, loader(batches))

    first = TinyModule(lr=0.1, momentum=0.9)
    first.load_state_dict(initial)
    t1 = trainer(callbacks=[GradientCentralization()], max_epochs=1)
    t1.fit(first, loader(batches))
    t1.save_checkpoint(tmp_path / "half.ckpt")

    resumed_gc = GradientCentralization()
    resumed = TinyModule(lr=0.1, momentum=0.9)
    trainer(callbacks=[resumed_gc], max_epochs=2).fit(resumed, loader(batches), ckpt_path=tmp_path / "half.ckpt")
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert resumed_gc.optimizer_steps == 4


def test_state_key_is_distinct_per_configuration():
    keys = {
        GradientCentralization().state_key,
        GradientCentralization(conv_only=True).state_key,
        GradientCentralization(mode="tensor").state_key,
        GradientCentralization(exclude=["head.*"]).state_key,
        GradientCentralization(exclude_modules=[]).state_key,
    }
    assert len(keys) == 5
    assert GradientCentralization().state_key == GradientCentralization().state_key


def test_diagnostics_reach_tensorboard_and_cost_a_pass_only_on_logging_steps(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls: list[bool] = []
    original_apply = GCPlan.apply

    def counting_apply(self, compute_stats=False, grad_scale=1.0):
        calls.append(compute_stats)
        return original_apply(self, compute_stats=compute_stats, grad_scale=grad_scale)

    monkeypatch.setattr(GCPlan, "apply", counting_apply)
    before, after = GradRecorder(), GradRecorder()
    logger = TensorBoardLogger(tmp_path, name="", version="run")
    trainer(callbacks=[before, GradientCentralization(), after], logger=logger, log_every_n_steps=3).fit(
        TinyModule(), loader(make_batches(9))
    )
    assert calls == [False, False, True] * 3

    events = EventAccumulator(str(tmp_path / "run")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"gc/removed_norm_ratio", "gc/grad_norm", "gc/centralized_tensors", "gc/centralized_elements"} <= tags
    logged = events.Scalars("gc/removed_norm_ratio")
    assert [e.step for e in logged] == [2, 5, 8]
    for event in logged:
        b, a = before.seen[event.step], after.seen[event.step]
        names = [n for n in b if n[4:] in LAYOUTS]
        removed = torch.sqrt(sum((b[n] - a[n]).square().sum() for n in names))
        total = torch.sqrt(sum(b[n].square().sum() for n in names))
        assert math.isclose(event.value, float(removed / total), rel_tol=1e-5)
    assert events.Scalars("gc/centralized_tensors")[0].value == 3


def test_lightning_cli_adds_the_callback_from_the_command_line(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    class CLIModule(TinyModule):
        def train_dataloader(self):
            return loader(make_batches(2))

    cli = LightningCLI(
        CLIModule,
        args=[
            "fit",
            "--trainer.callbacks+=lightning_gc.GradientCentralization",
            "--trainer.callbacks.init_args.conv_only=true",
            "--trainer.fast_dev_run=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.accelerator=cpu",
        ],
        save_config_callback=None,
    )
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, GradientCentralization)]
    assert len(callbacks) == 1
    assert callbacks[0].config.conv_only is True
    assert callbacks[0].optimizer_steps == 2


def test_invalid_callback_options_raise_value_errors():
    with pytest.raises(ValueError, match="`log_diagnostics`"):
        GradientCentralization(log_diagnostics="no")
    with pytest.raises(ValueError, match=r"`mode` must be one of \('channel', 'tensor'\)"):
        GradientCentralization(mode="rows")


def test_optimizer_with_nothing_to_centralize_warns():
    class EmbeddingOnly(TinyModule):
        def configure_optimizers(self):
            return torch.optim.SGD([*self.net.head.parameters()][1:], lr=0.1)  # the bias only

    with pytest.warns(UserWarning, match="nothing to centralize"):
        trainer(callbacks=[GradientCentralization()], max_steps=1).fit(EmbeddingOnly(), loader(make_batches(1)))


def test_gradient_of_the_wrong_shape_is_refused_naming_parameter_and_strategy():
    param = nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(UnsupportedGradientLayoutError, match=r"`layer.weight` under FSDPStrategy.*\(6,\).*\(4, 3\)"):
        check_dense_gradient(Target(param, "layer.weight"), torch.zeros(6), "FSDPStrategy")


def test_unfreezing_a_parameter_replans_so_it_is_centralized():
    class Unfreezing(TinyModule):
        def on_train_batch_start(self, batch, batch_idx) -> None:
            self.net.head.weight.requires_grad_(batch_idx > 0)

    after = GradRecorder()
    trainer(callbacks=[GradientCentralization(), after]).fit(Unfreezing(), loader(make_batches(2)))
    assert "net.head.weight" not in after.seen[0]
    assert after.seen[1]["net.head.weight"].sum(dim=1).abs().max() < 1e-5


def test_compile_option_is_validated_and_compiled_route_is_exact():
    with pytest.raises(ValueError, match="`compile`"):
        GradientCentralization(compile="no-such-backend")
    before, after = GradRecorder(), GradRecorder()
    trainer(callbacks=[before, GradientCentralization(compile="eager"), after], max_steps=2).fit(
        TinyModule(), loader(make_batches(2))
    )
    for b, a in zip(before.seen, after.seen):
        assert_centralized(b, a, rtol=1e-5, atol=1e-6)


def test_compile_under_a_sharded_strategy_says_it_has_no_effect():
    from lightning.pytorch.strategies import ModelParallelStrategy

    class StrategyOnly:  # setup only reads the strategy to pick the adapter; nothing is launched
        strategy = ModelParallelStrategy()

    callback = GradientCentralization(compile="eager")
    with pytest.warns(UserWarning, match="no effect under ModelParallelStrategy"):
        callback.setup(StrategyOnly(), TinyModule(), "fit")


class LogStepRecorder(GradRecorder):
    """Lightning's own log-step rule next to the callback's, at every optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.decisions: list[tuple[bool, bool]] = []
        self.stop_at: int | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        from lightning_gc.callback import _is_log_step

        if self.stop_at is not None and len(self.decisions) == self.stop_at:
            trainer.should_stop = True  # as EarlyStopping would: Lightning logs the step it stops at
        self.decisions.append((trainer._logger_connector.should_update_logs, _is_log_step(trainer)))


@pytest.mark.parametrize("every", [1, 3, 5])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_log_step_rule_is_lightnings(tmp_path, every, accumulate):
    recorder = LogStepRecorder()
    logger = CSVLogger(tmp_path)

    trainer(
        callbacks=[GradientCentralization(), recorder],
        logger=logger,
        log_every_n_steps=every,
        accumulate_grad_batches=accumulate,
        max_epochs=2,
    ).fit(TinyModule(), loader(make_batches(11)))
    assert len(recorder.decisions) == 2 * math.ceil(11 / accumulate)
    assert [ours for _, ours in recorder.decisions] == [theirs for theirs, _ in recorder.decisions]
    assert any(ours for _, ours in recorder.decisions) and (every == 1 or not all(o for _, o in recorder.decisions))


def test_the_log_step_rule_is_lightnings_when_the_trainer_stops(tmp_path):
    recorder = LogStepRecorder()
    recorder.stop_at = 3
    trainer(callbacks=[GradientCentralization(), recorder], logger=CSVLogger(tmp_path), log_every_n_steps=5).fit(
        TinyModule(), loader(make_batches(11))
    )
    assert recorder.decisions[3] == (True, True)  # not a multiple of 5: logged because the trainer stops
    assert [ours for _, ours in recorder.decisions] == [theirs for theirs, _ in recorder.decisions]
