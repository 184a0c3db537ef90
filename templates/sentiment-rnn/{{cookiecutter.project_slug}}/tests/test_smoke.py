"""Both configs run end to end (``fast_dev_run``), and differ only by the GradientCentralization callback."""

from __future__ import annotations

import math

import pytest
import yaml
from lightning_gc import GradientCentralization

import train


@pytest.mark.parametrize(
    "arm, overlays, cell",
    [("gc", [], "LSTM"), ("baseline", ["configs/settings/gru.yaml"], "GRU")],
)
def test_fast_dev_run(in_project, tmp_path, arm: str, overlays: list[str], cell: str) -> None:
    args = ["fit", "--config", f"configs/{arm}.yaml"]
    for overlay in overlays:
        args += ["--config", overlay]
    args += ["--trainer.fast_dev_run", "2", "--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli = train.main(args)

    gc = [c for c in cli.trainer.callbacks if isinstance(c, GradientCentralization)]
    assert len(gc) == (arm == "gc")
    assert all(c.optimizer_steps == 2 for c in gc)
    assert type(cli.model.net.rnn).__name__ == cell and cli.model.net.rnn.bidirectional
    metrics = cli.trainer.callback_metrics
    for name in ("train/loss", "train/grad_norm", "val/loss", "val/acc", "val/f1", "val/auroc"):
        assert math.isfinite(float(metrics[name])), name
    # The embedding is sized by the training split's vocabulary.
    assert cli.model.net.embedding.num_embeddings == len(cli.datamodule.vocabulary) > 1000


def test_configs_differ_only_by_the_gc_callback(in_project) -> None:
    gc = yaml.safe_load((in_project / "configs/gc.yaml").read_text())
    baseline = yaml.safe_load((in_project / "configs/baseline.yaml").read_text())
    callbacks = gc["trainer"]["callbacks"]
    assert callbacks[-1]["class_path"] == "lightning_gc.GradientCentralization"
    assert callbacks[0]["init_args"]["monitor"] == "val/acc" and callbacks[0]["init_args"]["mode"] == "max"
    del callbacks[-1]
    for config in (gc, baseline):
        del config["trainer"]["logger"]["init_args"]["name"]
    assert gc == baseline


def test_overlays_never_replace_the_callbacks(in_project) -> None:
    for overlay in (in_project / "configs" / "settings").glob("*.yaml"):
        assert "callbacks" not in yaml.safe_load(overlay.read_text()).get("trainer", {}), overlay.name
