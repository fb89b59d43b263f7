"""The denoising recipe's data: patches of scikit-image's bundled images, and held-out test images.

Every image comes with scikit-image (``skimage.data``, no download). Training patches are cut
from :data:`TRAIN_IMAGES`; the test images are never trained on:

* grayscale: ``camera``, ``coins`` and ``moon`` (:data:`GRAY_TEST_IMAGES`);
* colour: ``astronaut`` and ``chelsea`` (:data:`COLOR_TEST_IMAGES`; ``skimage.data.cat`` is the
  same photograph as ``chelsea`` and is left out too).

Design choices are compared on a validation split carved from the training images
(:data:`VALIDATION_IMAGES`: ``coffee`` and ``rocket``, two photographs like the test images):
``train_images(color, validation=True)`` leaves them out, and a run with the recipe's
``--validation`` option reports its held-out metric on them instead of the test images.

Colour training images are converted to luminance for the grayscale models (ITU-R 601 weights,
as ``skimage.color.rgb2gray``); the colour models train on the colour images only
(:data:`COLOR_TRAIN_IMAGES`). Noise is additive white Gaussian noise of standard deviation σ in
the [0, 1] units of the image (σ = 25 in 0–255 units is 25 / 255); a batch draws one σ per patch
uniformly from a range, so a single model serves every noise level.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BUNDLED_IMAGES",
    "COLOR_TEST_IMAGES",
    "COLOR_TRAIN_IMAGES",
    "GRAY_TEST_IMAGES",
    "TRAIN_IMAGES",
    "VALIDATION_IMAGES",
    "add_noise",
    "load_image",
    "sample_patches",
    "test_images",
    "train_images",
    "validation_images",
]

# the training set: every bundled photograph or micrograph except the held-out ones
TRAIN_IMAGES = (
    "brick", "cell", "clock", "coffee", "grass", "gravel", "hubble_deep_field",
    "immunohistochemistry", "page", "retina", "rocket", "text",
)  # fmt: skip
COLOR_TRAIN_IMAGES = ("coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")
GRAY_TEST_IMAGES = ("camera", "coins", "moon")
COLOR_TEST_IMAGES = ("astronaut", "chelsea")
VALIDATION_IMAGES = ("coffee", "rocket")
_HELD_OUT = {*GRAY_TEST_IMAGES, *COLOR_TEST_IMAGES, "cat"}
assert not _HELD_OUT & set(TRAIN_IMAGES)
assert set(VALIDATION_IMAGES) <= set(TRAIN_IMAGES) & set(COLOR_TRAIN_IMAGES)
# the photographs and micrographs stored inside the scikit-image package: loading them never
# downloads (other skimage.data functions fetch their image from the network on first use)
BUNDLED_IMAGES = (
    *TRAIN_IMAGES, *GRAY_TEST_IMAGES, *COLOR_TEST_IMAGES, "cat", "horse", "logo",
    "microaneurysms",
)  # fmt: skip


@lru_cache(maxsize=32)
def _load(name: str, color: bool) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    image = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
    if image.ndim == 3:
        image = image[..., :3]
    if color:
        if image.ndim != 3:
            raise ValueError(f"image {name!r} is grayscale; a colour model needs an RGB image")
        return np.ascontiguousarray(image.transpose(2, 0, 1))  # (3, H, W)
    if image.ndim == 3:  # luminance, skimage.color.rgb2gray's weights
        image = image @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
    return np.ascontiguousarray(image[None])  # (1, H, W)


def load_image(name: str, *, color: bool = False) -> Tensor:
    """One bundled scikit-image image as a ``(C, H, W)`` float32 tensor in [0, 1] (C = 3 if
    ``color`` else 1).

    Args:
        name: one of :data:`BUNDLED_IMAGES` (e.g. ``"camera"``), the ``skimage.data`` images
            stored in the package; the ones it would download at run time are refused.
        color: RGB (the image must be a colour image) or luminance.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in BUNDLED_IMAGES:
        raise ValueError(
            f"name must be one of the images bundled with scikit-image {sorted(BUNDLED_IMAGES)} "
            f"(others download at run time), got {name!r}"
        )
    return torch.from_numpy(_load(name, bool(color)).copy())


def train_images(color: bool, validation: bool = False) -> list[Tensor]:
    """The training images, ``(C, H, W)`` tensors in [0, 1] (without
    :data:`VALIDATION_IMAGES` if ``validation``)."""
    names = COLOR_TRAIN_IMAGES if color else TRAIN_IMAGES
    skip = set(VALIDATION_IMAGES) if validation else set()
    return [load_image(name, color=color) for name in names if name not in skip]


def validation_images(color: bool) -> dict[str, Tensor]:
    """The validation images by name (training images that ``validation=True`` leaves out)."""
    return {name: load_image(name, color=color) for name in VALIDATION_IMAGES}


def test_images(color: bool) -> dict[str, Tensor]:
    """The held-out images by name, ``(C, H, W)`` tensors in [0, 1]."""
    names = COLOR_TEST_IMAGES if color else GRAY_TEST_IMAGES
    return {name: load_image(name, color=color) for name in names}


def sample_patches(
    images: list[Tensor], count: int, size: int, generator: torch.Generator
) -> Tensor:
    """``count`` random ``size × size`` patches, ``(count, C, size, size)``: an image chosen with
    probability proportional to its area, a uniform position, and one of the 8 flips/rotations.

    Args:
        images: ``(C, H, W)`` tensors, each at least ``size`` pixels on both sides.
        count: number of patches.
        size: patch side.
        generator: the CPU generator every draw comes from (reproducible batches).
    """
    small = [tuple(im.shape[1:]) for im in images if min(im.shape[1:]) < size]
    if small:
        raise ValueError(
            f"size must be at most every image's height and width, got {size} for images of "
            f"(H, W) {small}"
        )
    areas = torch.tensor([float(im.shape[1] * im.shape[2]) for im in images])
    which = torch.multinomial(areas, count, replacement=True, generator=generator)
    corner = torch.rand(count, 2, generator=generator)
    orient = torch.randint(0, 8, (count,), generator=generator)
    out = []
    for k in range(count):
        im = images[int(which[k])]
        top = int(corner[k, 0] * (im.shape[1] - size + 1))
        left = int(corner[k, 1] * (im.shape[2] - size + 1))
        patch = im[:, top : top + size, left : left + size]
        o = int(orient[k])
        patch = torch.rot90(patch, o % 4, dims=(1, 2))
        out.append(patch.flip(2) if o >= 4 else patch)
    return torch.stack(out)


def add_noise(clean: Tensor, sigma: Tensor, generator: torch.Generator) -> Tensor:
    """``clean + sigma · n`` with n ~ N(0, I) drawn from ``generator`` on the CPU (so the noise
    is the same on every device); ``sigma`` is ``(N,)`` in [0, 1] units."""
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(device=clean.device, dtype=clean.dtype)
    return clean + sigma.to(clean).view(-1, 1, 1, 1) * noise
