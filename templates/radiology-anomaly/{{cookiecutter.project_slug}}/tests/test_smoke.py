"""Both arms and both variants run end to end; a short real fit on fixture data keeps its threshold."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning_gc import GradientCentralization
from torch import nn

import train
from {{ cookiecutter.package_name }} import medmnist
from {{ cookiecutter.package_name }}.model import AnomalyDetector
from conftest import md5_of, write_medmnist

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SMALL = ["--data.num_train", "96", "--data.num_val", "64", "--data.num_test", "64", "--data.image_size", "32"]
AE = "configs/settings/autoencoder.yaml"


def _row_means(model: nn.Module) -> list[float]:
    """Largest |mean over every dim but the output dim| of each weight gradient, relative to its scale.

    The output dim is 1 for transposed convolutions (weight ``(in, out, kh, kw)``), 0 for everything else.
    """
    out = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() > 1 and weight.grad is not None:
            g = weight.grad.double()
            if isinstance(module, nn.ConvTranspose2d):
                g = g.transpose(0, 1)
            out.append((g.mean(dim=tuple(range(1, g.dim()))).abs().max() / g.abs().max()).item())
    return out


@pytest.mark.parametrize(
    ("configs", "gc", "variant"),
    [
        (["configs/gc.yaml"], True, "classifier"),
        (["configs/baseline.yaml"], False, "classifier"),
        (["configs/gc.yaml", AE], True, "autoencoder"),
        (["configs/baseline.yaml", AE], False, "autoencoder"),
    ],
)
def test_fast_dev_run(configs, gc, variant, in_project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []  # the module's hook runs after every callback's: what the optimizer is about to see
    hook = AnomalyDetector.on_before_optimizer_step
    monkeypatch.setattr(AnomalyDetector, "on_before_optimizer_step", lambda self, opt: (seen.append(_row_means(self)), hook(self, opt)))
    args = ["fit", *[a for c in configs for a in ("--config", c)], "--trainer.fast_dev_run", "2", *QUIET, *SMALL,
            "--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli = train.main(args)
    assert len([c for c in cli.trainer.callbacks if isinstance(c, GradientCentralization)]) == int(gc)
    assert cli.model.hparams.variant == variant and cli.model.hparams.image_size == 32
    normal, anomalous = cli.datamodule.train_class_counts()
    assert anomalous == (0 if variant == "autoencoder" else round(0.2 * 96)) and normal > 0
    if variant == "autoencoder":
        assert isinstance(cli.trainer.optimizers[0], torch.optim.Adam)
        assert any(isinstance(m, nn.ConvTranspose2d) for m in cli.model.modules())
    else:
        assert cli.model.loss_pos_weight.item() == pytest.approx(normal / anomalous)
    metrics = cli.trainer.callback_metrics
    for name in ("train/loss", "train/grad_norm", "val/loss", "val/precision", "val/recall", "val/f1", "val/auroc",
                 "val/average_precision", "val/threshold"):
        assert math.isfinite(metrics[name].item()), name
    means = [m for step in seen for m in step]
    assert len(seen) == 2 and means
    if gc:  # every weight gradient stepped on was centralized, transposed convolutions per output channel
        assert max(means) < 1e-5
    else:
        assert min(means) > 1e-4


@pytest.mark.parametrize("variant", ["classifier", "autoencoder"])
def test_fit_on_fixture_data_keeps_the_threshold(variant, in_project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_medmnist(data_dir / "pneumoniamnist.npz", "pneumoniamnist", 28)
    monkeypatch.setitem(medmnist.CHECKSUMS["pneumoniamnist"], 28, md5_of(data_dir / "pneumoniamnist.npz"))
    configs = ["--config", "configs/gc.yaml"] + (["--config", AE] if variant == "autoencoder" else [])
    args = ["fit", *configs, "--data.source", "pneumoniamnist", "--data.image_size", "28", "--data.data_dir", str(data_dir),
            "--data.batch_size", "8", "--trainer.max_epochs", "3", "--trainer.log_every_n_steps", "2", *QUIET,
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.version", "seed_0"]
    cli = train.main(args)
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert best.parent == tmp_path / "runs" / "gc" / "seed_0" / "checkpoints"
    saved = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]["threshold"]
    reloaded = AnomalyDetector.load_from_checkpoint(best).eval()
    assert reloaded.threshold.item() == saved.item() != 0.5  # chosen on validation, not the initial value
    assert reloaded.hparams.variant == variant
    # The test run used the best checkpoint with its threshold: recompute its precision and recall here.
    images, labels = cli.datamodule.test_set.tensors
    with torch.no_grad():
        flagged = reloaded(images).double() > saved.item()
    hits = (flagged & (labels == 1)).sum().item()
    metrics = cli.trainer.callback_metrics
    assert metrics["test/threshold"].item() == saved.item()
    assert metrics["test/precision"].item() == pytest.approx(hits / max(flagged.sum().item(), 1), abs=1e-6)
    assert metrics["test/recall"].item() == pytest.approx(hits / (labels == 1).sum().item(), abs=1e-6)
    if variant == "autoencoder":
        assert cli.datamodule.train_class_counts()[1] == 0
    events = EventAccumulator(str(best.parents[1]), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    images_logged = set(events.Tags()["images"])
    assert {"val/pr_curve", "val/examples", "test/pr_curve", "test/examples"} <= images_logged
    assert len(events.Images("val/pr_curve")) == 3  # one per epoch, none for the sanity check
    assert {"train/loss", "train/grad_norm", "val/auroc", "test/auroc", "gc/removed_norm_ratio"} <= set(events.Tags()["scalars"])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"variant": "gan"}, "variant"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"lr": 0}, "lr"),
        ({"optimizer": "adam", "momentum": 0.9}, "momentum"),
        ({"momentum": 1.0}, "momentum"),
        ({"channels": []}, "channels"),
        ({"image_size": 4}, "image_size"),
        ({"latent_dim": 16}, "latent_dim"),
        ({"variant": "autoencoder", "pos_weight": 2.0}, "pos_weight"),
        ({"variant": "autoencoder", "ae_score": "mse", "patch_size": 5}, "patch_size"),
        ({"threshold_rule": "youden"}, "threshold_rule"),
        ({"target_recall": 1.5}, "target_recall"),
    ],
)
def test_invalid_model_arguments_are_refused(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        AnomalyDetector(**kwargs)
