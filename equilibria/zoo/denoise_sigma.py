"""Blind estimates of the level of additive white Gaussian noise in an image.

Both estimators work on the finest orthonormal Haar wavelet level of each ``2 × 2`` block
``[[a, b], [c, d]]``: the diagonal detail HH = (a − b − c + d) / 2 and the horizontal and vertical
details LH = (a + b − c − d) / 2, HL = (a − b + c − d) / 2. White noise of level σ gives each of
them N(0, σ²) noise, independent of one another (the transform is orthonormal).

* ``"mad"``: Donoho & Johnstone, "Ideal spatial adaptation by wavelet shrinkage", Biometrika 1994:
  σ = median(|HH|) / 0.6745 over all blocks. Texture and edges leak into HH and bias it upwards on
  detailed images at low σ (+28 % on ``camera`` and +40 % on ``coins`` at σ = 5/255).
* ``"weak-texture"`` (default): the same median over the blocks of weak texture only — the quarter
  of blocks with the smallest LH² + HL² averaged over their 3 × 3 neighbourhood, in the spirit of
  Liu, Tanaka & Okutomi, "Single-image noise level estimation for blind denoising", IEEE TIP 2013
  (estimate where the signal is flat). The selection looks only at LH and HL, whose noise is
  independent of HH's, so it does not bias the noise it keeps. Where many pixels sit at the
  image's minimum or maximum (noise clipped to 0 and 255 when saved as 8 bits) the blocks near
  that value are left out too: clipping removes noise there. Within 10 % on the scikit-image
  images at σ = 15 to 50 (0–255 units), unclipped or clipped and rounded to 8 bits, except pure
  texture (``grass``: +18 % at 15, up to +12 % at 25); at σ = 5 texture and the noise already in
  the photographs bias it up on some (``grass`` +89 %, ``gravel`` +31 %, ``hubble_deep_field``
  +25 %, ``immunohistochemistry`` +10 %; within 10 % on the others).

Colour images (``H × W × C``) are estimated per channel and the channel estimates averaged (the
``denoise`` command's models take one σ for all channels). ``tests/test_denoise_cli.py`` checks
the estimate within 20 % on synthetic Gaussian noise over several images and levels.

:func:`noise_levels` is what every denoising model (and the opponent-colour wrapper) runs its σ
through: a given σ checked, or, for a blind model, this estimate per image, floored at
:data:`MIN_BLIND_SIGMA_255`; the ``denoise`` command floors its whole-image estimate at the same
constant.

Example:
    >>> rng = np.random.default_rng(0)
    >>> clean = np.tile(np.linspace(0, 1, 128), (128, 1))
    >>> noisy = clean + 0.1 * rng.standard_normal(clean.shape)
    >>> round(estimate_sigma(noisy), 2)
    0.1
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["MIN_BLIND_SIGMA_255", "estimate_sigma", "noise_levels"]

# a blind model's σ estimate below this (0-255 units; a clean or flat image can give 0) is raised
# to it: the networks take σ > 0, and were trained on σ >= 5
MIN_BLIND_SIGMA_255 = 0.5

_MAD_TO_SIGMA = 0.6745  # median |N(0, 1)|
_WEAK_FRACTION = 0.25  # share of blocks kept as weak texture
_SATURATED_SHARE = 1e-3  # pixels at the minimum or maximum above which the image counts as clipped
_MIN_BLOCKS = 16  # fewer unsaturated blocks than this: use them all


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim not in (2, 3):
        raise ValueError(
            f"image must be 2-D (H, W) or 3-D (H, W, C), got shape {tuple(image.shape)}"
        )
    if min(image.shape[:2]) < 8:
        raise ValueError(f"image must be at least 8 × 8 pixels, got shape {tuple(image.shape)}")
    if not (np.issubdtype(image.dtype, np.floating) or np.issubdtype(image.dtype, np.integer)):
        raise TypeError(f"image must have a real dtype, got {image.dtype}")
    image = image.astype(np.float64)
    if not np.isfinite(image).all():
        raise ValueError("image has non-finite values (nan or inf)")
    return image


def _haar_details(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The finest Haar details (HH, LH, HL) of an ``(H, W)`` array, each ``(H // 2, W // 2)``."""
    h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
    a, b = x[0:h:2, 0:w:2], x[0:h:2, 1:w:2]
    c, d = x[1:h:2, 0:w:2], x[1:h:2, 1:w:2]
    return (a - b - c + d) / 2.0, (a + b - c - d) / 2.0, (a - b + c - d) / 2.0


