"""The denoising recipe's models: an equilibrium denoiser and its two baselines of equal size.

All three map a noisy image ``y`` (N, C, H, W) in [0, 1] and its noise level σ (N,) in [0, 1]
units to a clean estimate; σ enters as a constant extra input channel (as in FFDNet: Zhang, Zuo
& Zhang, "FFDNet", IEEE TIP 2018), and each network predicts the noise, ``x̂ = y − n̂``
(residual learning, Zhang et al., "Beyond a Gaussian Denoiser" (DnCNN), IEEE TIP 2017).

* :class:`DEQDenoiser`: encoder → equilibrium → decoder. The encoder injects
  ``u = conv(relu(conv([y, σ])))`` (F channels); the state is a feature map z (N, F, H, W), the
  equilibrium of the cell ``f(z) = relu(u + W_b * relu(W_a * z + b_a))`` with W_a, W_b 3×3
  convolutions whose filters are weight-normalised to the fixed norm ``gain`` (computed once per
  forward call, not per iteration). This bounds each filter, not the map's Lipschitz constant:
  the operator norms of the shipped grey model's W_a, W_b are about 2.2 and 2.3 (2.6 and 3.6 for
  the one shipped before it), so contraction is not guaranteed; it is observed at the fixed point
  and the solver reports its residual. The Jacobian penalty the shipped model was trained with
  (``jac_reg``) makes the map strongly contractive there: Jacobian spectral radius 0.08–0.09 at
  the fixed points of the validation crops at σ = 25 (power iteration,
  :func:`equilibria.spectral_radius`; ``benchmarks/results/denoise_convergence.json``), 0.78 for
  the model shipped before, trained without it; hence its solves of 3–4 iterations. The
  decoder reads ``n̂ = conv(relu(conv(z*)))``. Solved by Anderson acceleration, trained with the
  implicit gradient or a phantom gradient (Chen, Wang, Geng et al., "Equilibrium Image Denoising
  With Implicit Differentiation", IEEE TIP 2023, solve the noise features of a denoiser as such
  a fixed point; Gilton, Ongie & Willett, "Deep Equilibrium Architectures for Inverse Problems
  in Imaging", IEEE TCI 2021). More solver iterations at test time refine the same fixed point
  (anytime behaviour).
  With ``scale=2`` (the shipped models) encoder, equilibrium and decoder run on the four
  half-resolution sub-images of ``pixel_unshuffle`` with σ as a fifth channel, and the noise
  is reassembled with ``pixel_shuffle`` (FFDNet's trick): a solver iteration costs a quarter,
  so at an equal CPU budget the DEQ trains on more patches (``docs/recipes/denoise.md``).
  With ``full_res_width`` R > 0 (the shipped grey model: R = 12, three convolutions; without the
  Jacobian penalty its solves did not meet the convergence rule of ``docs/recipes/denoise.md``)
  the decoder's one convolution gives 4R
  channels instead, ``pixel_shuffle`` makes them R full-resolution features, and a small
  full-resolution network reads the noise from them beside ``[y, σ]``
  (:class:`FullResolutionHead`): the equilibrium stays at half resolution, the pixel-level
  detail that low noise levels need comes back at full resolution.
* :class:`UnrolledDenoiser`: the same encoder, cell and decoder (the same parameters), the
  cell applied exactly K times from z = 0 and trained by backpropagation through the K steps.
* :class:`CNNDenoiser`: DnCNN-style plain network ``conv → (relu conv)×L → relu conv`` without
  batch normalisation (which would make the output depend on the batch and the tile); with
  L = 4 and the same width it has the full-resolution DEQ's parameter count to 0.1 % (84,481
  vs 84,433); the shipped half-resolution DEQ (``scale=2``, width 47, the full-resolution path
  R = 12 with three convolutions) has 85,192, 0.8 % more, and 83,523 without the path (the
  design shipped before it), 1.1 % fewer.

:func:`equilibria.zoo.denoise_weights.load_shipped` loads the trained models shipped in
``equilibria/zoo/weights``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import equilibria as eq

# MIN_BLIND_SIGMA_255 is defined with the σ checks, re-exported here where it was first defined
from .denoise_sigma import MIN_BLIND_SIGMA_255, noise_levels

if TYPE_CHECKING:
    from .denoise import DenoiseConfig

__all__ = [
    "MIN_BLIND_SIGMA_255",
    "CNNDenoiser",
    "DEQDenoiser",
    "DenoiserCell",
    "FullResolutionHead",
    "UnrolledDenoiser",
    "build_model",
]


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class DenoiserCell(nn.Module):
    """f(z, (u, W_a, W_b)) = relu(u + W_b * relu(W_a * z + b_a)) on (N, F, H, W) features.

    The normalised weights come in with the injection (see :meth:`weights`), so they are
    computed once per forward call.

    Args:
        width: channels F.
        gain: norm of every 3×3 filter of W_a and W_b (smaller: more contractive).
    """

    def __init__(self, width: int, gain: float) -> None:
        super().__init__()
        self.direction_a = nn.Parameter(torch.empty(width, width, 3, 3))
        self.direction_b = nn.Parameter(torch.empty(width, width, 3, 3))
        self.bias_a = nn.Parameter(torch.zeros(width))
        for v in (self.direction_a, self.direction_b):
            nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.gain = gain

    def weights(self) -> tuple[Tensor, Tensor]:
        """(W_a, W_b) = gain · V / ||V|| per output filter, each (F, F, 3, 3)."""

        def unit(v: Tensor) -> Tensor:
            return v / torch.linalg.vector_norm(v.flatten(1), dim=1).view(-1, 1, 1, 1)

        return self.gain * unit(self.direction_a), self.gain * unit(self.direction_b)

    def forward(self, z: Tensor, x: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        u, w_a, w_b = x
        h = F.relu(F.conv2d(z, w_a, self.bias_a, padding=1))  # (N, F, H, W)
        return F.relu(u + F.conv2d(h, w_b, padding=1))


class _Denoiser(nn.Module):
    """Shared input handling: validation, the σ channel, residual output, blind mode."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (colour), got {channels}")
        self.channels = channels
        # blind: the model estimates σ itself (sigma must be None); see load_shipped
        self.blind = False
        # the network runs on the scale² sub-images of pixel_unshuffle (FFDNet); see DEQDenoiser
        self.scale = 1
        # the full-resolution path after pixel_shuffle (full_res_width > 0); see FullResolutionHead
        self.head: FullResolutionHead | None = None

    @property
    def receptive_field(self) -> int:
        """Side in pixels of the square of input pixels that one output pixel depends on (a
        bound)."""
        head = 0 if self.head is None else self.head.radius
        return 1 + 2 * (self.scale * self._radius() + self.scale - 1 + head)

    def _radius(self) -> int:
        raise NotImplementedError

    def _noise(self, inputs: Tensor, max_iter: int | None) -> Tensor:
        raise NotImplementedError

    def _sigma(self, noisy: Tensor, sigma: Tensor | None) -> Tensor:
        return noise_levels(noisy, sigma, blind=self.blind,
                            hint="load the model blind (load_shipped(blind=True))")  # fmt: skip

    def forward(
        self, noisy: Tensor, sigma: Tensor | None = None, *, max_iter: int | None = None
    ) -> Tensor:
        """The denoised images ``y − n̂``, (N, C, H, W) (not clipped to [0, 1]).

        Args:
            noisy: (N, C, H, W) images in [0, 1] (C = ``channels``).
            sigma: (N,) noise standard deviations in [0, 1] units; None for a blind model.
            max_iter: the equilibrium solve's iteration budget for this call (DEQ only).
        """
        if not isinstance(noisy, Tensor):
            raise TypeError(f"noisy must be a tensor, got {type(noisy).__name__}")
        if noisy.ndim != 4 or noisy.shape[1] != self.channels:
            raise ValueError(
                f"noisy must have shape (N, {self.channels}, H, W), got {tuple(noisy.shape)}"
            )
        if not bool(torch.isfinite(noisy).all()):
            raise ValueError("noisy has non-finite values (nan or inf)")
        param = next(self.parameters(), None)
        if param is not None and noisy.dtype != param.dtype:  # e.g. skimage's float64 images
            raise TypeError(
                f"noisy has dtype {noisy.dtype} and the model's parameters {param.dtype}: "
                f"pass noisy.to({param.dtype}) or convert the model (e.g. model.double())"
            )
        s = self._sigma(noisy, sigma)
        k = self.scale
        if k == 1:
            level = s.view(-1, 1, 1, 1).expand(-1, 1, *noisy.shape[2:])  # (N, 1, H, W)
            return noisy - self._noise(torch.cat([noisy, level], dim=1), max_iter)
        h, w = noisy.shape[2:]
        padded = F.pad(noisy, (0, -w % k, 0, -h % k), mode="replicate")
        low = F.pixel_unshuffle(padded, k)  # (N, C k², H / k, W / k): the k² sub-images
        level = s.view(-1, 1, 1, 1).expand(-1, 1, *low.shape[2:])
        noise = F.pixel_shuffle(self._noise(torch.cat([low, level], dim=1), max_iter), k)
        if self.head is not None:  # noise holds R full-resolution feature channels
            level = s.view(-1, 1, 1, 1).expand(-1, 1, *padded.shape[2:])
            noise = self.head(noise, torch.cat([padded, level], dim=1))
        return noisy - noise[..., :h, :w]


