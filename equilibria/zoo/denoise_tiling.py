"""Tiled inference: run an image-to-image map on overlapping tiles and blend them without seams.

``tiled_apply(fn, image, tile=256, overlap=32)`` cuts ``image`` ``(N, C, H, W)`` into tiles of at
most ``tile × tile`` pixels whose neighbours overlap by at least ``overlap`` pixels (the last tile
of a row or column is aligned to the image's edge), calls ``fn`` on one tile at a time, and adds
the outputs with a separable weight window normalised by the sum of the weights. Peak memory is
therefore one tile's worth of ``fn``'s activations plus the output image; an image no larger than
``tile`` is one call of ``fn`` on the whole image.

The window of a tile along each axis, at an edge that borders another tile:

    weight  0 … 0  ramp ↗ (raised cosine)  1 … 1 … 1  ramp ↘  0 … 0
            margin      overlap − 2·margin                     margin

and 1 right up to an edge of the image. The first and last ``margin`` pixels of an inner edge
get weight 0, so every output pixel comes from tile positions at least ``margin`` pixels inside
the tile. Hence, for a map that is translation-equivariant with a receptive radius ``r`` (an output
pixel depends on inputs at most ``r`` pixels away, zero padding at the image's border, such as a
stack of convolutions), tiling is exact to round-off when ``r ≤ margin`` (default
``overlap // 4``). Maps with a larger (e.g. global, iterative) receptive field differ near the
tile seams; the raised-cosine ramp, ``overlap − 2·margin`` pixels wide, makes that difference a
smooth blend of two plausible outputs rather than a visible step.
``tests/test_denoise_cli.py`` checks both, and that ``fn`` never sees more than one tile (and
its ``halo``, when one is asked for: context beyond the tile that ``fn`` reads but whose output is
dropped; see :func:`tiled_apply`).

A map that is not translation-equivariant but equivariant to shifts by a multiple of ``k`` only,
such as a network on the ``k²`` sub-images of ``pixel_unshuffle(x, k)`` (the shipped denoisers,
``scale=2``; FFDNet), needs tiles that start at multiples of ``k`` (``align=k``): otherwise a
tile at an odd offset groups its pixels into other sub-images than the whole image and its
neighbours do, and its output differs from theirs far more than at the seams (the shipped grey
network, without the non-local stage, on a 37 × 53 image in 24² tiles overlapping by 8: up to
20 / 255 from the whole-image result, 3.6 / 255 with the tiles aligned; the colour DEQ 37 and 9;
``tests/test_denoise_cli.py``).

Example:
    >>> conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    >>> x = torch.rand(1, 1, 70, 90)
    >>> with torch.no_grad():
    ...     y = tiled_apply(conv, x, tile=32, overlap=8)
    ...     ok = torch.allclose(y, conv(x), atol=1e-6)
    >>> ok
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["tile_starts", "tiled_apply", "window_1d"]


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of the tiles along an axis of ``size`` pixels.

    Tiles step by ``tile − overlap`` rounded down to a multiple of ``align``; the last one ends
    at the end of the axis and starts at the first multiple of ``align`` from ``size − tile`` on
    (so it is up to ``align − 1`` pixels shorter than ``tile``). Consecutive tiles overlap by
    at least ``overlap`` pixels. One tile (offset 0) when ``size ≤ tile``.

    Args:
        size: pixels along the axis, at least 1.
        tile, overlap, align: as for :func:`tiled_apply` (``tile`` at least 8, ``overlap`` in
            ``[0, tile // 2]``, ``align`` in ``[1, tile // 2]``).

    Example:
        >>> tile_starts(100, 40, 10)
        [0, 30, 60]
        >>> tile_starts(53, 24, 8, align=2)
        [0, 16, 30]
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int of at least 1, got {size!r}")
    _check_tiles(tile, overlap, align)
    if size <= tile:
        return [0]
    step = tile - overlap
    step -= step % align
    last = -(-(size - tile) // align) * align
    return [*range(0, size - tile, step), last]


def _check_tiles(tile: int, overlap: int, align: int) -> None:
    """Raise unless ``tile ≥ 8``, ``0 ≤ overlap ≤ tile // 2`` and ``1 ≤ align ≤ tile // 2`` (ints):
    the tiles' step ``tile − overlap`` rounded down to a multiple of ``align`` is then positive."""
    for name, value in (("tile", tile), ("overlap", overlap)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if tile < 8:
        raise ValueError(f"tile must be at least 8, got {tile}")
    if not 0 <= overlap <= tile // 2:
        raise ValueError(f"overlap must be in [0, tile // 2] = [0, {tile // 2}], got {overlap}")
    if isinstance(align, bool) or not isinstance(align, int) or not 1 <= align <= tile // 2:
        raise ValueError(f"align must be an int in [1, tile // 2 = {tile // 2}], got {align!r}")


def window_1d(
    length: int, *, ramp_start: bool, ramp_end: bool, margin: int, ramp: int
) -> torch.Tensor:
    """The blending weights ``(length,)`` of one tile along one axis (float64).

    Args:
        length: the tile's length along the axis.
        ramp_start: whether the tile's first edge borders another tile (else the image's edge).
        ramp_end: whether its last edge borders another tile.
        margin: pixels of weight 0 at a bordering edge.
        ramp: pixels of the raised-cosine ramp from 0 to 1 after the margin.
    """
    w = torch.ones(length, dtype=torch.float64)
    # raised cosine sampled at pixel centres: values strictly inside (0, 1)
    t = (torch.arange(ramp, dtype=torch.float64) + 0.5) / max(ramp, 1)
    up = 0.5 - 0.5 * torch.cos(math.pi * t)
    edge = torch.cat([torch.zeros(margin, dtype=torch.float64), up])
    if ramp_start:
        w[: edge.numel()] = edge
    if ramp_end:
        w[length - edge.numel() :] = torch.minimum(w[length - edge.numel() :], edge.flip(0))
    return w


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    tile: int = 256,
    overlap: int = 32,
    margin: int | None = None,
    align: int = 1,
    halo: int = 0,
) -> torch.Tensor:
    """Apply ``fn`` to ``image`` tile by tile and blend the tiles seam-free.

    Use it to run a fully convolutional or iterative image-to-image model on images of any size
    with bounded memory; the map needs no knowledge of the tiling.

    Args:
        fn: maps ``(N, C, h, w)`` to ``(N, C', h, w)`` (same spatial size).
        image: ``(N, C, H, W)`` tensor.
        tile: largest tile side, at least 8.
        overlap: least overlap of neighbouring tiles, in ``[0, tile // 2]``.
        margin: pixels of weight 0 at each inner tile edge, in ``[0, overlap // 2]``; default
            ``overlap // 4``. Tiling is exact for maps with a receptive radius ≤ ``margin``.
        align: tiles start at multiples of ``align``, in ``[1, tile // 2]`` (see
            :func:`tile_starts`): 2 for a map on the half-resolution sub-images of
            ``pixel_unshuffle``, so that every tile groups pixels as the whole image does.
        halo: extra context, an int ≥ 0: ``fn`` gets each tile widened by up to ``halo`` pixels
            on every side (less at the image's edge; rounded up to a multiple of ``align``) and
            only the tile's own pixels of its output are kept. For a map with a known extra reach
            on top of a model whose seams the blending already handles, such as the non-local
            second stage (:class:`equilibria.zoo.denoise_nonlocal.NonLocalStage`, whose
            ``tile_halo`` is its search radius plus half its patch): with ``halo`` at least that
            reach, the stage sees the same neighbourhood as on the whole image.

    Returns:
        ``(N, C', H, W)``, in ``fn``'s output dtype and device.

    Example:
        >>> y = tiled_apply(lambda t: 2 * t, torch.ones(1, 3, 20, 30), tile=16, overlap=4)
        >>> torch.allclose(y, torch.full_like(y, 2.0))
        True
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a tensor (N, C, H, W), got {shape}")
    _check_tiles(tile, overlap, align)
    margin = overlap // 4 if margin is None else margin
    if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= overlap // 2:
        raise ValueError(
            f"margin must be an int in [0, overlap // 2 = {overlap // 2}], got {margin}"
        )
    if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
        raise ValueError(f"halo must be an int ≥ 0, got {halo!r}")
    halo = -(-halo // align) * align  # keep the widened tiles aligned
    ramp = overlap - 2 * margin
    _, _, height, width = image.shape
    rows = tile_starts(height, tile, overlap, align)
    cols = tile_starts(width, tile, overlap, align)
    out: torch.Tensor | None = None
    weight_sum = torch.zeros(height, width, dtype=torch.float64, device=image.device)
    for y in rows:
        h = min(tile, height - y)
        wy = window_1d(h, ramp_start=y > 0, ramp_end=y + h < height, margin=margin, ramp=ramp)
        for x in cols:
            w = min(tile, width - x)
            wx = window_1d(w, ramp_start=x > 0, ramp_end=x + w < width, margin=margin, ramp=ramp)
            y0, x0 = max(0, y - halo), max(0, x - halo)
            y1, x1 = min(height, y + h + halo), min(width, x + w + halo)
            part = image[:, :, y0:y1, x0:x1]  # the tile and its halo
            result = fn(part)  # one tile (and its halo) at a time
            if (
                result.dim() != 4
                or result.shape[0] != image.shape[0]
                or result.shape[2:] != part.shape[2:]
            ):
                raise ValueError(
                    f"fn must map (N, C, h, w) to (N, C', h, w); got {tuple(result.shape)} for a "
                    f"tile of {tuple(part.shape)}"
                )
            result = result[:, :, y - y0 : y - y0 + h, x - x0 : x - x0 + w]
            if out is None:
                shape = (image.shape[0], result.shape[1], height, width)
                out = torch.zeros(shape, dtype=result.dtype, device=result.device)
            window = torch.outer(wy, wx).to(device=image.device)  # (h, w)
            out[:, :, y : y + h, x : x + w] += result * window.to(result.dtype)
            weight_sum[y : y + h, x : x + w] += window
    assert out is not None  # at least one tile
    if not bool((weight_sum > 0).all()):  # the windows above always cover the image
        raise RuntimeError("tiling left pixels without weight; please report this")
    return out / weight_sum.to(device=out.device, dtype=out.dtype)
