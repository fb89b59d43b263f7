"""Generated optical-flow data: textured frames with known, exact flow (no download).

Each sequence is rendered backwards in time. The last frame's layers are crops of scikit-image's
bundled photographs (the background and one or two foreground objects, each with its own texture).
Frame ``t`` is then drawn from frame ``t + 1``: every layer is resampled with :func:`sample` at the
point its motion carries the pixel to, ``q + u_t(q)``, and the layers are composited (objects over
the background). So the flow ``u_t`` from frame ``t`` to frame ``t + 1`` is known exactly, and

    frame_t(q) == sample(frame_{t+1}, q + u_t(q))

holds to float rounding wherever the bilinear footprint of ``q + u_t(q)`` lies inside the view and
on the same layer as ``q`` (the ``valid`` mask; elsewhere the pixel is occluded or leaves the view).
The background moves by an affine map plus a random smooth field; each object by its own affine map
(translation, small rotation and scaling), and its elliptical outline moves with it, so objects
occlude and disocclude the background. Each layer's motion is drawn once per sequence and jittered
slightly at every step (motion coherent in time, so the flow of one pair predicts the next).
Frames are rendered on a canvas with a margin around the view,
so the view never samples outside what was rendered.

Training and test sequences use disjoint source images (:data:`TRAIN_IMAGES`, :data:`TEST_IMAGES`).

Reference for the task: Dosovitskiy et al., "FlowNet", ICCV 2015 (synthetic flow by warping
images); Teed & Deng, "RAFT", ECCV 2020.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TEST_IMAGES",
    "TRAIN_IMAGES",
    "FlowSequences",
    "make_sequences",
    "sample",
    "textures",
]

# source photographs of scikit-image (bundled with the package, no download)
TRAIN_IMAGES = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "grass", "gravel", "hubble_deep_field",
    "immunohistochemistry", "moon", "retina", "rocket",
)  # fmt: skip
TEST_IMAGES = ("cell", "clock", "coins", "page", "text")
_POOL = (1, 2, 3)  # a texture crop is average-pooled by one of these factors (texture scale)


@dataclass(frozen=True)
class FlowSequences:
    """A batch of generated sequences.

    Attributes:
        frames: (N, T, 1, S, S) float32 grey frames in [0, 1].
        flows: (N, T - 1, 2, S, S) float32 flow from frame t to frame t + 1 in pixels, channels
            (x, y) = (along the width, along the height).
        valid: (N, T - 1, S, S) bool, where ``frame_t(q) == sample(frame_{t+1}, q + flow_t(q))``
            holds exactly (not occluded, not leaving the view).
    """

    frames: Tensor
    flows: Tensor
    valid: Tensor


@functools.lru_cache(maxsize=2)
def textures(split: Literal["train", "test"]) -> tuple[Tensor, ...]:
    """The grey source images of ``split`` as float32 (H, W) tensors in [0, 1] (cached)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    from skimage import color, data  # optional dependency, imported when data is made

    out = []
    for name in TRAIN_IMAGES if split == "train" else TEST_IMAGES:
        image = np.asarray(getattr(data, name)())
        if image.ndim == 3:
            image = color.rgb2gray(image[..., :3])
        image = image.astype(np.float64)
        if image.max() > 1.0:
            image = image / 255.0
        out.append(torch.from_numpy(image.astype(np.float32)))
    return tuple(out)


def sample(image: Tensor, coords: Tensor) -> Tensor:
    """Bilinear sampling of ``image`` at pixel coordinates (the one sampler of the data and its
    test).

    Args:
        image: (N, C, H, W).
        coords: (N, 2, H', W') points in pixels, channel 0 along the width (x), 1 along the
            height (y); (0, 0) is the centre of the top-left pixel. Points outside the image take
            the nearest border value.

    Returns:
        (N, C, H', W').
    """
    h, w = image.shape[-2:]
    gx = 2.0 * coords[:, 0] / max(w - 1, 1) - 1.0
    gy = 2.0 * coords[:, 1] / max(h - 1, 1) - 1.0
    grid = torch.stack([gx, gy], dim=-1)  # (N, H', W', 2)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def pixel_grid(h: int, w: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(1, 2, h, w) pixel coordinates (x, y) of an h x w image."""
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij"
    )
    return torch.stack([xs, ys])[None]


def _crop(rng: np.random.Generator, pool: tuple[Tensor, ...], size: int) -> Tensor:
    """A random (size, size) texture crop, average-pooled by a random factor, from the images
    of ``pool`` that hold one (all of them at the usual sizes: the same draws)."""
    fits = [image for image in pool if min(image.shape) >= size]
    image = fits[int(rng.integers(len(fits)))]
    factors = [k for k in _POOL if k * size <= min(image.shape)]
    k = factors[int(rng.integers(len(factors)))]
    y = int(rng.integers(image.shape[0] - k * size + 1))
    x = int(rng.integers(image.shape[1] - k * size + 1))
    crop = image[y : y + k * size, x : x + k * size][None, None]
    crop = F.avg_pool2d(crop, k) if k > 1 else crop
    if rng.random() < 0.5:
        crop = crop.flip(-1)
    return crop[0]  # (1, size, size)


