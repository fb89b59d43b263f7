"""The colorize recipe's model, its fusion blocks, the gradient-conflict probe and image metrics.

The network follows the layout of SCFT (Lee et al., CVPR 2020) and of SGA's released code at a
CPU scale: a line-art encoder and a reference encoder (conv–BatchNorm–LeakyReLU blocks, as in
both papers' encoders) map their images to ``C × H/4 × W/4`` feature grids, a cross-attention
*fusion* lets every line-art token X (query) read colour from the reference tokens Y (keys and
values), and a decoder with skip connections from the line-art encoder paints the image. The
fusion is one of

* ``standard``: SCFT's block, ``Z = softmax((W_q X)(W_k Y)ᵀ/√C) W_v Y + X`` (learned Q/K/V,
  the gradient flows through the map; one block, as SCFT and the paper's SCFT baseline);
* ``sga``: stop-gradient attention (:class:`equilibria.layers.StopGradientAttention`) as in
  the paper and its code (Li et al., "Eliminating Gradient Conflict in Reference-based Line-Art
  Colorization", ECCV 2022): a *cross*-SGA block ``Z = Norm(A σ(W_v Y) + σ(W_x X)) + X`` with
  ``A = colnorm(softmax(X Yᵀ))`` computed without gradient, followed by a *self*-SGA block on Z
  (the same with Y = X = Z). The map is unscaled, as in the released code
  (``softmax(X Yᵀ)`` then an L1 normalisation over the queries);
* ``learned_map``: the same two SGA blocks with learned Q/K and the gradient through the maps
  (the layer's ``attention="standard"``): ``sga`` but for the stop-gradient.

Gradient conflict (the paper's diagnosis, section 3), measured at the block where X and Y
enter (SCFT's block, or the cross-SGA block). The block uses its input X twice: in the
attention map (as queries) and in the skip path (``σ(W_x X) + X``, or ``+ X`` for SCFT); and Y
twice: in the map (keys) and as values. During training the model feeds each use its own copy
(``X_map``, ``X_skip``, ``Y_map``, ``Y_value``; the same numbers, so the loss and every
gradient are unchanged), so that one backward pass yields the gradient through each path
separately: ``∂L/∂X = ∂L/∂X_map + ∂L/∂X_skip``. The logged conflict is the mean over tokens of

    conflict_x = cos(∂L/∂X_map[b, n, :], ∂L/∂X_skip[b, n, :]),
    conflict_y = cos(∂L/∂Y_map[b, m, :], ∂L/∂Y_value[b, m, :]),

with the cosine of a zero vector taken as 0 (the paper's code logs each branch against the
total gradient instead; the issue asks for branch against branch). SGA's map passes no
gradient, so its applied ``∂L/∂X_map`` is zero and its conflict 0. ``probe_conflict_x/y``
measure for SGA the gradient its map *would* pass at the same weights and inputs (the map
recomputed with gradient from detached copies of X and Y and added as an exact zero,
``(A − stopgrad(A)) · stopgrad(V)``, so training is bitwise unchanged); for the other blocks
they equal the applied conflict.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equilibria._validate import check_int
from equilibria.layers import StopGradientAttention, attention_map, stop_gradient_attention

FusionName = Literal["standard", "sga", "learned_map"]
FUSIONS = ("standard", "sga", "learned_map")
CONFLICT_KEYS = ("conflict_x", "conflict_y", "probe_conflict_x", "probe_conflict_y")


SGA_SCALE = 1.0  # SGA's code builds its map as softmax(X Yᵀ), without a 1/√C


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """SCFT's and SGA's ConvBlock: 3×3 convolution, BatchNorm, LeakyReLU(0.2)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU(0.2))  # fmt: skip


class SCFTFusion(nn.Module):
    """SCFT's fusion block: ``Z = softmax(s (W_q X)(W_k Y)ᵀ) W_v Y + X``, s = 1/√C."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Linear(channels, channels)  # W_q
        self.key = nn.Linear(channels, channels)  # W_k
        self.value = nn.Linear(channels, channels)  # W_v
        self.scale = 1.0 / math.sqrt(channels)

    def branches(
        self,
        x_map: Tensor,
        x_skip: Tensor,
        y_map: Tensor,
        y_value: Tensor,
        probe: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The block with each use of X and Y given separately (all (B, ·, C)); ``probe`` is
        unused (the map's gradient is applied)."""
        a = attention_map(self.query(x_map), self.key(y_map), scale=self.scale, column_norm=False)
        return torch.bmm(a, self.value(y_value)) + x_skip  # (B, N, C)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.branches(x, x, y, y)

    def row_map(self, x: Tensor, y: Tensor) -> Tensor:
        """The block's attention map, (B, N, M), each row a distribution over the M keys."""
        return attention_map(self.query(x), self.key(y), scale=self.scale, column_norm=False)


