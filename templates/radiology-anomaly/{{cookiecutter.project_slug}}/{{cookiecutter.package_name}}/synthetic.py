"""Semi-synthetic brain MRI anomalies: real ICBM152 slices, augmented, with procedurally drawn lesions.

The offline default data set. The anatomy is real (axial slices of the ICBM152 2009a symmetric T1 template
that the ``nilearn`` wheel ships); the variability between "patients" (crops, small rotations, intensity,
bias field and noise) and the anomalies (lesions of varied size, contrast, shape and location inside the
brain mask) are synthetic. Every image is generated deterministically from a seed.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

T = TypeVar("T")
SOURCE_NAME = "icbm152-synthetic-lesions"
ICBM152_T1 = ("datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
SPLITS = ("train", "val", "test")
# Brain slices are assigned to splits by position, in blocks of ten neighbours: eight train, one val, one test.
_SPLIT_OF_POSITION = ("train",) * 8 + ("val", "test")


def icbm152_path() -> Path:
    """Where the ICBM152 T1 template shipped in the installed ``nilearn`` wheel lies (nilearn is not imported).

    Raises:
        FileNotFoundError: when nilearn is not installed or its wheel lacks the file.

    Example:
        >>> icbm152_path().name
        'mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz'
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline data source needs the ICBM152 template shipped in the nilearn wheel: "
            "`pip install --no-deps nilearn==0.14.1` (only its data files are read)"
        )
    path = Path(spec.submodule_search_locations[0], *ICBM152_T1)
    if not path.is_file():
        raise FileNotFoundError(f"the installed nilearn does not ship {'/'.join(ICBM152_T1)} (expected {path})")
    return path


def load_axial_slices(path: str | Path | None = None, min_brain_fraction: float = 0.05) -> tuple[torch.Tensor, np.ndarray]:
    """Axial slices of the (skull-stripped) ICBM152 T1 template, anterior up, as a square stack in ``[0, 1]``.

    Args:
        path: the NIfTI file; defaults to :func:`icbm152_path`.
        min_brain_fraction: keep slices where at least this fraction of the pixels is brain.

    Returns:
        ``(slices, z)``: float32 tensor ``(S, 1, H, H)`` zero-padded to square, and the slices' z indices.

    Raises:
        ValueError: for ``min_brain_fraction`` outside ``[0, 1)``.
    """
    if not 0.0 <= min_brain_fraction < 1.0:
        raise ValueError(f"`min_brain_fraction` must be in [0, 1), got {min_brain_fraction!r}")
    import nibabel  # only the offline source needs it

    volume = np.asarray(nibabel.load(str(path or icbm152_path())).dataobj, dtype=np.float32)
    volume /= max(float(volume.max()), 1e-8)
    keep = np.flatnonzero((volume > 0).mean(axis=(0, 1)) >= min_brain_fraction)
    # (x, y, z) RAS voxels -> rows = y flipped (anterior up), columns = x.
    slices = np.ascontiguousarray(volume[:, ::-1, keep].transpose(2, 1, 0))
    height, width = slices.shape[1:]
    side = max(height, width)
    pad_h, pad_w = side - height, side - width
    padded = np.pad(slices, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)))
    return torch.from_numpy(padded).unsqueeze(1), keep


@dataclass(frozen=True)
class LesionConfig:
    """How the synthetic anomalies vary. Sizes are fractions of the image side, so they scale with it.

    Args:
        radius: range of the lesion radius, as a fraction of the image side.
        contrast: range of the absolute intensity change at the lesion core (images are in ``[0, 1]``);
            hyper- and hypointense lesions are equally likely.
        max_lesions: an anomalous image has between 1 and this many lesions.
        irregularity: amplitude of the low-frequency wobble of the lesion border (0: ellipses).

    Raises:
        ValueError: for an empty or out-of-range interval or a non-positive count.
    """

    radius: tuple[float, float] = (0.04, 0.1)
    contrast: tuple[float, float] = (0.25, 0.6)
    max_lesions: int = 2
    irregularity: float = 0.15

    def __post_init__(self) -> None:
        _check_range("radius", self.radius, 0.0, 0.5)
        _check_range("contrast", self.contrast, 0.0, 1.0)
        if not isinstance(self.max_lesions, int) or self.max_lesions < 1:
            raise ValueError(f"`max_lesions` must be an integer >= 1, got {self.max_lesions!r}")
        if not 0.0 <= self.irregularity < 0.3:
            raise ValueError(f"`irregularity` must be in [0, 0.3), got {self.irregularity!r}")


