"""A non-local second stage for the recipe's denoisers: NL-means of the noisy image, with the
patch similarities measured on a first (pilot) estimate.

BM3D (Dabov, Foi, Katkovnik & Egiazarian, IEEE TIP 2007) runs twice: a first pass gives a pilot
estimate, and the second pass groups similar patches *by their similarity in the pilot* and
filters the noisy image along those groups. Similarities measured on a clean-ish image are far
more reliable than those measured on the noisy one, which is what limits plain NL-means (Buades,
Coll & Morel, CVPR 2005). :class:`NonLocalStage` does the same with the recipe's networks as the
first pass and NL-means as the second:

* pilot ``x̂ = D(y, σ)`` (the shipped DEQ, or any of the recipe's models);
* for every pixel ``p`` and every offset ``q − p`` in a ``(2s + 1)²`` search window, the weight
  ``w(p, q) = exp(−d(p, q) / h²)`` with ``d`` the mean squared difference of the ``k × k``
  patches of the *pilot* around ``p`` and ``q`` (averaged over the channels), and
  ``h² = strength · σ²``;
* the non-local average ``m(p) = Σ_q w(p, q) y(q) / Σ_q w(p, q)`` of the *noisy* image;
* the output ``blend · x̂ + (1 − blend) · m``.

The network sees a receptive field of a few dozen pixels and has ~85k parameters; the second
stage adds self-similarity across the search window, which the network's training images cannot
teach it. It has no trained parameters: ``strength``, ``blend``, the search radius ``s`` and
the patch side ``k`` were chosen on the recipe's validation images
(``benchmarks/denoise_nonlocal_validation.py``; ``docs/recipes/denoise.md``), and
:data:`SHIPPED_STAGE` holds the choice. Iterating the stage with its own output as the next
guide (a fixed point of the guided filter) was tried there and did not help.

Cost: ``(2s + 1)²`` shifted products of the image, done one offset at a time, so memory stays a
few image-sized buffers whatever ``s`` is; about 0.6 CPU s per 256² grey image at ``s = 10``
(``benchmarks/results/denoise.json``: 0.73 s for the shipped DEQ + stage against 0.13 s for the
DEQ).
The stage is differentiable (autograd through the weights and the pilot). With autograd
recording, each row of offsets is checkpointed (recomputed in backward), so a forward and
backward pass of a 256² image also stays near 60 MB, where holding the window's whole graph
would take about 1 GB.

Tiling: the stage reaches ``tile_halo = s + k // 2`` pixels beyond an output pixel, so pass
``halo=model.tile_halo`` (and ``align=model.scale``) to
:func:`equilibria.zoo.denoise_tiling.tiled_apply`, as ``equilibria denoise`` does; without it
the stage sees reflected tile borders and the seams grow.

Example:
    >>> grey = load_shipped(color=False, nonlocal_stage=False)  # the DEQ alone
    >>> model = NonLocalStage(grey, **SHIPPED_STAGE).eval()
    >>> clean = model(noisy, torch.full((noisy.shape[0],), 25 / 255)).clamp(0, 1)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .denoise_sigma import noise_levels

__all__ = ["SHIPPED_STAGE", "NonLocalStage", "guided_nl_means"]

# chosen on the validation images by benchmarks/denoise_nonlocal_validation.py (its JSON's "chosen")
SHIPPED_STAGE: dict[str, Any] = {"strength": 0.15, "blend": 0.3, "search": 10, "patch": 3}


def _check_int(name: str, value: Any, low: int, odd: bool = False) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (odd and value % 2 == 0)
    ):
        allowed = f"an {'odd ' if odd else ''}int ≥ {low}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def _check_unit(name: str, value: Any, low_open: bool) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    if ok:
        ok = (0 < value if low_open else 0 <= value) and (value <= 1 if not low_open else True)
    if not ok:
        allowed = "a finite number > 0" if low_open else "a number in [0, 1]"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def guided_nl_means(
    noisy: Tensor, guide: Tensor, h: Tensor | float, *, search: int = 10, patch: int = 3
) -> Tensor:
    """NL-means of ``noisy`` with patch similarities measured on ``guide`` (see the module
    docstring).

    Args:
        noisy: (N, C, H, W) the image to average.
        guide: (N, C, H, W) the image the similarities are measured on (e.g. a first estimate of
            the clean image); ``guide = noisy`` is plain NL-means.
        h: the filtering parameter, a positive number or an (N,) tensor (one per image), in the
            images' units: weights ``exp(−d / h²)``.
        search: the search window's radius s (a ``(2s + 1)²`` window), an int ≥ 0.
        patch: the patch side k, an odd int ≥ 1.

    Borders are reflected (replicated where the image is not larger than ``search``).

    Raises:
        TypeError: ``noisy`` or ``guide`` is not a floating-point tensor.
        ValueError: shapes differ or are not (N, C, H, W); non-finite values; ``h`` not > 0;
            ``search`` or ``patch`` out of range.

    Example:
        >>> y = clean + 0.1 * torch.randn_like(clean)
        >>> m = guided_nl_means(y, pilot, 0.04, search=7, patch=3)
    """
    for name, x in (("noisy", noisy), ("guide", guide)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = f"a tensor of dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {got}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} has non-finite values (nan or inf)")
    if guide.shape != noisy.shape:
        raise ValueError(
            f"guide must have noisy's shape {tuple(noisy.shape)}, got {tuple(guide.shape)}"
        )
    s = _check_int("search", search, 0)
    k = _check_int("patch", patch, 1, odd=True)
    n, _, height, width = noisy.shape
    out_dtype = noisy.dtype
    # half precision: exp(−d / h²) underflows and 1 / h² overflows for small h; work in float32
    work = torch.promote_types(noisy.dtype, torch.float32)
    noisy, guide = noisy.to(work), guide.to(work)
    if isinstance(h, Tensor):
        if h.shape not in ((n,), ()):
            raise ValueError(f"h must be a number or an ({n},) tensor, got shape {tuple(h.shape)}")
        hv = h.to(device=noisy.device, dtype=work).reshape(-1, 1, 1, 1)
        if not bool(torch.isfinite(hv).all() and (hv > 0).all()):
            raise ValueError(f"h must be finite and > 0, got {h.tolist()}")
    else:
        hv = torch.tensor(_check_unit("h", h, low_open=True), dtype=work, device=noisy.device)
    inv_h2 = 1.0 / hv.square()
    mode = "reflect" if s < min(height, width) else "replicate"
    pad = (s, s, s, s)
    noisy_p = F.pad(noisy, pad, mode=mode) if s else noisy
    guide_p = F.pad(guide, pad, mode=mode) if s else guide
    num = torch.zeros_like(noisy)
    den = torch.zeros_like(noisy[:, :1])
    # with autograd recording, each row of offsets is checkpointed: the graph of the whole window
    # (a few image-sized buffers per offset, 441 offsets at s = 10: a GB for a 256² image) is
    # never held at once; backward recomputes one row at a time
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (noisy, guide, inv_h2))
    for dy in range(2 * s + 1):
        args = (noisy_p, guide_p, guide, inv_h2, dy, 2 * s + 1, k)
        if grad:
            part_num, part_den = checkpoint(_offset_row, *args, use_reentrant=False)
        else:
            part_num, part_den = _offset_row(*args)
        num = num + part_num
        den = den + part_den
    return (num / den).to(out_dtype)


def _offset_row(
    noisy_p: Tensor, guide_p: Tensor, guide: Tensor, inv_h2: Tensor, dy: int, width_o: int, k: int
) -> tuple[Tensor, Tensor]:
    """The weighted sums of one row of offsets (``dy`` fixed, every ``dx``): Σ w·y and Σ w."""
    height, width = guide.shape[-2:]
    num = noisy_p.new_zeros((*noisy_p.shape[:2], height, width))
    den = guide.new_zeros((guide.shape[0], 1, height, width))
    for dx in range(width_o):
        g = guide_p[..., dy : dy + height, dx : dx + width]
        diff = (guide - g).square().mean(dim=1, keepdim=True)
        if k > 1:
            diff = F.avg_pool2d(diff, k, 1, k // 2, count_include_pad=False)
        w = torch.exp(-diff * inv_h2)
        num = num + w * noisy_p[..., dy : dy + height, dx : dx + width]
        den = den + w
    return num, den


class NonLocalStage(nn.Module):
    """A denoiser followed by NL-means of the noisy image guided by its output (see the module
    docstring).

    Called as the recipe's models are: ``model(noisy, sigma, max_iter=None)``, ``noisy``
    (N, C, H, W) in [0, 1] and ``sigma`` (N,) in [0, 1] units (None when ``blind``); returns
    ``blend · pilot + (1 − blend) · guided_nl_means(noisy, pilot, √strength · σ)`` (not clipped).

    Blind (``blind = True``, as ``load_shipped(blind=True)`` sets it): σ is estimated once per
    image (:func:`equilibria.zoo.denoise_sigma.noise_levels`) and used for the pilot and for
    ``h``; the pilot itself runs with that σ.

    Args:
        pilot: the first-pass denoiser (``channels`` 1 or 3), called as
            ``pilot(noisy, sigma, max_iter=...)``; it must take σ (not be blind).
        strength: ``h² / σ²``, a finite number > 0.
        blend: the pilot's share of the output, in [0, 1].
        search: the search window's radius, an int ≥ 0.
        patch: the patch side, an odd int ≥ 1.
        blind: estimate σ from the image (call with ``sigma=None``).

    Attributes ``channels``, ``scale``, ``deq`` (the pilot's equilibrium layer, whose
    ``last_solution`` describes the last call's solve) and ``receptive_field`` (the pilot's plus
    ``2 (search + patch // 2)``) are what the ``denoise`` command and the tiling read.

    Raises:
        TypeError: ``pilot`` is not an ``nn.Module``.
        ValueError: ``pilot`` is blind; an option out of range.
    """

    def __init__(
        self,
        pilot: nn.Module,
        *,
        strength: float = SHIPPED_STAGE["strength"],
        blend: float = SHIPPED_STAGE["blend"],
        search: int = SHIPPED_STAGE["search"],
        patch: int = SHIPPED_STAGE["patch"],
        blind: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(pilot, nn.Module):
            raise TypeError(f"pilot must be a torch.nn.Module, got {type(pilot).__name__}")
        if getattr(pilot, "blind", False):
            raise ValueError(
                "pilot must be a known-σ model (pilot.blind is True): pass blind=True to "
                "NonLocalStage instead, which estimates σ once and gives it to the pilot"
            )
        self.pilot = pilot
        self.strength = _check_unit("strength", strength, low_open=True)
        self.blend = _check_unit("blend", blend, low_open=False)
        self.search = _check_int("search", search, 0)
        self.patch = _check_int("patch", patch, 1, odd=True)
        self.blind = bool(blind)

    @property
    def channels(self) -> int:
        return int(getattr(self.pilot, "channels", 1))

    @property
    def scale(self) -> int:
        """The pilot's ``scale`` (tiles must start at multiples of it)."""
        return int(getattr(self.pilot, "scale", 1))

    @property
    def deq(self) -> Any:
        """The pilot's equilibrium layer, or None."""
        return getattr(self.pilot, "deq", None)

    @property
    def receptive_field(self) -> int:
        """The pilot's, widened by the search window and the patch on each side."""
        return int(self.pilot.receptive_field) + 2 * (self.search + self.patch // 2)

    @property
    def tile_halo(self) -> int:
        """The context a tile needs beyond its own pixels for the stage to see what it sees on
        the whole image: ``search + patch // 2`` (``tiled_apply(..., halo=...)``)."""
        return self.search + self.patch // 2

    def extra_repr(self) -> str:
        return (
            f"strength={self.strength}, blend={self.blend}, search={self.search}, "
            f"patch={self.patch}, blind={self.blind}"
        )

    def forward(
        self, noisy: Tensor, sigma: Tensor | None = None, *, max_iter: int | None = None
    ) -> Tensor:
        """The denoised images (N, C, H, W) (not clipped to [0, 1])."""
        if not isinstance(noisy, Tensor):
            raise TypeError(f"noisy must be a tensor, got {type(noisy).__name__}")
        if noisy.ndim != 4 or noisy.shape[1] != self.channels:
            raise ValueError(
                f"noisy must have shape (N, {self.channels}, H, W), got {tuple(noisy.shape)}"
            )
        s = noise_levels(noisy, sigma, blind=self.blind, hint="set blind=True")
        pilot = self.pilot(noisy, s, max_iter=max_iter)
        if self.blend == 1.0:
            return pilot
        h = math.sqrt(self.strength) * s
        nl = guided_nl_means(noisy, pilot, h, search=self.search, patch=self.patch)
        return self.blend * pilot + (1.0 - self.blend) * nl