class SGAFusion(nn.Module):
    """SGA's fusion: a cross-attention block, then a self-attention block on its output, each a
    :class:`~equilibria.layers.StopGradientAttention` (which holds the parameters), as in the
    paper's code (its ``GNN``: ``gcn3`` on (sketch, reference), then ``gcn4`` on (Z, Z)).

    ``branches`` reproduces the cross block's ``forward`` with each use of X and Y separable.

    Args:
        channels: C.
        attention: the layer's ``attention``: ``"stop_gradient"`` (SGA) or ``"standard"``
            (learned Q/K, the gradient through the map).
        scale: the maps' logit scale (SGA's code: 1, no scaling).
    """

    def __init__(
        self,
        channels: int,
        attention: Literal["stop_gradient", "standard"],
        scale: float = SGA_SCALE,
    ) -> None:
        super().__init__()
        self.block = StopGradientAttention(channels, attention=attention, scale=scale)  # cross
        self.self_block = StopGradientAttention(channels, attention=attention, scale=scale)

    def branches(
        self,
        x_map: Tensor,
        x_skip: Tensor,
        y_map: Tensor,
        y_value: Tensor,
        probe: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The self block on ``Norm(A σ(W_v Y_value) + σ(W_x X_skip)) + X_skip``, A from
        (X_map, Y_map).

        ``probe``: detached (X, Y) copies that require grad; with the stop-gradient map, the
        cross block's map is recomputed from them with gradient and added as an exact zero, so
        their ``.grad`` is the gradient that map would pass."""
        b = self.block
        value = b.act(b.value(y_value))  # σ(W_v Y), (B, M, C)
        if b.query is None:
            attended = stop_gradient_attention(
                x_map, y_map, value, scale=b.scale, column_norm=b.column_norm
            )
            if probe is not None:
                a = attention_map(*probe, scale=b.scale, column_norm=b.column_norm)
                attended = attended + torch.bmm(a - a.detach(), value.detach())
        else:
            a = attention_map(b.query(x_map), b.key(y_map), scale=b.scale,
                              column_norm=b.column_norm)  # fmt: skip
            attended = torch.bmm(a, value)
        return self.self_block(b.norm(attended + b.act(b.skip(x_skip))) + x_skip)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.self_block(self.block(x, y))

    def row_map(self, x: Tensor, y: Tensor) -> Tensor:
        """The cross block's row softmax, (B, N, M) (before SGA's normalisation over the
        queries), each row a distribution over the M keys."""
        b = self.block
        q, k = (x, y) if b.query is None else (b.query(x), b.key(y))
        return attention_map(q, k, scale=b.scale, column_norm=False)


def make_fusion(name: FusionName, channels: int) -> nn.Module:
    """The fusion block ``name`` (one of :data:`FUSIONS`) on ``channels`` channels."""
    if name == "standard":
        return SCFTFusion(channels)
    if name in ("sga", "learned_map"):
        return SGAFusion(channels, "stop_gradient" if name == "sga" else "standard")
    raise ValueError(f"fusion must be one of {FUSIONS}, got {name!r}")


def token_cosine(a: Tensor, b: Tensor) -> float:
    """Mean over (batch, token) of the cosine between ``a[b, n, :]`` and ``b[b, n, :]``; a zero
    vector's cosine is 0."""
    dot = (a * b).sum(-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    cos = torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
    return float(cos.mean())


class ResidualBlock(nn.Module):
    """SGA's code's ResBlock: ``x + BN(conv(ReLU(BN(conv(x)))))`` with 3×3 convolutions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, 1, 1), nn.BatchNorm2d(channels),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x) + x


class Colorizer(nn.Module):
    """Line-art encoder + reference encoder → fusion block → decoder (SCFT's layout, small).

    Args:
        fusion: the fusion block, one of :data:`FUSIONS`.
        channels: C, channels of the encoders' last stages.
        width: channels of the encoders' first stage (the second has ``2 * width``).
        post_blocks: residual blocks after the fusion (SGA's code: 4, its ``ResBlockNet``, with
            a residual around them), whose output is concatenated with the fusion's before the
            decoder, as the code's generator does; 0 (the default): the fusion's output goes
            straight to the decoder's first convolution.
        multi_level: the tokens are every encoder stage's features, average-pooled to the
            H/4 grid and concatenated (SGA's and SCFT's encoders: 10 stages, 992 channels), so
            the fusion works on ``width + 2 * width + 2 * channels`` channels; False (the
            default): the last stage's C channels only.
    """

    def __init__(
        self,
        fusion: FusionName,
        channels: int = 32,
        width: int = 16,
        *,
        post_blocks: int = 0,
        multi_level: bool = False,
    ) -> None:
        super().__init__()
        check_int("post_blocks", post_blocks, minimum=0)
        if not isinstance(multi_level, bool):
            raise TypeError(f"multi_level must be a bool, got {multi_level!r}")
        c, w = channels, width
        self.line1, self.line2 = _conv(1, w), _conv(w, 2 * w, 2)  # H, H/2
        self.line3 = nn.Sequential(_conv(2 * w, c, 2), _conv(c, c))  # H/4
        # the same layout for the reference; like SCFT's and SGA's encoders, every stage ends
        # in BatchNorm and LeakyReLU, so the tokens entering the parameter-free SGA map have a
        # trained, normalised scale (a bare last convolution gave tokens of norm about 2 and a
        # uniform map: row entropy log M at 1/√C)
        self.ref = nn.Sequential(_conv(3, w), _conv(w, 2 * w, 2), _conv(2 * w, c, 2),
                                 _conv(c, c))  # fmt: skip
        self.multi_level = multi_level
        tokens = w + 2 * w + 2 * c if multi_level else c  # channels of X and Y
        self.fusion = make_fusion(fusion, tokens)
        self.fusion_name = fusion
        self.post = (
            nn.Sequential(*(ResidualBlock(tokens) for _ in range(post_blocks)))
            if post_blocks
            else None
        )
        self.mid = _conv(2 * tokens if post_blocks else tokens, c)
        self.up2 = _conv(c + 2 * w, 2 * w)  # at H/2, with the line art's features
        self.up1 = _conv(2 * w + w, w)  # at H
        self.out = nn.Conv2d(w, 3, 3, 1, 1)
        self.grads: dict[str, Tensor] = {}  # filled by the probe's hooks during backward

    def encode(
        self, line: Tensor, reference: Tensor
    ) -> tuple[Tensor, Tensor, list[Tensor], torch.Size]:
        """The fusion's inputs X (B, N, T) and Y (B, M, T), the line-art encoder's features at
        H and H/2 (the decoder's skips) and the token grid's (H/4, W/4)."""
        f1 = self.line1(line)  # (B, w, H, W)
        f2 = self.line2(f1)  # (B, 2w, H/2, W/2)
        if not self.multi_level:
            x = self.line3(f2)  # (B, C, H/4, W/4)
            y = self.ref(reference)
            return x.flatten(2).mT, y.flatten(2).mT, [f1, f2], x.shape[-2:]
        line_stages = [f1, f2]
        for stage in self.line3:
            line_stages.append(stage(line_stages[-1]))
        ref_stages = [reference]
        for stage in self.ref:
            ref_stages.append(stage(ref_stages[-1]))
        x, y = _pooled_concat(line_stages), _pooled_concat(ref_stages[1:])
        return x.flatten(2).mT, y.flatten(2).mT, [f1, f2], x.shape[-2:]

    def forward(self, line: Tensor, reference: Tensor, *, probe: bool = False) -> Tensor:
        """line (B, 1, H, W), reference (B, 3, H, W) → colours (B, 3, H, W) in (0, 1).

        With ``probe`` each use of the fusion input gets its own copy whose gradient is kept
        in :attr:`grads` during the next backward (see :meth:`conflict`)."""
        x, y, (f1, f2), grid = self.encode(line, reference)  # (B, N, T), (B, M, T)
        if probe:
            self.grads = {}
            z = probed_fusion(self.fusion, x, y, self.grads, probe_map=self.fusion_name == "sga")
        else:
            z = self.fusion(x, y)
        z = z.mT.reshape(*z.shape[::2], *grid)  # (B, T, H/4, W/4)
        if self.post is not None:  # SGA's code: cat(ResBlocks(Z) + Z, Z)
            z = torch.cat([self.post(z) + z, z], 1)
        z = self.mid(z)  # (B, C, H/4, W/4)
        h = F.interpolate(z, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        h = self.up2(torch.cat([h, f2], 1))
        h = F.interpolate(h, size=f1.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(self.up1(torch.cat([h, f1], 1))))

    def map_entropy(self, line: Tensor, reference: Tensor) -> Tensor:
        """Per-image mean over queries of the entropy of the fusion's (cross) attention row,
        divided by log M: 1 for a uniform map (every token reads the reference's mean colour),
        0 for one key per query. (B,)"""
        x, y, _, _ = self.encode(line, reference)
        a = self.fusion.row_map(x, y)  # type: ignore[operator]
        entropy = -(a * a.clamp_min(torch.finfo(a.dtype).tiny).log()).sum(-1).mean(-1)
        return entropy / math.log(a.shape[-1])

    def conflict(self) -> dict[str, float]:
        """:func:`conflict_cosines` of the gradients kept by the last probed forward and
        backward; clears them."""
        out = conflict_cosines(self.grads)
        self.grads = {}
        return out


def _pooled_concat(stages: list[Tensor]) -> Tensor:
    """Every stage's features average-pooled to the last stage's grid and concatenated over
    channels (SGA's encoder output; the grids here divide evenly)."""
    size = stages[-1].shape[-2:]
    return torch.cat([F.adaptive_avg_pool2d(s, size) for s in stages], 1)


def probed_fusion(
    fusion: nn.Module, x: Tensor, y: Tensor, grads: dict[str, Tensor], *, probe_map: bool
) -> Tensor:
    """``fusion(x, y)`` with each use of X and Y on its own copy; the next backward stores the
    gradient reaching each copy in ``grads`` (keys ``x_map``, ``x_skip``, ``y_map``,
    ``y_value``; a copy that receives none is absent). With ``probe_map`` (for a stop-gradient
    map) the gradient the map would pass is stored too (``x_probe``, ``y_probe``)."""
    if not (x.requires_grad and y.requires_grad):
        raise ValueError(
            "probed_fusion needs x and y that require grad (a training forward with autograd "
            f"on), got requires_grad {x.requires_grad} and {y.requires_grad}"
        )
    uses = {"x_map": x.clone(), "x_skip": x.clone(), "y_map": y.clone(), "y_value": y.clone()}
    probes = None
    if probe_map:
        probes = (x.detach().requires_grad_(), y.detach().requires_grad_())
        uses.update(x_probe=probes[0], y_probe=probes[1])
    for name, t in uses.items():
        t.register_hook(_keeper(grads, name))
    return fusion.branches(uses["x_map"], uses["x_skip"], uses["y_map"], uses["y_value"], probes)


def _keeper(grads: dict[str, Tensor], name: str) -> Callable[[Tensor], None]:
    def keep(grad: Tensor) -> None:
        grads[name] = grad.detach()

    return keep


def conflict_cosines(grads: dict[str, Tensor]) -> dict[str, float]:
    """The conflict cosines (see the module docstring) of gradients kept by
    :func:`probed_fusion`; a path that received no gradient counts as zero."""
    if "x_skip" not in grads or "y_value" not in grads:
        raise RuntimeError("the conflict needs a probed forward and a backward first")
    x_skip, y_value = grads["x_skip"], grads["y_value"]
    x_map = grads.get("x_map", torch.zeros_like(x_skip))
    y_map = grads.get("y_map", torch.zeros_like(y_value))
    return {
        "conflict_x": token_cosine(x_map, x_skip),
        "conflict_y": token_cosine(y_map, y_value),
        "probe_conflict_x": token_cosine(grads.get("x_probe", x_map), x_skip),
        "probe_conflict_y": token_cosine(grads.get("y_probe", y_map), y_value),
    }


# ---------------------------------------------------------------------------------------------
# Image metrics.


def psnr(output: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1], (B, C, H, W) → (B,)."""
    mse = (output - target).square().flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _gaussian_window(sigma: float, truncate: float, dtype: torch.dtype) -> Tensor:
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=dtype)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def ssim(output: Tensor, target: Tensor, *, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (Wang et al., IEEE TIP 2004) of images in [0, 1], (B, C, H, W) → (B,).

    Gaussian window (σ = 1.5, truncated at 3.5σ: 11 × 11), population statistics, K1 = 0.01,
    K2 = 0.03, the map averaged away from a border of the window's radius and over channels:
    scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=...)``.
    """
    w = _gaussian_window(sigma, 3.5, output.dtype).to(output.device)
    channels = output.shape[1]

    def blur(t: Tensor) -> Tensor:  # valid separable filtering, per channel
        t = F.conv2d(t, w.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
        return F.conv2d(t, w.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(output), blur(target)
    vx = blur(output * output) - mx * mx
    vy = blur(target * target) - my * my
    cxy = blur(output * target) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)