@dataclass(frozen=True)
class AugmentConfig:
    """How normal anatomy varies between generated images (the synthetic "patients").

    Args:
        rotation: maximum absolute rotation in degrees.
        zoom: range of the zoom factor (a zoom above 1 crops the field of view).
        shift: maximum absolute translation, as a fraction of the half field of view.
        gamma: range of the intensity gamma.
        gain: range of the global intensity gain.
        bias_field: standard deviation of the smooth multiplicative bias field.
        noise: range of the standard deviation of additive Gaussian noise.

    Raises:
        ValueError: for an empty or out-of-range interval or a negative magnitude.
    """

    rotation: float = 10.0
    zoom: tuple[float, float] = (1.0, 1.2)
    shift: float = 0.06
    gamma: tuple[float, float] = (0.8, 1.25)
    gain: tuple[float, float] = (0.9, 1.1)
    bias_field: float = 0.06
    noise: tuple[float, float] = (0.01, 0.04)

    def __post_init__(self) -> None:
        for name in ("rotation", "shift", "bias_field"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)!r}")
        _check_range("zoom", self.zoom, 0.5, 4.0)
        _check_range("gamma", self.gamma, 0.1, 10.0)
        _check_range("gain", self.gain, 0.1, 10.0)
        _check_range("noise", self.noise, 0.0, 1.0)


@dataclass
class SyntheticSplit:
    """One generated split.

    Attributes:
        images: float32 ``(N, 1, S, S)`` in ``[0, 1]``.
        labels: int64 ``(N,)``, 1 for an image with lesions.
        lesion_masks: float32 ``(N, 1, S, S)`` in ``[0, 1]``, the soft lesion footprint (zero for normals).
        brain_masks: bool ``(N, 1, S, S)``, the warped brain mask.
        slice_z: int64 ``(N,)``, the template z index each image comes from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    lesion_masks: torch.Tensor
    brain_masks: torch.Tensor
    slice_z: torch.Tensor


def split_slices(z: np.ndarray, split: str) -> np.ndarray:
    """Positions (into ``z``) of the slices that ``split`` draws from: disjoint, interleaved in blocks of ten.

    Example:
        >>> split_slices(np.arange(20), "val").tolist()
        [8, 18]
    """
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    return np.array([i for i in range(len(z)) if _SPLIT_OF_POSITION[i % 10] == split], dtype=np.int64)


def _single_threaded(function: Callable[..., T]) -> Callable[..., T]:
    """Run ``function`` with one intra-op thread, restoring the setting afterwards."""

    @functools.wraps(function)
    def wrapper(*args: object, **kwargs: object) -> T:
        # Lesions are drawn with many small tensor operations: on a busy machine, waking intra-op threads for
        # each costs several times the work itself (measured: 5x the CPU time with 2 threads on 2 loaded cores).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@_single_threaded
def generate_split(
    slices: torch.Tensor,
    z: np.ndarray,
    split: str,
    num_images: int,
    *,
    image_size: int = 64,
    anomaly_fraction: float = 0.2,
    seed: int = 0,
    lesions: LesionConfig | None = None,
    augment: AugmentConfig | None = None,
) -> SyntheticSplit:
    """Generate ``num_images`` images of ``split`` from the template ``slices`` (see :func:`load_axial_slices`).

    The same arguments always give the same tensors; each split has its own random stream and its own slices.

    Args:
        slices: ``(S, 1, H, H)`` template slices in ``[0, 1]``.
        z: their z indices.
        split: ``"train"``, ``"val"`` or ``"test"``.
        num_images: how many images to generate.
        image_size: side of the square output images, in pixels.
        anomaly_fraction: share of images with lesions (rounded to a whole number of images).
        seed: the random seed.
        lesions: how lesions vary (default :class:`LesionConfig`).
        augment: how normal anatomy varies (default :class:`AugmentConfig`).

    Raises:
        ValueError: for an invalid argument, naming it.

    Example:
        >>> slices, z = load_axial_slices()
        >>> data = generate_split(slices, z, "val", 8, image_size=32, anomaly_fraction=0.25, seed=1)
        >>> data.images.shape, int(data.labels.sum())
        (torch.Size([8, 1, 32, 32]), 2)
    """
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"`num_images` must be an integer >= 1, got {num_images!r}")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"`image_size` must be an integer >= 16, got {image_size!r}")
    if not 0.0 <= anomaly_fraction <= 1.0:
        raise ValueError(f"`anomaly_fraction` must be in [0, 1], got {anomaly_fraction!r}")
    positions = split_slices(z, split)
    if len(positions) == 0:
        raise ValueError(f"no template slices left for split {split!r}: lower `min_brain_fraction`")
    lesions, augment = lesions or LesionConfig(), augment or AugmentConfig()
    gen = torch.Generator().manual_seed(_split_seed(seed, split))
    # Resample once to twice the output size (area averaging) so the warp below does not alias.
    source = F.interpolate(slices[positions], size=(2 * image_size, 2 * image_size), mode="area")
    pick = torch.randint(len(positions), (num_images,), generator=gen)
    labels = torch.zeros(num_images, dtype=torch.int64)
    labels[torch.randperm(num_images, generator=gen)[: round(anomaly_fraction * num_images)]] = 1

    images, brain = _warp(source[pick], image_size, augment, gen)
    lesion_masks = torch.zeros_like(images)
    for i in torch.nonzero(labels).flatten().tolist():
        images[i], lesion_masks[i] = _add_lesions(images[i], brain[i], lesions, gen)
    images = _vary_intensity(images, augment, gen)
    return SyntheticSplit(images, labels, lesion_masks, brain, torch.as_tensor(z[positions])[pick])


def _warp(source: torch.Tensor, size: int, cfg: AugmentConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation, zoom (crop) and shift of each slice, sampled to ``size``; the brain mask follows."""
    n = source.shape[0]
    angle = _uniform(n, -cfg.rotation, cfg.rotation, gen) * math.pi / 180
    zoom = _uniform(n, *cfg.zoom, gen)
    shift = _uniform((n, 2), -cfg.shift, cfg.shift, gen)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    stacked = torch.cat([source, (source > 0).float()], dim=1)
    warped = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped[:, :1].contiguous(), warped[:, 1:] > 0.5


