"""MedMNIST loading and download, on small files in MedMNIST's exact format written by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning_gc.data import DownloadError

from {{ cookiecutter.package_name }} import medmnist
from {{ cookiecutter.package_name }}.data import RadiologyDataModule
from conftest import SPLIT_SIZES, md5_of, write_medmnist


@pytest.mark.parametrize("name", ["pneumoniamnist", "chestmnist"])
def test_load_turns_labels_into_normal_vs_anomalous(name: str, tmp_path: Path) -> None:
    arrays = write_medmnist(tmp_path / medmnist.file_name(name, 28), name, 28)
    splits = medmnist.load(tmp_path / medmnist.file_name(name, 28), name, 28)
    for split, n in SPLIT_SIZES.items():
        raw = arrays[f"{split}_labels"]
        # Pneumonia: the single column. ChestMNIST: normal only when none of the 14 findings is present.
        expected = raw[:, 0] if name == "pneumoniamnist" else (raw.sum(axis=1) > 0)
        assert splits[split].labels.tolist() == expected.astype(int).tolist()
        assert np.array_equal(splits[split].images, arrays[f"{split}_images"])
        images, labels = medmnist.to_tensors(splits[split])
        assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
        assert torch.allclose(images[:, 0] * 255, torch.from_numpy(arrays[f"{split}_images"]).float())


def test_file_names_and_published_checksums() -> None:
    assert medmnist.file_name("pneumoniamnist", 28) == "pneumoniamnist.npz"
    assert medmnist.file_name("chestmnist", 224) == "chestmnist_224.npz"
    assert medmnist.CHECKSUMS["pneumoniamnist"][28] == "28209eda62fecd6e6a2d98b1501bb15f"
    with pytest.raises(ValueError, match="size"):
        medmnist.file_name("pneumoniamnist", 32)
    with pytest.raises(ValueError, match="set"):
        medmnist.file_name("octmnist", 28)


def test_fetch_downloads_once_and_verifies(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, served, requests = server
    write_medmnist(served / "pneumoniamnist_64.npz", "pneumoniamnist", 64)
    monkeypatch.setitem(medmnist.CHECKSUMS["pneumoniamnist"], 64, md5_of(served / "pneumoniamnist_64.npz"))
    path = medmnist.fetch("pneumoniamnist", 64, tmp_path / "cache", [url])
    assert path == tmp_path / "cache" / "pneumoniamnist_64.npz"
    assert path.read_bytes() == (served / "pneumoniamnist_64.npz").read_bytes()
    assert requests == ["/pneumoniamnist_64.npz?download=1"]
    medmnist.fetch("pneumoniamnist", 64, tmp_path / "cache", [url])
    assert len(requests) == 1  # cached: verified on disk, not fetched again


def test_corrupt_file_is_a_checksum_error(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, served, _ = server
    write_medmnist(served / "pneumoniamnist.npz", "pneumoniamnist", 28)
    good = md5_of(served / "pneumoniamnist.npz")
    monkeypatch.setitem(medmnist.CHECKSUMS["pneumoniamnist"], 28, good)
    data = bytearray((served / "pneumoniamnist.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (served / "pneumoniamnist.npz").write_bytes(bytes(data))
    with pytest.raises(DownloadError, match=f"checksum mismatch.*expected {good}"):
        medmnist.fetch("pneumoniamnist", 28, tmp_path / "cache", [url])
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written left behind


def test_offline_error_names_the_offline_source(server, tmp_path: Path) -> None:
    url, _, _ = server  # serves nothing: every file is a 404, as a dead mirror would be
    with pytest.raises(DownloadError, match="icbm152-synthetic-lesions"):
        medmnist.fetch("chestmnist", 28, tmp_path, [url])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train_images": np.zeros((40, 32, 32), np.uint8)}, r"'train_images' must be uint8 of shape \(N, 28, 28\).*\(40, 32, 32\)"),
        ({"val_images": np.zeros((20, 28, 28), np.float32)}, r"'val_images' must be uint8.*float32"),
        ({"test_labels": np.zeros((19, 1), np.uint8)}, r"'test_labels' must have shape \(20, 1\).*\(19, 1\)"),
        ({"train_labels": np.full((40, 1), 2, np.uint8)}, r"'train_labels' must hold only 0 and 1"),
        ({"val_labels": None}, r"missing key 'val_labels'"),
    ],
)
def test_wrong_contents_give_clear_errors(change: dict, message: str, tmp_path: Path) -> None:
    arrays = write_medmnist(tmp_path / "good.npz", "pneumoniamnist", 28)
    for key, value in change.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    np.savez_compressed(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        medmnist.load(tmp_path / "bad.npz", "pneumoniamnist", 28)


def test_chestmnist_needs_its_14_label_columns(tmp_path: Path) -> None:
    write_medmnist(tmp_path / "pneumoniamnist.npz", "pneumoniamnist", 28)
    with pytest.raises(ValueError, match=r"shape \(40, 14\) .* for chestmnist"):
        medmnist.load(tmp_path / "pneumoniamnist.npz", "chestmnist", 28)


def test_datamodule_downloads_and_reads(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, served, _ = server
    arrays = write_medmnist(served / "chestmnist.npz", "chestmnist", 28)
    monkeypatch.setitem(medmnist.CHECKSUMS["chestmnist"], 28, md5_of(served / "chestmnist.npz"))
    dm = RadiologyDataModule(source="chestmnist", image_size=28, data_dir=str(tmp_path), mirrors=[url], train_normal_only=True)
    dm.prepare_data()
    dm.setup("fit")
    normal = int((arrays["train_labels"].sum(axis=1) == 0).sum())
    assert dm.train_class_counts() == (normal, 0)
    assert len(dm.val_set) == SPLIT_SIZES["val"] and len(dm.test_set) == SPLIT_SIZES["test"]
    assert dm.hparams["provenance"].startswith("real: MedMNIST ChestMNIST")


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"source": "octmnist"}, "source"),
        ({"source": "pneumoniamnist", "image_size": 32}, "image_size"),
        ({"source": "pneumoniamnist", "num_train": 10}, "num_train"),
        ({"source": "pneumoniamnist", "split_seed": 3}, "split_seed"),
        ({"source": "pneumoniamnist", "mirrors": "https://example.org/{file}"}, "mirrors"),
        ({"mirrors": ["https://example.org/{file}"]}, "mirrors"),
        ({"image_size": 8}, "image_size"),
        ({"anomaly_fraction": 1.0}, "anomaly_fraction"),
        ({"lesion_radius": (0.2, 0.1)}, "radius"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_invalid_data_arguments_are_refused(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        RadiologyDataModule(**kwargs)
