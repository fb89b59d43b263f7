"""Classical denoisers behind one call, the baselines of the ``denoise`` recipe.

``denoise_classical(name, image, sigma)`` runs one of

* ``"nlmeans"``: non-local means (Buades, Coll & Morel, CVPR 2005), scikit-image's
  ``denoise_nl_means`` in its exact (slow) mode, 7 × 7 patches searched over a 13 × 13 window
  (``patch_distance=6``), filter strength ``h = 1.2 σ`` and the noise variance subtracted from
  the patch distances (``sigma=σ``);
* ``"tv"``: total-variation denoising by Chambolle's projection algorithm (J. Math. Imaging Vis.
  2004), ``weight = 0.9 σ``;
* ``"wavelet"``: BayesShrink soft thresholding (Chang, Yu & Vetterli, IEEE TIP 2000) of a ``db2``
  decomposition with σ given, colour in YCbCr;
* ``"bm3d"``: block matching and 3-D filtering (Dabov et al., IEEE TIP 2007) from the ``bm3d``
  package (the ``bench`` extra: ``pip install "equilibria[bench]"``), ``bm3d_rgb`` for colour.

Each setting is the best mean PSNR at σ = 15, 25, 50 (0–255 units) over grey 256² crops of the
training images ``coffee``, ``rocket`` and ``clock`` — never the recipe's held-out images — in a
sweep of NL-means patch 5 or 7 × h 0.8, 1.0, 1.2 σ (skimage's suggested 5 × 5, 0.8 σ is 2.5 dB
lower there), TV weight 0.5–1.3 σ and wavelets db1, db2, sym4, sym8 (``python
benchmarks/denoise_tools.py --sweep`` prints it; ``benchmarks/results/denoise_tools.json``).

The image is a float array ``(H, W)`` or ``(H, W, C)`` (``C`` = 1 or 3) with values in [0, 1]
(noise may push it slightly outside) and σ the noise level in the same units (σ₂₅₅ / 255). The
result has the image's shape, float64, not clipped.

Example:
    >>> rng = np.random.default_rng(0)
    >>> clean = np.tile(np.linspace(0.2, 0.8, 32), (32, 1))
    >>> noisy = clean + 0.1 * rng.standard_normal(clean.shape)
    >>> out = denoise_classical("tv", noisy, 0.1)
    >>> bool(np.abs(out - clean).mean() < np.abs(noisy - clean).mean())
    True
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["CLASSICAL", "denoise_classical"]

CLASSICAL = ("nlmeans", "tv", "wavelet", "bm3d")
"""The names :func:`denoise_classical` accepts."""

_TV_WEIGHT_PER_SIGMA = 0.9
_NLM_H_PER_SIGMA = 1.2


def _check(name: str, image: np.ndarray, sigma: float) -> np.ndarray:
    if name not in CLASSICAL:
        raise ValueError(f"name must be one of {', '.join(CLASSICAL)}, got {name!r}")
    if not isinstance(image, np.ndarray) or not np.issubdtype(image.dtype, np.floating):
        kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise TypeError(f"image must be a float numpy array with values in [0, 1], got {kind}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise ValueError(
            f"image must be (H, W) or (H, W, C) with C 1 or 3, got shape {tuple(image.shape)}"
        )
    if min(image.shape[:2]) < 8:
        raise ValueError(f"image must be at least 8 × 8 pixels, got shape {tuple(image.shape)}")
    if not np.isfinite(image).all():
        raise ValueError("image has non-finite values (nan or inf)")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating)):
        raise TypeError(f"sigma must be a number in (0, 1], got {sigma!r}")
    if not 0.0 < float(sigma) <= 1.0:
        raise ValueError(f"sigma must be in (0, 1] (σ in 0–255 units / 255), got {sigma}")
    return image.astype(np.float64)


def denoise_classical(
    name: Literal["nlmeans", "tv", "wavelet", "bm3d"], image: np.ndarray, sigma: float
) -> np.ndarray:
    """Denoise ``image`` (additive white Gaussian noise of level ``sigma``) with a classical method.

    Use it for baselines: the parameters of each method are set from σ as the module docstring
    says, so every method sees the same information as a known-σ network.

    Args:
        name: ``"nlmeans"``, ``"tv"``, ``"wavelet"`` or ``"bm3d"``.
        image: float ``(H, W)`` or ``(H, W, C)`` array (``C`` = 1 or 3), values in [0, 1],
            at least 8 × 8.
        sigma: noise standard deviation in the image's units, in (0, 1].

    Returns:
        The denoised image, float64, same shape as ``image``.

    Raises:
        ImportError: for ``"bm3d"`` when the ``bm3d`` package is not installed.

    Example:
        >>> denoise_classical("wavelet", np.full((16, 16), 0.5), 0.1).shape
        (16, 16)
    """
    image = _check(name, image, sigma)
    sigma = float(sigma)
    squeeze = image.ndim == 3 and image.shape[2] == 1
    x = image[..., 0] if squeeze else image
    color = x.ndim == 3
    axis = -1 if color else None
    if name == "bm3d":
        try:
            import bm3d
        except ImportError as e:
            raise ImportError(
                "denoise_classical('bm3d', ...) needs the bm3d package: "
                'pip install bm3d (or pip install "equilibria[bench]")'
            ) from e
        out = bm3d.bm3d_rgb(x, sigma) if color else bm3d.bm3d(x, sigma)
    else:
        from skimage import restoration

        if name == "nlmeans":
            out = restoration.denoise_nl_means(
                x,
                patch_size=7,
                patch_distance=6,
                h=_NLM_H_PER_SIGMA * sigma,
                sigma=sigma,
                fast_mode=False,
                preserve_range=True,
                channel_axis=axis,
            )
        elif name == "tv":
            out = restoration.denoise_tv_chambolle(
                x, weight=_TV_WEIGHT_PER_SIGMA * sigma, channel_axis=axis
            )
        else:
            out = restoration.denoise_wavelet(
                x,
                sigma=sigma,
                wavelet="db2",
                mode="soft",
                method="BayesShrink",
                rescale_sigma=True,
                convert2ycbcr=color,
                channel_axis=axis,
            )
    out = np.asarray(out, dtype=np.float64).reshape(x.shape)
    if not np.isfinite(out).all():
        raise FloatingPointError(f"{name} returned non-finite values")
    return out[..., None] if squeeze else out