class FullResolutionHead(nn.Module):
    """The full-resolution path of a half-resolution model (``full_res_width`` R > 0).

    The decoder's last convolution gives R · scale² half-resolution channels, ``pixel_shuffle``
    turns them into R full-resolution feature channels d, and ``layers`` full-resolution 3×3
    convolutions (width R, the last one to C) read the noise from them beside the noisy image
    and its σ: ``n̂ = conv(relu(conv([relu(d), y, σ])))`` for two layers. The equilibrium stays
    at half resolution (a quarter of the cost per iteration); this path restores the pixel-level
    detail that the sub-images lose (cf. the upsampling decoders of U-Net-style denoisers such
    as DRUNet: Zhang et al., "Plug-and-Play Image Restoration with Deep Denoiser Prior", IEEE
    TPAMI 2022).

    Args:
        channels: image channels C (1 or 3).
        width: full-resolution feature channels R.
        layers: full-resolution 3×3 convolutions (at least 1).
    """

    def __init__(self, channels: int, width: int, layers: int = 2) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        cin = width + channels + 1
        for _ in range(layers - 1):
            mods += [_conv(cin, width), nn.ReLU()]
            cin = width
        self.net = nn.Sequential(*mods, _conv(cin, channels))
        self.radius = layers  # in full-resolution pixels

    def forward(self, features: Tensor, inputs: Tensor) -> Tensor:
        """The noise (N, C, H, W) from ``features`` (N, R, H, W) and ``[y, σ]`` (N, C + 1, H, W)."""
        return self.net(torch.cat([F.relu(features), inputs], dim=1))