def _box3(x: np.ndarray) -> np.ndarray:
    """Mean over each entry's 3 × 3 neighbourhood (edges replicated)."""
    p = np.pad(x, 1, mode="edge")
    h, w = x.shape
    return sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def _sigma_channel(x: np.ndarray, method: str) -> float:
    hh, lh, hl = _haar_details(x)
    sigma_all = float(np.median(np.abs(hh)) / _MAD_TO_SIGMA)
    if method == "mad":
        return sigma_all
    keep = np.ones(hh.shape, dtype=bool)
    # Saturated regions (an 8-bit file clips noise at 0 and 255) look flat but hold less noise:
    # where many pixels sit at the image's extreme value, drop blocks whose local mean lies
    # within 2 σ (the all-block estimate, an upper bound) of it.
    local_mean = _box3((x[0 : 2 * hh.shape[0] : 2, 0 : 2 * hh.shape[1] : 2] + x[1::2, 1::2]) / 2)
    for extreme in (x.min(), x.max()):
        if np.mean(x == extreme) > _SATURATED_SHARE:
            keep &= np.abs(local_mean - extreme) > 2 * sigma_all
    if keep.sum() < _MIN_BLOCKS:
        keep[:] = True
    texture = _box3(lh**2 + hl**2)
    weak = texture <= np.quantile(texture[keep], _WEAK_FRACTION)
    return float(np.median(np.abs(hh[keep & weak])) / _MAD_TO_SIGMA)


def estimate_sigma(
    image: np.ndarray, *, method: Literal["weak-texture", "mad"] = "weak-texture"
) -> float:
    """Estimate the standard deviation of additive white Gaussian noise in ``image``.

    Use it to run a known-σ denoiser blind (``equilibria denoise`` without ``--sigma``).

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array, at least 8 × 8, finite values.
        method: ``"weak-texture"`` (median absolute Haar detail over flat blocks, default) or
            ``"mad"`` (over all blocks, Donoho & Johnstone 1994); see the module docstring.

    Returns:
        σ in the units of ``image`` (the mean of the per-channel estimates for colour images).

    Example:
        >>> estimate_sigma(np.zeros((16, 16)))
        0.0
    """
    if method not in ("weak-texture", "mad"):
        raise ValueError(f"method must be 'weak-texture' or 'mad', got {method!r}")
    image = _check_image(image)
    channels = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[2])]
    return float(np.mean([_sigma_channel(c, method) for c in channels]))


def noise_levels(noisy: Tensor, sigma: Tensor | None, *, blind: bool, hint: str) -> Tensor:
    """The (N,) noise levels a denoiser runs with: ``sigma`` checked, or estimated per image.

    Args:
        noisy: (N, C, H, W) images in [0, 1].
        sigma: (N,) standard deviations in [0, 1] units, or None for a blind model.
        blind: the model estimates σ itself (``sigma`` must then be None): once per image, by
            :func:`estimate_sigma` on all its channels, an
            estimate below :data:`MIN_BLIND_SIGMA_255` / 255 (0 on a noiseless image) raised
            to it.
        hint: how a caller without σ makes its model blind (the error's last words).

    Raises:
        ValueError: ``sigma`` is None for a known-noise model, given for a blind one, of
            another shape than (N,), non-finite or ≤ 0.
        TypeError: ``sigma`` is not a tensor.
    """
    import torch  # here: the module is read by the command before it needs torch

    n = noisy.shape[0]
    if sigma is None:
        if not blind:
            raise ValueError(
                "sigma is required by a known-noise model: pass an (N,) tensor in [0, 1] "
                f"units (σ_255 / 255), or {hint}"
            )
        images = noisy.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).numpy()
        est = [estimate_sigma(im if im.shape[2] > 1 else im[..., 0]) for im in images]
        floor = MIN_BLIND_SIGMA_255 / 255.0
        est = [max(e, floor) for e in est]  # a noiseless image is estimated as σ = 0
        return torch.tensor(est, dtype=noisy.dtype, device=noisy.device)
    if blind:
        raise ValueError(
            "sigma must be None for a blind model (it estimates the noise level itself), "
            f"got a {type(sigma).__name__}"
        )
    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"sigma must be a tensor of shape ({n},) or None, got {type(sigma)}")
    if sigma.shape != (n,):
        raise ValueError(
            f"sigma must have shape ({n},) (one level per image), got {tuple(sigma.shape)}"
        )
    if not bool(torch.isfinite(sigma).all()) or bool((sigma <= 0).any()):
        raise ValueError(f"sigma must be finite and > 0 (in [0, 1] units), got {sigma}")
    return sigma.to(noisy)