def _add_lesions(
    image: torch.Tensor, brain: torch.Tensor, cfg: LesionConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw 1..max_lesions lesions centred inside the brain mask; their footprint is cut to the mask."""
    size = image.shape[-1]
    count = int(torch.randint(1, cfg.max_lesions + 1, (1,), generator=gen))
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    footprint = torch.zeros_like(image)
    for _ in range(count):
        radius = float(_uniform(1, *cfg.radius, gen)) * size
        reach = radius * (1 + 3 * cfg.irregularity)  # the farthest the wobbly border can go
        row, col = _centre_inside(brain[0], math.ceil(reach), gen)
        aspect = float(_uniform(1, 0.6, 1.0, gen))
        tilt = float(_uniform(1, 0.0, math.pi, gen))
        harmonics = _uniform((3, 2), 0.0, 1.0, gen)
        softness = float(_uniform(1, 0.4, 1.2, gen))
        dy, dx = rows - row, cols - col
        u = dx * math.cos(tilt) + dy * math.sin(tilt)
        v = (-dx * math.sin(tilt) + dy * math.cos(tilt)) / aspect
        distance, angle = torch.sqrt(u**2 + v**2), torch.atan2(v, u)
        border = radius * torch.ones_like(angle)
        for k, (amplitude, phase) in enumerate(harmonics.tolist(), start=2):
            border = border + radius * cfg.irregularity * (2 * amplitude - 1) * torch.cos(k * angle + 2 * math.pi * phase)
        blob = torch.sigmoid((border - distance) / softness) * brain[0]
        sign = 1.0 if float(_uniform(1, 0.0, 1.0, gen)) < 0.5 else -1.0
        contrast = float(_uniform(1, *cfg.contrast, gen))
        image = image + sign * contrast * blob
        footprint = torch.maximum(footprint, blob)
    return image.clamp(0.0, 1.0), footprint


def _centre_inside(brain: torch.Tensor, margin: int, gen: torch.Generator) -> tuple[float, float]:
    """A random pixel of ``brain`` at least ``margin`` pixels from its border (less if the slice is too small)."""
    outside = (~brain).float()[None, None]
    for reach in (margin, margin // 2, 0):
        # A square erosion, as two 1-D passes: much cheaper than one (2r+1)^2 window.
        near_outside = F.max_pool2d(outside, (2 * reach + 1, 1), stride=1, padding=(reach, 0))
        near_outside = F.max_pool2d(near_outside, (1, 2 * reach + 1), stride=1, padding=(0, reach))
        eroded = near_outside[0, 0] == 0
        candidates = torch.nonzero((eroded & brain).flatten()).flatten()
        if len(candidates):
            index = int(candidates[torch.randint(len(candidates), (1,), generator=gen)])
            return float(index // brain.shape[1]), float(index % brain.shape[1])
    raise ValueError("a generated image has an empty brain mask: raise `min_brain_fraction` or lower the zoom")


def _vary_intensity(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Gamma, gain, a smooth bias field and Gaussian noise, drawn per image."""
    n, _, size, _ = images.shape
    gamma = _uniform(n, *cfg.gamma, gen).view(n, 1, 1, 1)
    gain = _uniform(n, *cfg.gain, gen).view(n, 1, 1, 1)
    coarse = torch.randn((n, 1, 4, 4), generator=gen) * cfg.bias_field
    field = 1 + F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    noise = _uniform(n, *cfg.noise, gen).view(n, 1, 1, 1) * torch.randn(images.shape, generator=gen)
    return (images.clamp_min(0) ** gamma * gain * field + noise).clamp(0.0, 1.0)


def _uniform(shape: int | tuple[int, ...], low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    shape = (shape,) if isinstance(shape, int) else shape
    return low + (high - low) * torch.rand(shape, generator=gen)


def _split_seed(seed: int, split: str) -> int:
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be an integer >= 0, got {seed!r}")
    return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])


def _check_range(name: str, interval: tuple[float, float], low: float, high: float) -> None:
    if len(interval) != 2 or not low <= interval[0] <= interval[1] <= high:
        raise ValueError(f"`{name}` must be an interval (a, b) with {low} <= a <= b <= {high}, got {interval!r}")
