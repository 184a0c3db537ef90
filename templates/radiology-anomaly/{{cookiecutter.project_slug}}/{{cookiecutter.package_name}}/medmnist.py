"""MedMNIST chest X-ray sets as normal-vs-anomalous data: PneumoniaMNIST and ChestMNIST.

Reads MedMNIST's published ``.npz`` files (keys ``train_images``, ``train_labels``, ``val_...``, ``test_...``)
without the ``medmnist`` package, which pulls heavy dependencies: the URLs and checksums below are the ones
``medmnist`` 3.0.2 publishes (``medmnist/info.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lightning_gc.data import download

ZENODO = "https://zenodo.org/records/10519652/files/{file}?download=1"
SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
# md5 of each published file, by set and image side.
CHECKSUMS: dict[str, dict[int, str]] = {
    "pneumoniamnist": {
        28: "28209eda62fecd6e6a2d98b1501bb15f",
        64: "8f4eceb4ccffa70c672198ea285246c6",
        128: "05b46931834c231683c68f40c47b2971",
        224: "d6a3c71de1b945ea11211b03746c1fe1",
    },
    "chestmnist": {
        28: "02c8a6516a18b556561a56cbdd36c4a8",
        64: "9de6cd0b934ebb5b7426cfba5efbae16",
        128: "db107e5590b27930b62dbaf558aebee3",
        224: "45bd33e6f06c3e8cdb481c74a89152aa",
    },
}
# Label columns per image: PneumoniaMNIST one (0 normal, 1 pneumonia), ChestMNIST 14 findings (multi-label).
LABEL_COLUMNS = {"pneumoniamnist": 1, "chestmnist": 14}
OFFLINE_HINT = (
    "Offline? Use the semi-synthetic default, which needs no download: "
    "`--data.source icbm152-synthetic-lesions` (configs/gc.yaml uses it)."
)


@dataclass
class BinarySplit:
    """One split as normal (0) vs anomalous (1).

    Attributes:
        images: uint8 ``(N, S, S)``, as stored.
        labels: int64 ``(N,)``.
    """

    images: np.ndarray
    labels: np.ndarray


def file_name(name: str, size: int) -> str:
    """MedMNIST's file name: ``pneumoniamnist.npz`` for 28 pixels, ``pneumoniamnist_64.npz`` otherwise.

    Raises:
        ValueError: for an unknown set or size.

    Example:
        >>> file_name("chestmnist", 64)
        'chestmnist_64.npz'
    """
    _check(name, size)
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def fetch(name: str, size: int, root: str | os.PathLike, mirrors: Sequence[str] = (ZENODO,)) -> Path:
    """The verified ``.npz`` of set ``name`` at ``size`` under ``root``, downloaded once (md5-checked, atomic).

    Args:
        name: ``"pneumoniamnist"`` or ``"chestmnist"``.
        size: image side, one of 28, 64, 128, 224.
        root: cache folder.
        mirrors: URL templates with a ``{file}`` field, tried in order.

    Raises:
        ValueError: for an unknown set or size, or a mirror without ``{file}``.
        lightning_gc.data.DownloadError: when no mirror delivers the file with the published checksum; the
            message names the offline source.
    """
    if isinstance(mirrors, str) or not mirrors or any("{file}" not in m for m in mirrors):
        raise ValueError("`mirrors` must be a list of URL templates containing '{file}', got " + repr(mirrors))
    file = file_name(name, size)
    urls = [m.format(file=file) for m in mirrors]
    return download(urls, Path(root) / file, CHECKSUMS[name][size], offline_hint=OFFLINE_HINT)


def load(path: str | os.PathLike, name: str, size: int) -> dict[str, BinarySplit]:
    """Read a MedMNIST ``.npz`` and turn its labels into normal (0) vs anomalous (1).

    PneumoniaMNIST: pneumonia is anomalous. ChestMNIST: "no finding" (all 14 labels zero) is normal, any
    finding is anomalous.

    Raises:
        ValueError: when a key is missing or an array has the wrong shape, dtype or values, naming the file
            and the key.
    """
    _check(name, size)
    path = Path(path)
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    return {split: _binary_split(arrays, path.name, name, size, split) for split in SPLITS}


def to_tensors(split: BinarySplit) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 images ``(N, 1, S, S)`` in ``[0, 1]`` and int64 labels."""
    images = torch.from_numpy(split.images).float().div_(255.0).unsqueeze(1)
    return images, torch.from_numpy(split.labels)


def _binary_split(arrays: dict[str, np.ndarray], file: str, name: str, size: int, split: str) -> BinarySplit:
    images_key, labels_key = f"{split}_images", f"{split}_labels"
    for key in (images_key, labels_key):
        if key not in arrays:
            raise ValueError(f"{file}: missing key {key!r} (found {sorted(arrays)}); is it a MedMNIST file?")
    images, labels = arrays[images_key], arrays[labels_key]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (size, size):
        raise ValueError(
            f"{file}: {images_key!r} must be uint8 of shape (N, {size}, {size}) for size {size}, "
            f"got {images.dtype} {images.shape}"
        )
    columns = LABEL_COLUMNS[name]
    if labels.shape != (len(images), columns):
        raise ValueError(
            f"{file}: {labels_key!r} must have shape ({len(images)}, {columns}) to match {images_key!r} "
            f"for {name}, got {labels.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{file}: {labels_key!r} must hold only 0 and 1 for {name}, got {np.unique(labels)[:10]}")
    return BinarySplit(images=images, labels=labels.any(axis=1).astype(np.int64))


def _check(name: str, size: int) -> None:
    if name not in CHECKSUMS:
        raise ValueError(f"MedMNIST set must be one of {sorted(CHECKSUMS)}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"MedMNIST image size must be one of {SIZES}, got {size!r}")
