"""Normal vs anomalous images as a LightningDataModule: semi-synthetic brain MRI offline, MedMNIST chest X-rays."""

from __future__ import annotations

import functools
from typing import Literal, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from {{ cookiecutter.package_name }} import medmnist, synthetic

SYNTHETIC = synthetic.SOURCE_NAME
SOURCES = (SYNTHETIC, "pneumoniamnist", "chestmnist")
SYNTHETIC_DEFAULTS = {"num_train": 4000, "num_val": 1000, "num_test": 1000, "anomaly_fraction": 0.2}
PROVENANCE = {
    SYNTHETIC: "semi-synthetic: real ICBM152 2009a T1 brain anatomy (nilearn wheel), synthetic augmentation and lesions",
    "pneumoniamnist": "real: MedMNIST PneumoniaMNIST pediatric chest X-rays, pneumonia = anomalous",
    "chestmnist": "real: MedMNIST ChestMNIST (NIH ChestX-ray14), any of 14 findings = anomalous",
}


class RadiologyDataModule(pl.LightningDataModule):
    """Grey images in ``[0, 1]``, shape ``(1, S, S)``, labelled 0 (normal) or 1 (anomalous).

    Args:
        source: ``"icbm152-synthetic-lesions"`` (default, offline, SEMI-SYNTHETIC): axial slices of the real
            ICBM152 brain template shipped in the nilearn wheel, augmented into many normal images, with
            procedurally drawn lesions as anomalies (see :mod:`.synthetic`). ``"pneumoniamnist"`` or
            ``"chestmnist"``: real chest X-rays from MedMNIST, downloaded into ``data_dir`` (official splits).
        data_dir: where MedMNIST files are downloaded.
        image_size: image side. Synthetic: any integer >= 16; MedMNIST: 28, 64, 128 or 224 (picks the file).
        batch_size: samples per batch (per process under DDP).
        num_train: synthetic only: training images (default 4000).
        num_val: synthetic only: validation images (default 1000).
        num_test: synthetic only: test images (default 1000).
        anomaly_fraction: synthetic only: share of images with lesions in every split (default 0.2).
        lesion_radius: synthetic only: range of lesion radii as a fraction of the image side (default
            ``(0.04, 0.1)``).
        lesion_contrast: synthetic only: range of the lesions' absolute intensity change (default ``(0.25, 0.6)``).
        split_seed: seed of the synthetic generator; independent of ``seed_everything`` so every run of a
            comparison sees the same images. MedMNIST has official splits: only 0 is accepted there.
        train_normal_only: keep only normal training images (the autoencoder; ``train.py`` sets it from
            ``model.variant``).
        num_workers: DataLoader workers (the data is in memory: 0 is fastest at these sizes).
        mirrors: MedMNIST URL templates with a ``{file}`` field, tried in order (default: Zenodo).

    Raises:
        ValueError: for an invalid argument, naming it and the accepted values.

    Example:
        >>> dm = RadiologyDataModule(num_train=40, num_val=20, num_test=20, image_size=32)
        >>> dm.setup("fit")
        >>> dm.train_class_counts()
        (32, 8)
    """

    def __init__(
        self,
        source: Literal["icbm152-synthetic-lesions", "pneumoniamnist", "chestmnist"] = SYNTHETIC,
        data_dir: str = "data",
        image_size: int = 64,
        batch_size: int = 64,
        num_train: Optional[int] = None,
        num_val: Optional[int] = None,
        num_test: Optional[int] = None,
        anomaly_fraction: Optional[float] = None,
        lesion_radius: Optional[tuple[float, float]] = None,
        lesion_contrast: Optional[tuple[float, float]] = None,
        split_seed: int = 0,
        train_normal_only: bool = False,
        num_workers: int = 0,
        mirrors: Optional[list[str]] = None,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"`source` must be one of {SOURCES}, got {source!r}")
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("split_seed", split_seed, 0)
        synthetic_only = {
            "num_train": num_train, "num_val": num_val, "num_test": num_test, "anomaly_fraction": anomaly_fraction,
            "lesion_radius": lesion_radius, "lesion_contrast": lesion_contrast,
        }
        if source == SYNTHETIC:
            _check_int("image_size", image_size, 16)
            for name in ("num_train", "num_val", "num_test"):
                if synthetic_only[name] is not None:
                    _check_int(name, synthetic_only[name], 1)
            if anomaly_fraction is not None and not 0 < anomaly_fraction < 1:
                raise ValueError(f"`anomaly_fraction` must be in (0, 1), got {anomaly_fraction!r}")
            if mirrors is not None:
                raise ValueError("`mirrors` applies to the MedMNIST sources only, not to the offline synthetic source")
            self.lesions = synthetic.LesionConfig(
                **{k: tuple(v) for k, v in (("radius", lesion_radius), ("contrast", lesion_contrast)) if v is not None}
            )
        else:
            if image_size not in medmnist.SIZES:
                raise ValueError(f"`image_size` must be one of {medmnist.SIZES} for {source}, got {image_size!r}")
            given = [name for name, value in synthetic_only.items() if value is not None]
            if given:
                raise ValueError(f"{given} apply to the synthetic source only; {source} has fixed official splits")
            if split_seed != 0:
                raise ValueError(f"`split_seed` applies to the synthetic source only; {source} has fixed official splits")
            if mirrors is not None and (isinstance(mirrors, str) or not mirrors):
                raise ValueError(f"`mirrors` must be a non-empty list of URL templates, got {mirrors!r}")
        self.save_hyperparameters()
        self.hparams["provenance"] = PROVENANCE[source]  # logged with the hyperparameters: says what the data is
        self.source, self.data_dir, self.image_size, self.batch_size = source, data_dir, image_size, batch_size
        self.sizes = {split: synthetic_only[f"num_{split}"] or SYNTHETIC_DEFAULTS[f"num_{split}"] for split in medmnist.SPLITS}
        self.anomaly_fraction = anomaly_fraction or SYNTHETIC_DEFAULTS["anomaly_fraction"]
        self.split_seed, self.train_normal_only, self.num_workers = split_seed, train_normal_only, num_workers
        self.mirrors = tuple(mirrors) if mirrors else (medmnist.ZENODO,)
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None
        self.test_set: Optional[TensorDataset] = None

    def prepare_data(self) -> None:
        """Download the MedMNIST file once (on the main process); nothing to do for the synthetic source."""
        if self.source != SYNTHETIC:
            medmnist.fetch(self.source, self.image_size, self.data_dir, self.mirrors)

    def setup(self, stage: str) -> None:
        """Generate or read the three splits; every process builds the same ones."""
        if self.train_set is not None:
            return
        if self.source == SYNTHETIC:
            slices, z = _template_slices()
            splits = {
                split: synthetic.generate_split(
                    slices, z, split, self.sizes[split], image_size=self.image_size,
                    anomaly_fraction=self.anomaly_fraction, seed=self.split_seed, lesions=self.lesions,
                )
                for split in medmnist.SPLITS
            }
            tensors = {split: (data.images, data.labels) for split, data in splits.items()}
        else:
            path = medmnist.fetch(self.source, self.image_size, self.data_dir, self.mirrors)
            tensors = {split: medmnist.to_tensors(data) for split, data in medmnist.load(path, self.source, self.image_size).items()}
        images, labels = tensors["train"]
        if self.train_normal_only:
            images, labels = images[labels == 0], labels[labels == 0]
        self.train_set = TensorDataset(images, labels)
        self.val_set = TensorDataset(*tensors["val"])
        self.test_set = TensorDataset(*tensors["test"])

    def train_class_counts(self) -> tuple[int, int]:
        """``(normal, anomalous)`` images in the training set (after ``setup``)."""
        if self.train_set is None:
            raise RuntimeError("call `setup('fit')` first")
        anomalous = int(self.train_set.tensors[1].sum())
        return len(self.train_set) - anomalous, anomalous

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def _loader(self, dataset: Optional[TensorDataset], shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)


@functools.lru_cache(maxsize=1)
def _template_slices() -> tuple[torch.Tensor, np.ndarray]:
    # Decompressing the template takes a moment; tests and repeated setups in one process read it once.
    return synthetic.load_axial_slices()


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