def _affine(rng: np.random.Generator, scale: float, rot: float, shift: float) -> np.ndarray:
    """A random 2x3 affine map p -> A p + b about the origin (rotation, anisotropic scale,
    translation), as the displacement of the point it carries a pixel to."""
    theta = rng.uniform(-rot, rot)
    sx, sy = rng.uniform(1 - scale, 1 + scale, size=2)
    c, s = np.cos(theta), np.sin(theta)
    a = np.array([[c, -s], [s, c]]) @ np.diag([sx, sy])
    b = rng.uniform(-shift, shift, size=2)
    return np.concatenate([a, b[:, None]], axis=1)


def _jitter(rng: np.random.Generator, affine: np.ndarray, shift: float) -> np.ndarray:
    """``affine`` with its translation moved by up to ``shift`` pixels along each axis."""
    out = affine.copy()
    out[:, 2] += rng.uniform(-shift, shift, size=2)
    return out


def _apply(affine: np.ndarray, points: Tensor, centre: float) -> Tensor:
    """affine about ``centre``: (2, H, W) points -> (2, H, W) mapped points."""
    a = torch.as_tensor(affine[:, :2], dtype=points.dtype)
    b = torch.as_tensor(affine[:, 2], dtype=points.dtype)
    p = points - centre
    return torch.einsum("ij,jhw->ihw", a, p) + centre + b[:, None, None]


