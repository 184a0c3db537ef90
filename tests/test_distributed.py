"""DDP with 2 CPU processes (gloo): identical on every rank and equal to the single-process reference."""

from pathlib import Path

import pytest
import torch
from clean_exit import CleanDistributedExit, leave_process_group
from lightning.pytorch import Callback
from lightning.pytorch.plugins import MixedPrecision
from models import (
    LAYOUTS,
    GradRecorder,
    TinyConvNet,
    TinyModule,
    loader,
    make_batches,
    net_state,
    reference_sgd,
    trainer,
)
from reference import gc_reference, ulp_tolerance
from torch import nn

from lightning_gc import GradientCentralization, centralize_gradients

pytestmark = pytest.mark.slow

LR, MOMENTUM = 0.2, 0.9


class SaveWeightsPerRank(Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(net_state(pl_module), self.folder / f"rank{trainer.global_rank}.pt")


def assert_ranks_match_reference(folder: Path, expected: dict) -> None:
    rank0, rank1 = (torch.load(folder / f"rank{r}.pt") for r in (0, 1))
    for name, value in expected.items():
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(rank0[name], value, rtol=1e-5, atol=1e-6, msg=name)


class RankSplitModule(TinyModule):
    """Rank r trains on batches r, r + 2, ... in order (the distributed sampler would shuffle them)."""

    def __init__(self, batches: list) -> None:
        super().__init__(lr=LR, momentum=MOMENTUM)
        self.batches = batches

    def train_dataloader(self):
        return loader(self.batches[self.global_rank :: self.trainer.world_size])


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_ddp_matches_single_process_reference_over_the_union_of_batches(tmp_path, strategy):
    batches = make_batches(8)
    module = RankSplitModule(batches)
    initial = net_state(module)
    trainer(
        devices=2,
        strategy=strategy,
        callbacks=[GradientCentralization(), SaveWeightsPerRank(tmp_path), CleanDistributedExit()],
        accumulate_grad_batches=2,
        use_distributed_sampler=False,
    ).fit(module)
    # DDP averages the two ranks' gradients and accumulation averages 2 micro-batches: 4 batches a step.
    steps = [[batches[i], batches[i + 1], batches[i + 2], batches[i + 3]] for i in (0, 4)]
    assert_ranks_match_reference(tmp_path, reference_sgd(initial, steps, lr=LR, momentum=MOMENTUM))


def _fabric_worker(fabric, folder: Path, initial: dict, batches: list) -> None:
    model = TinyConvNet()
    model.load_state_dict({k: v.float() for k, v in initial.items()})
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    model, optimizer = fabric.setup(model, optimizer)
    for x, y in batches[fabric.global_rank :: fabric.world_size]:
        optimizer.zero_grad()
        fabric.backward(nn.functional.cross_entropy(model(x), y))
        centralize_gradients(model)
        optimizer.step()
    torch.save(net_state(model.module), folder / f"rank{fabric.global_rank}.pt")
    leave_process_group()


def test_fabric_loop_with_centralize_gradients_matches_reference(tmp_path):
    from lightning.fabric import Fabric

    batches = make_batches(6)
    initial = net_state(TinyConvNet())
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    fabric.launch(_fabric_worker, tmp_path, initial, batches)
    steps = [[batches[i], batches[i + 1]] for i in (0, 2, 4)]
    assert_ranks_match_reference(tmp_path, reference_sgd(initial, steps, lr=LR, momentum=MOMENTUM))


class SaveHookGradients(Callback):
    """Saves, per rank, the gradients seen by the recorders placed before and after GC."""

    def __init__(self, folder: Path, before: GradRecorder, after: GradRecorder) -> None:
        self.folder, self.before, self.after = folder, before, after

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save((self.before.seen, self.after.seen), self.folder / f"grads{trainer.global_rank}.pt")


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true"])
def test_ddp_in_half_precision_is_exact_at_the_hook_and_identical_on_every_rank(tmp_path, precision):
    before, after = GradRecorder(), GradRecorder()
    kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu")]} if precision == "16-mixed" else {"precision": precision}
    trainer(
        devices=2,
        strategy="ddp_spawn",
        callbacks=[
            before,
            GradientCentralization(),
            after,
            SaveHookGradients(tmp_path, before, after),
            CleanDistributedExit(),
        ],
        use_distributed_sampler=False,
        **kwargs,
    ).fit(RankSplitModule(make_batches(6)))
    (before0, after0), (before1, after1) = (torch.load(tmp_path / f"grads{r}.pt") for r in (0, 1))
    assert len(after0) == 3
    for step in range(3):
        for name, grad in before0[step].items():
            torch.testing.assert_close(after0[step][name], after1[step][name], rtol=0, atol=0, msg=name)
            key = name.removeprefix("net.")
            dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
            expected = gc_reference(grad, *LAYOUTS[key]) if key in LAYOUTS else grad
            torch.testing.assert_close(after0[step][name], expected, msg=name, **ulp_tolerance(dtype))
