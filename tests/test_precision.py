"""Every Lightning precision on CPU, including fp16 AMP with a real GradScaler."""

import math

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from models import LAYOUTS, GradRecorder, TinyModule, loader, make_batches, trainer
from reference import gc_reference, ulp_tolerance

from lightning_gc import GradientCentralization

PRECISIONS = ["32-true", "64-true", "bf16-mixed", "16-true", "bf16-true", "16-mixed"]


def precision_kwargs(precision: str) -> dict:
    # On CPU Lightning turns precision="16-mixed" into bf16; the plugin keeps real fp16 with a GradScaler.
    if precision == "16-mixed":
        return {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    return {"precision": precision}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gradients_are_centralized_exactly_in_every_precision(precision):
    before, after = GradRecorder(), GradRecorder()
    module = TinyModule(lr=0.05, momentum=0.9)
    dtypes = []

    class DtypeProbe(GradRecorder):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            dtypes.append(pl_module.net.head.weight.grad.dtype)

    t = trainer(callbacks=[before, DtypeProbe(), GradientCentralization(), after], **precision_kwargs(precision))
    t.fit(module, loader(make_batches(4)))
    assert len(after.seen) == 4
    expected_dtype = {"64-true": torch.float64, "16-true": torch.float16, "bf16-true": torch.bfloat16}
    assert dtypes[0] == expected_dtype.get(precision, torch.float32)
    for b, a in zip(before.seen, after.seen):
        for name, grad in b.items():
            key = name.removeprefix("net.")
            expected = gc_reference(grad, *LAYOUTS[key]) if key in LAYOUTS else grad
            torch.testing.assert_close(a[name], expected, msg=f"{precision} {name}", **ulp_tolerance(dtypes[0]))
    if precision == "16-mixed":
        assert isinstance(t.precision_plugin.scaler, torch.amp.GradScaler)


class PoisonedStep(TinyModule):
    """Makes the loss of one batch overflow in fp16, as a real overflow would."""

    def __init__(self, poisoned_batch: int) -> None:
        super().__init__(lr=0.1)
        self.poisoned_batch = poisoned_batch
        self.snapshots: list[torch.Tensor] = []
        self.scales: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1e30 if batch_idx == self.poisoned_batch else loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.snapshots.append(self.net.head.weight.detach().clone())
        self.scales.append(self.trainer.precision_plugin.scaler.get_scale())


def test_fp16_overflow_step_is_still_skipped_and_the_scale_backs_off():
    module = PoisonedStep(poisoned_batch=1)
    trainer(callbacks=[GradientCentralization()], plugins=[MixedPrecision("16-mixed", "cpu")]).fit(
        module, loader(make_batches(3))
    )
    assert not torch.equal(module.snapshots[0], module.snapshots[1])  # a normal step moved the weights
    torch.testing.assert_close(module.snapshots[2], module.snapshots[1], rtol=0, atol=0)  # the overflow step did not
    assert module.scales[2] == module.scales[1] / 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


class FusedAdam(TinyModule):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)


def test_fused_optimizer_under_fp16_amp_reports_unscaled_diagnostics(tmp_path):
    """Fused optimizers unscale inside `step`, so the hook sees scaled gradients; GC is linear, stats must not be."""
    before, after = GradRecorder(), GradRecorder()
    module = FusedAdam()
    t = trainer(
        callbacks=[before, GradientCentralization(), after],
        plugins=[MixedPrecision("16-mixed", "cpu")],
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        max_steps=1,
    )
    t.fit(module, loader(make_batches(1)))
    scale = t.precision_plugin.scaler.get_scale()
    assert scale > 1
    b, a = before.seen[0], after.seen[0]
    names = [n for n in b if n.removeprefix("net.") in LAYOUTS]
    unscaled_norm = math.sqrt(sum(float(b[n].square().sum()) for n in names)) / scale
    assert math.isclose(float(t.logged_metrics["gc/grad_norm"]), unscaled_norm, rel_tol=1e-4)
    for n in names:  # GC of scaled gradients is still exact
        torch.testing.assert_close(a[n], gc_reference(b[n], *LAYOUTS[n.removeprefix("net.")]), rtol=1e-5, atol=1e-3)
