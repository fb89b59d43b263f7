"""The colorize recipe's data: line art, a warped colour reference and the colour target.

Everything comes from scikit-image's bundled colour photographs (no download). Each image is
downscaled once (shorter side :data:`IMAGE_SIDE` pixels) and its line art drawn once with XDoG
(Winnemöller et al., "XDoG: An eXtended difference-of-Gaussians compendium", Computers & Graphics
2012). A sample is a random ``size × size`` crop: the line art of the crop, the colour crop as
the target, and as the reference the colour crop seen through an *appearance* change (brightness
and per-channel gains) and a *spatial* warp (random rotation, scale, translation and horizontal
flip), as SCFT builds its references (Lee et al., "Reference-Based Sketch Image Colorization using
Augmented-Self Reference and Dense Semantic Correspondence", CVPR 2020). The model must find
where each colour went: the reference is the same picture, moved.

Training and test use different photographs (:data:`TRAIN_IMAGES`, :data:`TEST_IMAGES`), so the
test crops are held out at the image level. Options are tuned on a validation split carved from
the training photographs (:data:`VALIDATION_IMAGES`, left out of training when it is used), never
on the test photographs. Every draw comes from one ``numpy`` generator, so a
seed fixes the samples bitwise.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from equilibria._validate import check_bool, check_float, check_int

TRAIN_IMAGES = ("astronaut", "rocket", "immunohistochemistry", "retina", "hubble_deep_field",
                "colorwheel")  # fmt: skip
TEST_IMAGES = ("chelsea", "coffee")  # held out: no crop of them is seen in training
# tuning: a training photograph held out of training and scored instead of the test set
VALIDATION_IMAGES = ("rocket",)
IMAGE_SIDE = 160  # shorter side of each photograph after downscaling
_MARGIN = 0.5  # the reference is warped from a window this fraction of ``size`` larger per side


class Samples(NamedTuple):
    """A batch of colorization samples (float32 in [0, 1]).

    Attributes:
        line: (count, 1, size, size) line art (1 = paper, 0 = ink).
        reference: (count, 3, size, size) the colour crop, colour-jittered and warped.
        target: (count, 3, size, size) the colour crop.
    """

    line: torch.Tensor
    reference: torch.Tensor
    target: torch.Tensor


def xdog(
    gray: np.ndarray,
    *,
    sigma: float = 1.0,
    k: float = 1.6,
    tau: float = 0.98,
    eps: float = -0.003,
    phi: float = 200.0,
) -> np.ndarray:
    """Line art of a grey image in [0, 1] by the extended difference of Gaussians (XDoG).

    ``D = G_σ * I − τ G_{kσ} * I``; a pixel is paper (1) where ``D >= eps`` and ink
    ``1 + tanh(φ (D − eps))`` below it (Winnemöller et al., 2012, eq. 5 with their thresholding).

    Returns:
        An array of ``gray``'s shape in [0, 1].
    """
    from scipy.ndimage import gaussian_filter

    d = gaussian_filter(gray, sigma) - tau * gaussian_filter(gray, k * sigma)
    return np.clip(np.where(d >= eps, 1.0, 1.0 + np.tanh(phi * (d - eps))), 0.0, 1.0)


@functools.lru_cache(maxsize=4)
def load_images(names: tuple[str, ...]) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(colour (H, W, 3), line art (H, W)) float32 pairs of scikit-image's bundled photographs,
    downscaled to a shorter side of :data:`IMAGE_SIDE` (cached; the arrays are read-only)."""
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.transform import rescale

    out = []
    for name in names:
        image = getattr(skimage.data, name)()[..., :3].astype(np.float64) / 255.0
        factor = IMAGE_SIDE / min(image.shape[:2])
        image = np.clip(rescale(image, factor, anti_aliasing=True, channel_axis=-1), 0.0, 1.0)
        line = xdog(rgb2gray(image))
        pair = (image.astype(np.float32), line.astype(np.float32))
        for a in pair:
            a.flags.writeable = False
        out.append(pair)
    return tuple(out)


def hue_rotation(angle: np.ndarray) -> np.ndarray:
    """RGB matrices (k, 3, 3) rotating colours by ``angle`` (k,) radians about the grey axis
    (1, 1, 1): a hue rotation that keeps each pixel's channel mean and its distance from grey
    (Rodrigues' formula).

    Raises:
        ValueError: if ``angle`` is not a 1-D array of finite angles (a NaN or infinite angle gave
            a matrix of NaNs, which ``make_samples`` would have clipped into the crops).
    """
    angle = np.asarray(angle, dtype=np.float64)
    if angle.ndim != 1 or not np.isfinite(angle).all():
        raise ValueError(
            f"angle must be a 1-D array of finite angles in radians, got shape {angle.shape} "
            f"with values {angle.ravel()[:4].tolist()}"
        )
    u = np.full(3, 1.0 / math.sqrt(3.0))
    cross = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    return cos * np.eye(3) + sin * cross + (1.0 - cos) * np.outer(u, u)


