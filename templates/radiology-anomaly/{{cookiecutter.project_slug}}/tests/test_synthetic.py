"""The semi-synthetic generator: real template slices, deterministic by seed, lesions only inside the brain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from {{ cookiecutter.package_name }}.synthetic import (
    AugmentConfig,
    LesionConfig,
    generate_split,
    icbm152_path,
    load_axial_slices,
    split_slices,
)


@pytest.fixture(scope="module")
def template() -> tuple[torch.Tensor, np.ndarray]:
    return load_axial_slices()


def test_template_is_the_icbm152_t1_shipped_by_nilearn(template) -> None:
    import nibabel

    path = icbm152_path()
    assert path.parts[-4:] == ("nilearn", "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    volume = np.asarray(nibabel.load(str(path)).dataobj)
    assert volume.shape == (197, 233, 189)
    slices, z = template
    assert len(z) == 137 and slices.shape == (137, 1, 233, 233)
    # Slice k is volume[:, ::-1, z[k]] transposed (anterior up), scaled to [0, 1], padded 18 columns each side.
    k = 60
    expected = volume[:, ::-1, z[k]].T.astype(np.float64) / volume.max()
    assert np.allclose(slices[k, 0, :, 18:215].double().numpy(), expected, atol=1e-6)
    assert slices[k, 0, :, :18].abs().max() == 0


def test_splits_use_disjoint_slices(template) -> None:
    _, z = template
    parts = [set(split_slices(z, s).tolist()) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(z) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    data = generate_split(*template, "test", 30, image_size=32, seed=0)
    assert set(data.slice_z.tolist()) <= {int(z[i]) for i in parts[2]}


def test_deterministic_by_seed(template) -> None:
    a = generate_split(*template, "train", 24, image_size=32, seed=7)
    b = generate_split(*template, "train", 24, image_size=32, seed=7)
    c = generate_split(*template, "train", 24, image_size=32, seed=8)
    for field in ("images", "labels", "lesion_masks", "brain_masks", "slice_z"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (24, 1, 32, 32) and 0 <= a.images.min() and a.images.max() <= 1
    assert int(a.labels.sum()) == round(0.2 * 24)


def test_lesions_lie_inside_the_brain_mask(template) -> None:
    # Lesion parameters are drawn the same way whatever their ranges, so the same seed with zero contrast gives
    # the same images without lesions: the difference is exactly what the lesions changed.
    clean = AugmentConfig(noise=(0.0, 0.0), bias_field=0.0)
    kwargs = dict(image_size=48, anomaly_fraction=0.5, seed=3, augment=clean)
    with_lesions = generate_split(*template, "train", 40, **kwargs)
    without = generate_split(*template, "train", 40, lesions=LesionConfig(contrast=(0.0, 0.0)), **kwargs)
    changed = (with_lesions.images - without.images).abs() > 1e-6
    brain = with_lesions.brain_masks
    assert torch.equal(with_lesions.labels, without.labels)
    assert not (changed & ~brain).any()
    assert not (with_lesions.lesion_masks[~brain] > 0).any()
    per_image = changed.flatten(1).sum(1)
    anomalous = with_lesions.labels == 1
    assert (per_image[anomalous] > 0).all() and (per_image[~anomalous] == 0).all()
    assert (with_lesions.lesion_masks[~anomalous] == 0).all()
    # Sizes vary within the configured radii: a core of at least one pixel, at most a few radius-0.1 disks.
    cores = (with_lesions.lesion_masks[anomalous] > 0.5).flatten(1).sum(1).float()
    assert cores.min() >= 1 and cores.max() <= 2 * np.pi * (0.1 * 1.45 * 48) ** 2
    assert cores.std() > 0


def test_invalid_generator_arguments_are_refused(template) -> None:
    with pytest.raises(ValueError, match="num_images"):
        generate_split(*template, "train", 0)
    with pytest.raises(ValueError, match="split"):
        generate_split(*template, "dev", 4)
    with pytest.raises(ValueError, match="contrast"):
        LesionConfig(contrast=(0.5, 0.2))
    with pytest.raises(ValueError, match="zoom"):
        AugmentConfig(zoom=(0.1, 1.0))
