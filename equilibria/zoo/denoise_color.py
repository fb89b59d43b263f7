"""Colour denoising with a grayscale denoiser in an orthonormal opponent colour space.

CBM3D's trick (Dabov, Foi, Katkovnik & Egiazarian, "Color image denoising via sparse 3D
collaborative filtering with grouping constraint in luminance-chrominance space", ICIP 2007):
map RGB to a luminance and two chrominance channels by an *orthonormal* matrix ``A``
(``A Aᵀ = I``), denoise each channel with a grayscale denoiser, and map back with ``Aᵀ``.
Orthonormality is what makes this exact for additive white Gaussian noise: if the RGB noise
``n`` is i.i.d. N(0, σ² I) per pixel, ``A n`` is Gaussian with covariance ``A σ² I Aᵀ = σ² I``,
so the three opponent channels carry i.i.d. noise of the same σ, independent of one another —
the noise model the grey denoiser was trained on. (Non-orthonormal colour spaces such as YCbCr
correlate the channels' noise and give each channel its own level.) Luminance holds most of an
image's structure, the chrominance channels are smooth, so a well-trained grey model can do
better on them than a colour model trained on a handful of colour images
(``docs/recipes/denoise.md``).

The transform (rows of ``A``: luminance, red−blue, green−magenta)::

    Y  = (R + G + B) / √3       ∈ [0, √3]
    C1 = (R − B) / √2           ∈ [−1/√2, 1/√2]
    C2 = (R − 2G + B) / √6      ∈ [−2/√6, 2/√6]

The grey models take images in [0, 1], so each channel is mapped by a *fixed* affine map from
its range over the RGB cube ``[0, 1]³`` to [0, 1], ``x' = (o − lo) / (hi − lo)``, and its noise
level becomes ``σ / (hi − lo)`` (σ/√3, σ/√2 and σ·√6/4); the denoised channel is mapped back
by the inverse. The map is the same for every image and tile (a per-image min/max scaling
would make tiles of one image disagree).

The trick assumes noise independent across R, G and B. A grey image stored as RGB (R = G = B,
the same noise in all three channels) breaks it: the luminance then carries √3 times the noise
level it is given, and the chrominance none (far below the grey model); denoise such an
image's one channel with the grey model, as ``equilibria denoise`` does.

:class:`OpponentColorDenoiser` wraps any of the recipe's grayscale models (DEQ, CNN or
unrolled; :func:`equilibria.zoo.denoise_model.build_model`) and has the colour models' call
signature; ``load_shipped(color=True, color_model="opponent")``
(:mod:`equilibria.zoo.denoise_weights`) wraps the shipped grey DEQ in it.

Example:
    >>> grey = load_shipped(color=False)
    >>> model = OpponentColorDenoiser(grey).eval()
    >>> clean = model(noisy_rgb, torch.full((noisy_rgb.shape[0],), 25 / 255)).clamp(0, 1)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .denoise_sigma import noise_levels

__all__ = ["OPPONENT", "OPPONENT_RANGE", "OpponentColorDenoiser", "from_opponent", "to_opponent"]

# rows: luminance, red - blue, green - magenta; orthonormal (A Aᵀ = I)
OPPONENT = (
    (1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)),
    (1 / math.sqrt(2), 0.0, -1 / math.sqrt(2)),
    (1 / math.sqrt(6), -2 / math.sqrt(6), 1 / math.sqrt(6)),
)
# (lo, hi) of each opponent channel over the RGB cube [0, 1]³
OPPONENT_RANGE = (
    (0.0, math.sqrt(3)),
    (-1 / math.sqrt(2), 1 / math.sqrt(2)),
    (-2 / math.sqrt(6), 2 / math.sqrt(6)),
)


def _matrix(like: Tensor) -> Tensor:
    return torch.tensor(OPPONENT, dtype=like.dtype, device=like.device)


def _affine(like: Tensor) -> tuple[Tensor, Tensor]:
    """(lo, hi − lo) per channel, each (1, 3, 1, 1)."""
    lo = torch.tensor([r[0] for r in OPPONENT_RANGE], dtype=like.dtype, device=like.device)
    span = torch.tensor([r[1] - r[0] for r in OPPONENT_RANGE], dtype=like.dtype, device=like.device)
    return lo.view(1, 3, 1, 1), span.view(1, 3, 1, 1)


def _check_rgb(name: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite values (nan or inf)")
    return x


def _to(rgb: Tensor) -> Tensor:
    lo, span = _affine(rgb)
    return (torch.einsum("ij,njhw->nihw", _matrix(rgb), rgb) - lo) / span


def _from(opp: Tensor) -> Tensor:
    lo, span = _affine(opp)
    return torch.einsum("ji,njhw->nihw", _matrix(opp), opp * span + lo)


def to_opponent(rgb: Tensor) -> Tensor:
    """RGB (N, 3, H, W) in [0, 1] to the opponent channels (Y, C1, C2), each mapped to [0, 1]
    by its fixed affine map (see the module docstring); inverted, to round-off, by
    :func:`from_opponent`.

    Example:
        >>> to_opponent(torch.ones(1, 3, 1, 1)).flatten()  # white: full luminance, no colour
        tensor([1.0000, 0.5000, 0.5000])
    """
    return _to(_check_rgb("rgb", rgb))


def from_opponent(opp: Tensor) -> Tensor:
    """The inverse of :func:`to_opponent`: mapped opponent channels (N, 3, H, W) to RGB."""
    return _from(_check_rgb("opp", opp))


class OpponentColorDenoiser(nn.Module):
    """A grayscale denoiser applied to the three channels of an orthonormal opponent colour
    space (CBM3D's trick; see the module docstring).

    Called as the recipe's colour models are: ``model(noisy, sigma, max_iter=None)`` with
    ``noisy`` (N, 3, H, W) in [0, 1] and ``sigma`` (N,) in [0, 1] units (None when ``blind``).
    The opponent channels of the N images go to the grey model as one batch of 3N grey images
    (image ``i``'s channels at ``3i, 3i + 1, 3i + 2``), each with its own noise level
    σ / (hi − lo); its output is mapped back to RGB (not clipped).

    Blind (``blind = True``, as ``load_shipped(blind=True)`` sets it): σ is estimated once per
    RGB image, by :func:`equilibria.zoo.denoise_sigma.estimate_sigma` on the three channels
    (the mean of their estimates), an estimate below
    :data:`~equilibria.zoo.denoise_sigma.MIN_BLIND_SIGMA_255` / 255 raised to it, as the colour
    models do; the grey model itself runs with known σ.

    Solver statistics: :attr:`deq` is the grey model's equilibrium layer (None for a model
    without one), so ``model.deq.last_solution`` describes the last call's one solve of the
    three channels together: ``nstep`` the iterations of the joint solve (the most any channel
    needed), ``residual`` (3N,) per channel, whose max is the worst of the three.

    Args:
        gray: a grayscale denoiser (``channels == 1`` where it says so), called as
            ``gray(noisy, sigma, max_iter=...)``; it must take σ (not be blind).
        blind: estimate σ from the image (call with ``sigma=None``).

    Raises:
        TypeError: ``gray`` is not an ``nn.Module``; (when called) ``noisy``'s dtype is not that
            of the grey model's parameters (e.g. float64 images into the float32 shipped model).
        ValueError: ``gray`` is not a one-channel model, or is blind.

    Example:
        >>> model = OpponentColorDenoiser(load_shipped(color=False)).eval()
        >>> clean = model(noisy_rgb, torch.full((noisy_rgb.shape[0],), 25 / 255))
        >>> model.deq.last_solution.residual.max()  # the worst of the three channels
    """

    channels = 3

    def __init__(self, gray: nn.Module, *, blind: bool = False) -> None:
        super().__init__()
        if not isinstance(gray, nn.Module):
            raise TypeError(f"gray must be a torch.nn.Module, got {type(gray).__name__}")
        channels = getattr(gray, "channels", 1)
        if channels != 1:
            raise ValueError(
                f"gray must be a one-channel (grayscale) model, got channels={channels}"
            )
        if getattr(gray, "blind", False):
            raise ValueError(
                "gray must be a known-σ model (gray.blind is True): pass blind=True to "
                "OpponentColorDenoiser instead, which estimates σ once on the RGB image"
            )
        self.gray = gray
        self.blind = bool(blind)

    @property
    def deq(self) -> Any:
        """The grey model's equilibrium layer (its ``last_solution``: the three channels' joint
        solve), or None."""
        return getattr(self.gray, "deq", None)

    @property
    def scale(self) -> int:
        """The grey model's ``scale`` (2: it runs on ``pixel_unshuffle`` sub-images; tiles must
        start at even offsets)."""
        return int(getattr(self.gray, "scale", 1))

    @property
    def receptive_field(self) -> int:
        """The grey model's (the colour transform is per pixel)."""
        return int(self.gray.receptive_field)

    @property
    def tile_halo(self) -> int:
        """The grey model's (0 without one; see ``tiled_apply``'s ``halo``)."""
        return int(getattr(self.gray, "tile_halo", 0))

    def _sigma(self, noisy: Tensor, sigma: Tensor | None) -> Tensor:
        return noise_levels(noisy, sigma, blind=self.blind, hint="set blind=True")

    def forward(
        self, noisy: Tensor, sigma: Tensor | None = None, *, max_iter: int | None = None
    ) -> Tensor:
        """The denoised RGB images (N, 3, H, W) (not clipped to [0, 1]).

        Args:
            noisy: (N, 3, H, W) RGB images in [0, 1].
            sigma: (N,) noise standard deviations in [0, 1] units; None when ``blind``.
            max_iter: the grey model's solver budget for this call (passed on as given).
        """
        _check_rgb("noisy", noisy)
        param = next(self.gray.parameters(), None)
        if param is not None and noisy.dtype != param.dtype:
            raise TypeError(
                f"noisy has dtype {noisy.dtype} and the grey model's parameters {param.dtype}: "
                f"pass noisy.to({param.dtype}) or convert the model (e.g. model.double())"
            )
        s = self._sigma(noisy, sigma)
        n, _, h, w = noisy.shape
        _, span = _affine(noisy)
        opp = _to(noisy)  # (N, 3, H, W), each channel mapped to [0, 1]
        levels = (s.view(n, 1) / span.view(1, 3)).reshape(3 * n)  # σ / (hi − lo) per channel
        out = self.gray(opp.reshape(3 * n, 1, h, w), levels, max_iter=max_iter)
        return _from(out.reshape(n, 3, h, w))