def _warp_grids(rng: np.random.Generator, count: int, size: int, window: int) -> torch.Tensor:
    """Sampling grids (count, size, size, 2) of a random similarity transform with a random
    horizontal flip, from output pixels into the ``window``-sized crop around the target."""
    angle = rng.uniform(-math.pi / 9, math.pi / 9, count)  # ±20°
    scale = rng.uniform(0.85, 1.15, count)
    shift = rng.uniform(-0.15, 0.15, (count, 2)) * size / window  # in the window's [-1, 1]
    flip = np.where(rng.random(count) < 0.5, -1.0, 1.0)
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    ratio = size / window  # the output covers the window's centre
    theta = np.zeros((count, 2, 3))
    theta[:, 0, 0], theta[:, 0, 1] = ratio * cos * flip, -ratio * sin
    theta[:, 1, 0], theta[:, 1, 1] = ratio * sin * flip, ratio * cos
    theta[:, :, 2] = shift
    return F.affine_grid(
        torch.from_numpy(theta).float(), [count, 3, size, size], align_corners=False
    )


def make_samples(
    rng: np.random.Generator,
    images: tuple[tuple[np.ndarray, np.ndarray], ...],
    count: int,
    *,
    size: int,
    jitter: float = 0.1,
    recolour: bool = False,
) -> Samples:
    """Draws ``count`` samples of side ``size`` from ``images`` (see :func:`load_images`).

    Args:
        rng: the generator every draw comes from.
        images: (colour, line art) pairs.
        count: samples to draw.
        size: side of a crop.
        jitter: largest relative change of brightness and of each channel's gain in the
            reference, in [0, 0.5].
        recolour: rotate the hue of each sample's colour window (target and reference alike)
            by a random angle (:func:`hue_rotation`), so that the colours cannot be told from
            the line art and must be read from the reference. Training uses it: with a handful
            of photographs a network otherwise learns each photograph's colours from its line
            art and ignores the reference. ``False`` draws exactly what it drew before.
    """
    check_int("count", count, minimum=1)
    if len(images) == 0:
        raise ValueError("images must hold at least one photograph (see load_images), got none")
    window = 2 * round(_MARGIN * check_int("size", size, minimum=1)) + size
    smallest = min(min(image.shape[:2]) for image, _ in images)
    if window > smallest:
        raise ValueError(
            f"size must be <= {smallest // 2} (the reference's window, 2 x size, must fit the "
            f"smallest image, {smallest} pixels), got {size}"
        )
    check_float("jitter", jitter, low=0.0, high=0.5, low_open=False)
    check_bool("recolour", recolour)
    half = (window - size) // 2
    which = rng.integers(0, len(images), count)
    colour_windows = np.empty((count, window, window, 3), np.float32)
    lines = np.empty((count, 1, size, size), np.float32)
    for i, k in enumerate(which):
        image, line = images[k]
        top = int(rng.integers(0, image.shape[0] - window + 1))
        left = int(rng.integers(0, image.shape[1] - window + 1))
        colour_windows[i] = image[top : top + window, left : left + window]
        lines[i, 0] = line[top + half : top + half + size, left + half : left + half + size]
    if recolour:
        rotation = hue_rotation(rng.uniform(0.0, 2.0 * math.pi, count))  # (count, 3, 3)
        colour_windows = np.clip(np.einsum("kij,khwj->khwi", rotation, colour_windows), 0.0, 1.0)
        colour_windows = colour_windows.astype(np.float32)
    windows = torch.from_numpy(colour_windows).permute(0, 3, 1, 2)  # (count, 3, window, window)
    target = windows[:, :, half : half + size, half : half + size].contiguous()
    gains = (
        1.0
        + rng.uniform(-jitter, jitter, (count, 1, 1, 1))
        + rng.uniform(-jitter / 2, jitter / 2, (count, 3, 1, 1))
    )  # brightness times per-channel gain, (count, 3, 1, 1)
    grids = _warp_grids(rng, count, size, window)
    warped = F.grid_sample(windows, grids, mode="bilinear", padding_mode="reflection",
                           align_corners=False)  # fmt: skip
    reference = (warped * torch.from_numpy(gains).float()).clamp(0.0, 1.0)
    return Samples(torch.from_numpy(lines), reference, target)