def _decoder(
    width: int,
    channels: int,
    scale: int,
    full_res_width: int,
    full_res_layers: int = 2,
    full_res_kernel: int = 3,
) -> tuple[nn.Sequential, FullResolutionHead | None]:
    """The decoder of the DEQ and the unrolled net, and the full-resolution head if any.

    Without the head (``full_res_width`` 0): ``conv(relu(conv(z)))`` to the C · scale² noise
    channels. With it: one half-resolution convolution (``full_res_kernel`` 3 or 1) to
    R · scale² channels, which become the head's R full-resolution features, read by its
    ``full_res_layers`` convolutions (see :class:`FullResolutionHead`).
    """
    for name, value in (
        ("full_res_width", full_res_width),
        ("full_res_layers", full_res_layers),
        ("full_res_kernel", full_res_kernel),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if full_res_width < 0 or (full_res_width and scale != 2):
        raise ValueError(
            f"full_res_width must be 0, or > 0 with scale 2 (a full-resolution path after the "
            f"half-resolution network), got {full_res_width} with scale {scale}"
        )
    if full_res_layers < 1:
        raise ValueError(f"full_res_layers must be >= 1, got {full_res_layers}")
    if full_res_kernel not in (1, 3):
        raise ValueError(f"full_res_kernel must be 1 or 3, got {full_res_kernel}")
    if not full_res_width:
        decode = nn.Sequential(_conv(width, width), nn.ReLU(), _conv(width, channels * scale**2))
        return decode, None
    up = nn.Conv2d(width, full_res_width * scale**2, full_res_kernel, padding=full_res_kernel // 2)
    return nn.Sequential(up), FullResolutionHead(channels, full_res_width, full_res_layers)


class DEQDenoiser(_Denoiser):
    """The equilibrium denoiser (see the module docstring).

    Args:
        channels: 1 (grayscale) or 3 (colour).
        width: feature channels F.
        gain: filter norm of the cell's convolutions.
        solver: forward solver object.
        backward: backward method object.
        tol: training tolerance (relative residual); max_iter: training budget.
        eval_tol, eval_max_iter: the same in eval mode.
        scale: 1, or 2 to run encoder, equilibrium and decoder on the four half-resolution
            sub-images of ``pixel_unshuffle`` (with σ as a fifth channel) and reassemble the
            noise with ``pixel_shuffle``, as FFDNet does (Zhang, Zuo & Zhang, IEEE TIP 2018):
            each solver iteration then costs a quarter. Odd sizes are padded by one replicated
            row / column, cropped from the output.
        full_res_width: 0 (no path: the decoder gives the noise of the sub-images; the shipped
            colour DEQ and the grey DEQ shipped before), or R > 0 with ``scale=2`` (the shipped
            grey DEQ: 12, with 3 convolutions): the decoder gives R full-resolution feature
            channels
            (through ``pixel_shuffle``) that a full-resolution path reads beside ``[y, σ]``
            (:class:`FullResolutionHead`); the equilibrium stays at half resolution.
        full_res_layers: the full-resolution path's 3×3 convolutions (default 2).
        full_res_kernel: kernel (3 or 1) of the half-resolution convolution before
            ``pixel_shuffle`` that makes the path's R · 4 channels.

    Example:
        >>> model = DEQDenoiser(1, width=48, gain=0.5, solver=eq.Anderson(), backward=eq.Implicit())
        >>> clean = model(noisy, torch.full((n,), 25 / 255))
        >>> model.deq.last_solution.residual  # per image, relative
    """

    def __init__(
        self,
        channels: int,
        *,
        width: int,
        gain: float,
        solver: eq.Solver,
        backward: eq.Backward,
        tol: float,
        max_iter: int,
        eval_tol: float,
        eval_max_iter: int,
        scale: int = 1,
        full_res_width: int = 0,
        full_res_layers: int = 2,
        full_res_kernel: int = 3,
    ) -> None:
        super().__init__(channels)
        self.scale = _check_scale(scale)
        sub = channels * scale**2
        self.encode = nn.Sequential(_conv(sub + 1, width), nn.ReLU(), _conv(width, width))
        self.deq = eq.DEQ(
            DenoiserCell(width, gain),
            solver=solver,
            backward=backward,
            tol=tol,
            max_iter=max_iter,
            eval_tol=eval_tol,
            eval_max_iter=eval_max_iter,
            init=_zeros_like_injection,
        )
        self.decode, self.head = _decoder(
            width, channels, self.scale, full_res_width, full_res_layers, full_res_kernel
        )

    def _radius(self) -> int:
        # 2 encoder convs, 2 per solver iteration (eval budget), the decoder's convs; Anderson
        # mixes earlier iterates, so the bound holds for it too
        return 2 + 2 * self.deq.eval_max_iter + _convs(self.decode)

    def injection(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(u, W_a, W_b) for the cell from ``[y, σ]`` (N, C + 1, H, W)."""
        return (self.encode(inputs), *self.deq.cell.weights())

    def _noise(self, inputs: Tensor, max_iter: int | None) -> Tensor:
        return self.decode(self.deq(self.injection(inputs), max_iter=max_iter))


class UnrolledDenoiser(_Denoiser):
    """The weight-tied unrolled baseline: the DEQ's encoder, cell and decoder, the cell applied
    ``steps`` times from z = 0, trained through the steps (same parameters as the DEQ).

    Args:
        channels: 1 or 3.
        width: feature channels F.
        gain: filter norm of the cell's convolutions.
        steps: K, the number of cell applications.
        scale: as the DEQ's (1, or 2: half-resolution sub-images).
        full_res_width, full_res_layers, full_res_kernel: as the DEQ's (the same decoder and
            full-resolution path).
    """

    def __init__(
        self,
        channels: int,
        *,
        width: int,
        gain: float,
        steps: int,
        scale: int = 1,
        full_res_width: int = 0,
        full_res_layers: int = 2,
        full_res_kernel: int = 3,
    ) -> None:
        super().__init__(channels)
        self.scale = _check_scale(scale)
        sub = channels * scale**2
        self.encode = nn.Sequential(_conv(sub + 1, width), nn.ReLU(), _conv(width, width))
        self.cell = DenoiserCell(width, gain)
        self.decode, self.head = _decoder(
            width, channels, self.scale, full_res_width, full_res_layers, full_res_kernel
        )
        self.steps = steps

    def _radius(self) -> int:
        return 2 + 2 * self.steps + _convs(self.decode)

    def _noise(self, inputs: Tensor, max_iter: int | None) -> Tensor:
        if max_iter is not None:
            raise ValueError("max_iter is an option of the DEQ denoiser, not the unrolled one")
        x = (self.encode(inputs), *self.cell.weights())
        z = torch.zeros_like(x[0])
        for _ in range(self.steps):
            z = self.cell(z, x)
        return self.decode(z)


class CNNDenoiser(_Denoiser):
    """DnCNN-style baseline: ``conv([y, σ]) → (relu conv)×layers → relu conv → n̂``.

    Args:
        channels: 1 or 3.
        width: feature channels.
        layers: hidden width×width convolutions.
    """

    def __init__(self, channels: int, *, width: int, layers: int) -> None:
        super().__init__(channels)
        mods: list[nn.Module] = [_conv(channels + 1, width)]
        for _ in range(layers):
            mods += [nn.ReLU(), _conv(width, width)]
        mods += [nn.ReLU(), _conv(width, channels)]
        self.net = nn.Sequential(*mods)
        self.layers = layers

    def _radius(self) -> int:
        return self.layers + 2

    def _noise(self, inputs: Tensor, max_iter: int | None) -> Tensor:
        if max_iter is not None:
            raise ValueError("max_iter is an option of the DEQ denoiser, not the CNN")
        return self.net(inputs)


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale not in (1, 2):
        raise ValueError(f"scale must be 1 or 2 (pixel_unshuffle factor), got {scale!r}")
    return scale


def _convs(net: nn.Sequential) -> int:
    """The radius in pixels that the convolutions of ``net`` add (1 per 3×3, 0 per 1×1)."""
    return sum(m.kernel_size[0] // 2 for m in net if isinstance(m, nn.Conv2d))


def _zeros_like_injection(x: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    return torch.zeros_like(x[0])


def make_solver(config: DenoiseConfig) -> eq.Solver:
    """The forward solver named by ``config.solver``."""
    if config.solver == "anderson":
        return eq.Anderson(m=config.anderson_m)
    return eq.Picard()


def make_backward(config: DenoiseConfig) -> eq.Backward:
    """The backward method named by ``config.backward``."""
    if config.backward == "implicit":
        return eq.Implicit(
            solver=make_solver(config), tol=config.implicit_tol, max_iter=config.implicit_max_iter
        )
    return eq.Phantom(steps=config.phantom_steps, damping=config.phantom_damping)


def build_model(config: DenoiseConfig) -> _Denoiser:
    """A freshly initialised model of ``config.model`` (seeded by ``config.seed``)."""
    torch.manual_seed(config.seed)
    channels = 3 if config.color else 1
    model: _Denoiser
    if config.model == "deq":
        model = DEQDenoiser(
            channels,
            width=config.width,
            gain=config.gain,
            solver=make_solver(config),
            backward=make_backward(config),
            tol=config.tol,
            max_iter=config.max_iter,
            eval_tol=config.eval_tol,
            eval_max_iter=config.eval_max_iter,
            scale=config.scale,
            full_res_width=config.full_res_width,
            full_res_layers=config.full_res_layers,
            full_res_kernel=config.full_res_kernel,
        )
    elif config.model == "unrolled":
        model = UnrolledDenoiser(
            channels,
            width=config.width,
            gain=config.gain,
            steps=config.unroll_steps,
            scale=config.scale,
            full_res_width=config.full_res_width,
            full_res_layers=config.full_res_layers,
            full_res_kernel=config.full_res_kernel,
        )
    else:
        model = CNNDenoiser(channels, width=config.width, layers=config.cnn_layers)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    return model.to(dtype)