def _smooth_field(rng: np.random.Generator, size: int, amplitude: float) -> Tensor:
    """(2, size, size) random smooth displacement: Gaussian noise on a 4 x 4 grid, upsampled."""
    coarse = torch.from_numpy(rng.normal(0.0, amplitude, size=(1, 2, 4, 4)).astype(np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[0]


def make_sequences(
    rng: np.random.Generator,
    split: Literal["train", "test"],
    count: int,
    *,
    frames: int = 2,
    size: int = 32,
    max_objects: int = 2,
    motion: float = 1.0,
) -> FlowSequences:
    """``count`` generated sequences of ``frames`` frames with exact flow.

    Args:
        rng: the generator every random choice is drawn from.
        split: ``"train"`` or ``"test"`` source images (disjoint).
        count: number of sequences.
        frames: frames per sequence (2 = image pairs).
        size: S, the side of the square frames (a multiple of 4 in 16..128). Frames are
            rendered on a larger canvas (S plus the reach of the motion on each side); textures
            come from the images that hold it, and a ValueError is raised if none does.
        max_objects: foreground objects per sequence are drawn from 0..max_objects.
        motion: scale of all displacements (1.0: about 1.8 pixels of mean flow at S = 32, growing
            in proportion to S).

    Returns:
        :class:`FlowSequences`.

    Example:
        >>> seq = make_sequences(np.random.default_rng(0), "train", 8, frames=2, size=32)
        >>> seq.frames.shape, seq.flows.shape
        (torch.Size([8, 2, 1, 32, 32]), torch.Size([8, 1, 2, 32, 32]))
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    if not isinstance(frames, int) or not 2 <= frames <= 16:
        raise ValueError(f"frames must be an int in [2, 16], got {frames!r}")
    if not isinstance(size, int) or size % 4 or not 16 <= size <= 128:
        raise ValueError(f"size must be a multiple of 4 in [16, 128], got {size!r}")
    if not isinstance(max_objects, int) or not 0 <= max_objects <= 4:
        raise ValueError(f"max_objects must be an int in [0, 4], got {max_objects!r}")
    if not (isinstance(motion, (int, float)) and 0.0 < motion <= 4.0):
        raise ValueError(f"motion must be in (0, 4], got {motion!r}")
    pool = textures(split)
    canvas = size + 2 * _margin(size, frames, float(motion))
    largest = max(min(image.shape) for image in pool)
    if canvas > largest:
        raise ValueError(
            f"size={size}, frames={frames} and motion={motion} need a {canvas}-pixel canvas, "
            f"larger than every {split!r} image (the largest shorter side is {largest}); use a "
            f"smaller size or motion, or fewer frames"
        )
    out = [_sequence(rng, pool, frames, size, max_objects, float(motion)) for _ in range(count)]
    return FlowSequences(*(torch.stack(parts) for parts in zip(*out)))


def _margin(size: int, n_frames: int, motion: float) -> int:
    """Pixels rendered around the view on each side: the farthest the motion can reach."""
    return int(np.ceil(3 * (motion * size / 32) * (n_frames - 1))) + 4


def _sequence(
    rng: np.random.Generator,
    pool: tuple[Tensor, ...],
    n_frames: int,
    size: int,
    max_objects: int,
    motion: float,
) -> tuple[Tensor, Tensor, Tensor]:
    unit = motion * size / 32  # displacement scale in pixels
    margin = _margin(size, n_frames, motion)
    ext = size + 2 * margin  # the rendered canvas: the view plus a margin on each side
    centre = (ext - 1) / 2
    grid = pixel_grid(ext, ext)[0]  # (2, E, E)
    n_obj = int(rng.integers(max_objects + 1))
    # the last frame's layers: background texture, then the objects' textures
    layers = [_crop(rng, pool, ext) for _ in range(1 + n_obj)]  # each (1, E, E)
    # each object: an ellipse in its own coordinates, and the map from canvas points to them
    shapes = []
    for _ in range(n_obj):
        radii = rng.uniform(0.12, 0.28, size=2) * size
        at = centre + rng.uniform(-0.25, 0.25, size=2) * size
        shapes.append((radii, np.array([[1.0, 0.0, -at[0]], [0.0, 1.0, -at[1]]])))

    def inside(shape: tuple[np.ndarray, np.ndarray]) -> Tensor:  # (E, E) bool
        radii, to_obj = shape
        p = _apply(to_obj, grid, 0.0)
        r = torch.as_tensor(radii, dtype=p.dtype)[:, None, None]
        return ((p / r) ** 2).sum(0) < 1.0

    def composite(images: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
        image, label = images[0].clone(), torch.zeros(ext, ext, dtype=torch.long)
        for j, mask in enumerate(masks, start=1):  # later objects in front
            image[:, mask] = images[j][:, mask]
            label[mask] = j
        return image, label

    frame_next, label_next = composite(layers, [inside(s) for s in shapes])
    frames, flows, valids = [frame_next], [], []
    view = slice(margin, margin + size)
    # the motion of each layer is drawn once per sequence (coherent in time, as in video) and
    # jittered a little at every step: the background's affine map and smooth field, and each
    # object's affine map about its own centre
    bg_motion = _affine(rng, 0.05, 0.06, 2.0 * unit)
    bg_field = _smooth_field(rng, ext, 0.8 * unit)
    obj_motions = [_affine(rng, 0.06, 0.15, 3.0 * unit) for _ in range(n_obj)]
    for _ in range(n_frames - 1):
        # motions from this frame to the next, as the point each pixel is carried to
        bg = _apply(_jitter(rng, bg_motion, 0.2 * unit), grid, centre) + bg_field
        targets = [bg]
        for j in range(n_obj):
            to_obj = shapes[j][1]  # canvas point q -> object coordinates A q + c
            obj_centre = -np.linalg.solve(to_obj[:, :2], to_obj[:, 2])  # the object's origin
            m = _jitter(rng, obj_motions[j], 0.3 * unit)
            a, b = m[:, :2], m[:, 2] + obj_centre - m[:, :2] @ obj_centre
            targets.append(_apply(np.concatenate([a, b[:, None]], 1), grid, 0.0))
            # the outline moves with the object: canvas point q is inside at t when its image
            # under the motion is inside at t + 1 (the object coordinates compose)
            composed = to_obj[:, :2] @ a
            shapes[j] = (shapes[j][0], np.concatenate(
                [composed, (to_obj[:, :2] @ b + to_obj[:, 2])[:, None]], axis=1))  # fmt: skip
        layers = [sample(layer[None], tgt[None])[0] for layer, tgt in zip(layers, targets)]
        masks = [inside(s) for s in shapes]
        frame, label = composite(layers, masks)
        target = targets[0].clone()
        for j, mask in enumerate(masks, start=1):
            target[:, mask] = targets[j][:, mask]
        flow = target - grid  # (2, E, E) in pixels
        # valid: the bilinear footprint of q + u(q) lies inside the next view, on q's layer
        p = target[:, view, view] - margin  # in next-view pixel coordinates
        x0, y0 = p[0].floor().long(), p[1].floor().long()
        inview = (x0 >= 0) & (y0 >= 0) & (x0 + 1 <= size - 1) & (y0 + 1 <= size - 1)
        xs, ys = x0.clamp(0, size - 2) + margin, y0.clamp(0, size - 2) + margin
        same = torch.ones_like(inview)
        for dy in (0, 1):
            for dx in (0, 1):
                same &= label_next[ys + dy, xs + dx] == label[view, view]
        frames.append(frame)
        flows.append(flow)
        valids.append(inview & same)
        frame_next, label_next = frame, label
    # rendered from the last frame backwards: reverse into time order and crop the view
    frames_t = torch.stack(frames[::-1])[:, :, view, view]
    flows_t = torch.stack(flows[::-1])[:, :, view, view]
    return frames_t.contiguous(), flows_t.contiguous(), torch.stack(valids[::-1])
