"""A compact RAFT-style flow estimator, unrolled (RAFT) or as a deep equilibrium (DEQ-Flow).

The parts (Teed & Deng, "RAFT", ECCV 2020), at 1/4 of the input resolution:

* feature and context encoders (strided convolutions);
* the all-pairs correlation volume C(p, q) = <f1(p), f2(q)> / sqrt(D), average-pooled over q into a
  pyramid, and a lookup of a (2r + 1)^2 window around the current match p + flow(p) at each level
  (:func:`correlation_pyramid`, :func:`lookup`);
* a convolutional GRU update operator over (hidden state, flow) (:class:`UpdateBlock`);
* convex upsampling of the 1/4-resolution flow with a learned 3 x 3 mask (:func:`convex_upsample`).

Both models use the same update block. :class:`RAFT` unrolls it ``iters`` times and supervises every
iterate with the sequence loss. :class:`DEQFlow` solves for its equilibrium (hidden*, flow*) with
the library's :class:`~equilibria.DEQ` on the tuple state (hidden, flow), trained with a phantom
gradient and fixed-point correction (``deq(x, z0, states=n)``: n states along the solver's
trajectory, each supervised, losses weighted by gamma^(n - i)), or with the implicit gradient.

Reference: Bai, Geng, Mangalam, Bansal, Feng & Kolter, "Deep Equilibrium Optical Flow
Estimation", CVPR 2022.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import equilibria as eq
from equilibria._validate import check_int

from .flow_data import pixel_grid

__all__ = [
    "RAFT",
    "DEQFlow",
    "FlowCell",
    "FlowOutput",
    "UpdateBlock",
    "convex_upsample",
    "correlation_pyramid",
    "end_point_error",
    "forward_warp",
    "lookup",
    "sequence_loss",
]

FACTOR = 4  # features at 1/4 of the input resolution
_PHANTOM = eq.Phantom(steps=1, damping=1.0)  # DEQ-Flow's default: one differentiable step


# ---------------------------------------------------------------------------------------------
# Functional core


def correlation_pyramid(f1: Tensor, f2: Tensor, levels: int) -> list[Tensor]:
    """All-pairs correlation C[b, p, q] = <f1[b, :, p], f2[b, :, q]> / sqrt(D) and its pyramid.

    Args:
        f1, f2: (B, D, h, w) feature maps.
        levels: pyramid levels; level l average-pools the q dimensions by 2^l.

    Returns:
        ``levels`` tensors of shape (B * h * w, 1, h / 2^l, w / 2^l): one correlation map over q
        per query pixel p (row-major over (b, y, x)).
    """
    b, d, h, w = f1.shape
    corr = torch.einsum("bdp,bdq->bpq", f1.flatten(2), f2.flatten(2)) / d**0.5  # (B, hw, hw)
    corr = corr.reshape(b * h * w, 1, h, w)
    pyramid = [corr]
    for _ in range(levels - 1):
        pyramid.append(F.avg_pool2d(pyramid[-1], 2, stride=2))
    return pyramid


def lookup(pyramid: list[Tensor], coords: Tensor, radius: int) -> Tensor:
    """Bilinear lookup of a (2r + 1)^2 window of every pyramid level around ``coords``.

    Args:
        pyramid: from :func:`correlation_pyramid` for a (B, D, h, w) pair.
        coords: (B, 2, h, w) match positions (x, y) in level-0 pixels.
        radius: r.

    Returns:
        (B, levels * (2r + 1)^2, h, w): level-major, then offsets dy-major, dx-minor; positions
        outside a level's map read zero.
    """
    b, _, h, w = coords.shape
    offsets = torch.arange(-radius, radius + 1, dtype=coords.dtype, device=coords.device)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    delta = torch.stack([dx, dy]).reshape(2, -1)  # (2, k) with k = (2r + 1)^2
    centre = coords.permute(0, 2, 3, 1).reshape(b * h * w, 2, 1)  # (Bhw, 2, 1)
    out = []
    for level, corr in enumerate(pyramid):
        hl, wl = corr.shape[-2:]
        pts = centre / 2**level + delta  # (Bhw, 2, k)
        # pixel centres at -1 and 1 (align_corners) cannot place points on a one-pixel axis,
        # where every point would read that pixel: such a level uses the other convention
        corners = hl > 1 and wl > 1
        if corners:
            gx = 2.0 * pts[:, 0] / (wl - 1) - 1.0
            gy = 2.0 * pts[:, 1] / (hl - 1) - 1.0
        else:
            gx = (2.0 * pts[:, 0] + 1.0) / wl - 1.0
            gy = (2.0 * pts[:, 1] + 1.0) / hl - 1.0
        grid = torch.stack([gx, gy], dim=-1)[:, None]  # (Bhw, 1, k, 2)
        window = F.grid_sample(corr, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=corners)  # fmt: skip
        out.append(window.reshape(b, h, w, -1))
    return torch.cat(out, dim=-1).permute(0, 3, 1, 2).contiguous()


def convex_upsample(flow: Tensor, mask: Tensor, factor: int = FACTOR) -> Tensor:
    """Upsample a (B, 2, h, w) flow to (B, 2, factor h, factor w): each fine pixel is a convex
    combination (softmax of ``mask``, (B, 9 factor^2, h, w)) of the 3 x 3 coarse neighbours, with
    the flow scaled to fine pixels."""
    b, _, h, w = flow.shape
    weights = torch.softmax(mask.view(b, 1, 9, factor, factor, h, w), dim=2)
    patches = F.unfold(factor * flow, 3, padding=1).view(b, 2, 9, 1, 1, h, w)
    up = (weights * patches).sum(2)  # (B, 2, factor, factor, h, w)
    return up.permute(0, 1, 4, 2, 5, 3).reshape(b, 2, factor * h, factor * w)


def end_point_error(flow: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean end-point error ||flow - target||_2 over pixels (those in ``valid`` if given)."""
    epe = (flow - target).norm(dim=1)
    return epe.mean() if valid is None else epe[valid].mean()


def sequence_loss(predictions: list[Tensor], target: Tensor, gamma: float = 0.8) -> Tensor:
    """RAFT's loss sum_i gamma^(n - 1 - i) |flow_i - target|_1 (mean over pixels), the last
    prediction with weight 1; for DEQ-Flow's correction states the same weights
    (:func:`equilibria.correction_loss`)."""
    return eq.correction_loss([(p - target).abs().mean() for p in predictions], gamma)


def forward_warp(flow: Tensor) -> Tensor:
    """Carry a (B, 2, h, w) flow forward along itself: each pixel's vector moves to the nearest
    pixel of p + flow(p) (averaged where several land); pixels nothing lands on keep their own
    vector. The warm start of the next frame pair (constant-velocity assumption, as DEQ-Flow's
    ``forward_interpolate``)."""
    b, _, h, w = flow.shape
    grid = pixel_grid(h, w, flow.dtype).to(flow.device)
    target = (grid + flow).round().long()
    x, y = target[:, 0], target[:, 1]
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    index = (torch.arange(b, device=flow.device)[:, None, None] * h + y.clamp(0, h - 1)) * w
    index = (index + x.clamp(0, w - 1))[inside]  # (K,)
    sums = torch.zeros(b * h * w, 2, dtype=flow.dtype, device=flow.device)
    sums.index_add_(0, index, flow.permute(0, 2, 3, 1)[inside])
    counts = torch.zeros(b * h * w, dtype=flow.dtype, device=flow.device)
    counts.index_add_(0, index, torch.ones_like(index, dtype=flow.dtype))
    warped = (sums / counts.clamp_min(1)[:, None]).view(b, h, w, 2).permute(0, 3, 1, 2)
    hit = (counts > 0).view(b, 1, h, w)
    return torch.where(hit, warped, flow)


# ---------------------------------------------------------------------------------------------
# Modules


def _encoder(out: int, width: int) -> nn.Sequential:
    """Grey (B, 1, H, W) -> (B, out, H/4, W/4); instance normalisation as RAFT's feature encoder
    (per sample, so a sample's features do not depend on the batch, nor on train / eval mode)."""
    return nn.Sequential(
        nn.Conv2d(1, width // 2, 5, stride=2, padding=2), nn.InstanceNorm2d(width // 2),
        nn.ReLU(inplace=True),
        nn.Conv2d(width // 2, width, 3, stride=2, padding=1), nn.InstanceNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, width, 3, padding=1), nn.InstanceNorm2d(width), nn.ReLU(inplace=True),
        nn.Conv2d(width, out, 1),
    )  # fmt: skip


class ConvGRU(nn.Module):
    """h' = (1 - z) h + z q with z, r, q from 3 x 3 convolutions of [h, x] (RAFT's ConvGRU)."""

    def __init__(self, hidden: int, inputs: int) -> None:
        super().__init__()
        self.convz = nn.Conv2d(hidden + inputs, hidden, 3, padding=1)
        self.convr = nn.Conv2d(hidden + inputs, hidden, 3, padding=1)
        self.convq = nn.Conv2d(hidden + inputs, hidden, 3, padding=1)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        hx = torch.cat([h, x], dim=1)
        z = torch.sigmoid(self.convz(hx))
        r = torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], dim=1)))
        return (1 - z) * h + z * q


class UpdateBlock(nn.Module):
    """RAFT's update operator: motion encoder (correlation window and flow), ConvGRU over the
    hidden state with the context features, flow-update head and upsampling-mask head."""

    def __init__(self, corr_channels: int, hidden: int, context: int, motion: int) -> None:
        super().__init__()
        self.corr = nn.Conv2d(corr_channels, motion, 1)
        self.flow = nn.Conv2d(2, motion // 2, 3, padding=1)
        self.motion = nn.Conv2d(motion + motion // 2, motion - 2, 3, padding=1)
        self.gru = ConvGRU(hidden, context + motion)
        self.delta = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2, 3, padding=1),
        )  # fmt: skip
        self.mask = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 9 * FACTOR**2, 1),
        )  # fmt: skip

    def forward(
        self, hidden: Tensor, context: Tensor, corr: Tensor, flow: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(hidden, context, correlation window, flow) -> (new hidden, flow update)."""
        c = F.relu(self.corr(corr))
        f = F.relu(self.flow(flow))
        m = F.relu(self.motion(torch.cat([c, f], dim=1)))
        hidden = self.gru(hidden, torch.cat([context, m, flow], dim=1))
        return hidden, self.delta(hidden)

    def upsample(self, hidden: Tensor, flow: Tensor) -> Tensor:
        """Full-resolution flow from the 1/4-resolution state (mask scaled by 0.25 as RAFT)."""
        return convex_upsample(flow, 0.25 * self.mask(hidden))


class FlowCell(nn.Module):
    """One update as a map of the state z = (hidden, flow) given x = (context, coords0, pyramid):
    look up the correlation around coords0 + flow (detached, as DEQ-Flow's default), run the
    update block, return (hidden', decay * flow + delta). RAFT iterates it with ``decay = 1``
    (its update); DEQ-Flow solves z = f(z, x) with ``decay < 1``.

    With ``decay = 1`` the flow path of the map is the identity, so any bias left in the update
    moves the flow at every iteration and the map has no attracting fixed point: trained
    DEQ-Flow models drifted steadily (consecutive flow steps with cosine 0.997) and no solver got
    below a relative residual of about 1e-2. ``decay < 1`` makes the direct flow path a
    contraction; the fixed point flow* = delta* / (1 - decay) stays reachable by the update.
    """

    def __init__(self, block: UpdateBlock, radius: int, decay: float = 1.0) -> None:
        super().__init__()
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ValueError(f"decay must be a float in (0, 1], got {decay!r}")
        self.block = block
        self.radius = check_int("radius", radius, minimum=0)
        self.decay = float(decay)

    def forward(self, z: tuple[Tensor, Tensor], x: tuple[Any, ...]) -> tuple[Tensor, Tensor]:
        hidden, flow = z
        context, coords0, pyramid = x
        corr = lookup(pyramid, (coords0 + flow).detach(), self.radius)
        hidden, delta = self.block(hidden, context, corr, flow)
        return hidden, (flow if self.decay == 1.0 else self.decay * flow) + delta


@dataclass
class FlowOutput:
    """What a flow model returns.

    Attributes:
        predictions: full-resolution flows (B, 2, H, W), earliest first: RAFT's iterates in
            training, DEQ-Flow's correction states in training, the final estimate alone in eval.
        state: the last (hidden, flow) state at 1/4 resolution (detached), for warm starts.
        iterations: update-block evaluations of the forward pass (per sample of the solve).
        residuals: DEQ only: (iterations, B) relative residual of every sample at every
            iteration (None for RAFT).
        jacobian: DEQ only, in training with ``jacobian_samples > 0``: the Hutchinson estimate
            of ||df/dz||_F^2 / D at the solver's last iterate
            (:func:`equilibria.jacobian_penalty`), differentiable in the parameters (else None).
    """

    predictions: list[Tensor]
    state: tuple[Tensor, Tensor]
    iterations: int
    residuals: Tensor | None = None
    jacobian: Tensor | None = None


class _FlowBase(nn.Module):
    def __init__(self, *, width: int, hidden: int, context: int, motion: int, levels: int,
                 radius: int, decay: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        # the smallest sizes the layers can be built with (the first encoder stage has
        # width // 2 channels, the motion encoder motion // 2 and motion - 2); bools refused
        for name, value, minimum in (("width", width, 2), ("hidden", hidden, 1),
                                     ("context", context, 1), ("motion", motion, 3),
                                     ("levels", levels, 1), ("radius", radius, 0)):  # fmt: skip
            check_int(name, value, minimum=minimum)
        self.hidden_dim, self.context_dim, self.levels = hidden, context, levels
        self.fnet = _encoder(width, width)
        self.cnet = _encoder(hidden + context, width)
        block = UpdateBlock(levels * (2 * radius + 1) ** 2, hidden, context, motion)
        self.cell = FlowCell(block, radius, decay)

    def prepare(self, frame1: Tensor, frame2: Tensor) -> tuple[tuple[Any, ...], Tensor]:
        """Encode a pair of (B, 1, H, W) frames in [0, 1]: x = (context, coords0, pyramid) of
        the cell and the initial hidden state."""
        if frame1.shape != frame2.shape or frame1.dim() != 4 or frame1.shape[1] != 1:
            raise ValueError(
                f"frames must be two (B, 1, H, W) tensors of one shape, got "
                f"{tuple(frame1.shape)} and {tuple(frame2.shape)}"
            )
        h, w = frame1.shape[-2:]
        if h % (FACTOR * 2 ** (self.levels - 1)) or w % (FACTOR * 2 ** (self.levels - 1)):
            raise ValueError(
                f"frame height and width must be multiples of {FACTOR * 2 ** (self.levels - 1)} "
                f"(1/{FACTOR} resolution, {self.levels} pyramid levels), got {h}x{w}"
            )
        f1, f2 = self.fnet(torch.cat([2 * frame1 - 1, 2 * frame2 - 1])).chunk(2)
        pyramid = correlation_pyramid(f1, f2, self.levels)
        hidden, context = self.cnet(2 * frame1 - 1).split([self.hidden_dim, self.context_dim], 1)
        coords0 = pixel_grid(*f1.shape[-2:], f1.dtype).to(f1.device).expand(f1.shape[0], -1, -1, -1)
        return (torch.relu(context), coords0, pyramid), torch.tanh(hidden)


class RAFT(_FlowBase):
    """RAFT: ``iters`` unrolled applications of the update cell from zero flow.

    Args:
        iters: unrolled iterations in training (and in eval unless ``forward(iters=...)``).
        width, hidden, context, motion: channels of the encoders, hidden state, context
            features and motion features (ints >= 2, 1, 1 and 3).
        levels, radius: correlation pyramid levels (>= 1) and lookup radius (>= 0: a
            (2r + 1)^2 window).
    """

    def __init__(self, *, iters: int = 12, width: int = 32, hidden: int = 32, context: int = 32,
                 motion: int = 48, levels: int = 3, radius: int = 3) -> None:  # fmt: skip
        super().__init__(width=width, hidden=hidden, context=context, motion=motion,
                         levels=levels, radius=radius)  # fmt: skip
        self.iters = check_int("iters", iters, minimum=1)

    def forward(self, frame1: Tensor, frame2: Tensor, *, iters: int | None = None,
                init: tuple[Tensor, Tensor] | None = None) -> FlowOutput:  # fmt: skip
        """Flow from ``frame1`` to ``frame2``; ``init``: a (hidden, flow) state to start from."""
        x, hidden = self.prepare(frame1, frame2)
        flow = torch.zeros_like(x[1])
        if init is not None:
            hidden, flow = init
        n = self.iters if iters is None else check_int("iters", iters, minimum=1)
        predictions = []
        for _ in range(n):
            hidden, flow = self.cell((hidden, flow), x)
            if self.training:
                predictions.append(self.cell.block.upsample(hidden, flow))
        if not self.training:
            predictions.append(self.cell.block.upsample(hidden, flow))
        return FlowOutput(predictions, (hidden.detach(), flow.detach()), n)


class DEQFlow(_FlowBase):
    """DEQ-Flow: the equilibrium (hidden*, flow*) = f((hidden*, flow*), x) of the update cell.

    Args:
        solver: forward solver (name or object, e.g. ``eq.Anderson(m=5)``).
        backward: ``eq.Phantom(steps, damping)`` (default, with fixed-point correction) or
            ``eq.Implicit(...)``.
        correction_states: n >= 1 states along the trajectory are supervised in training
            (1 = only the equilibrium).
        jacobian_samples: probes of the Jacobian penalty computed in training (0 = none;
            Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization",
            ICML 2021); the caller weights it into the loss (:attr:`FlowOutput.jacobian`). The
            correlation lookup is detached in the cell, so the penalty covers the rest of the
            map.
        max_iter, tol: training solve budget and relative tolerance.
        eval_max_iter, eval_tol: test-time budget and tolerance.
        flow_decay: the map's flow update is flow' = flow_decay * flow + delta
            (:class:`FlowCell`); < 1 makes the map's flow path contractive, so that the solve
            reaches its fixed point; 1 is RAFT's update.
        width, hidden, context, motion, levels, radius: as :class:`RAFT`.
    """

    def __init__(self, *, solver: str | eq.Solver = "anderson",
                 backward: str | eq.Backward = _PHANTOM,
                 correction_states: int = 3, jacobian_samples: int = 0, max_iter: int = 24,
                 tol: float = 1e-3,
                 eval_max_iter: int = 32, eval_tol: float = 1e-3, flow_decay: float = 0.9,
                 width: int = 32, hidden: int = 32, context: int = 32, motion: int = 48,
                 levels: int = 3, radius: int = 3) -> None:  # fmt: skip
        if (isinstance(flow_decay, bool) or not isinstance(flow_decay, (int, float))
                or not 0 < flow_decay <= 1):  # fmt: skip
            raise ValueError(f"flow_decay must be a float in (0, 1], got {flow_decay!r}")
        super().__init__(width=width, hidden=hidden, context=context, motion=motion,
                         levels=levels, radius=radius, decay=flow_decay)  # fmt: skip
        self.correction_states = check_int("correction_states", correction_states, minimum=1)
        self.jacobian_samples = check_int("jacobian_samples", jacobian_samples, minimum=0)
        self.deq = eq.DEQ(self.cell, solver=solver, backward=backward, tol=tol,
                          max_iter=max_iter, eval_tol=eval_tol,
                          eval_max_iter=eval_max_iter)  # fmt: skip

    def forward(self, frame1: Tensor, frame2: Tensor, *, iters: int | None = None,
                tol: float | None = None,
                init: tuple[Tensor, Tensor] | None = None) -> FlowOutput:  # fmt: skip
        """Flow from ``frame1`` to ``frame2``.

        Args:
            iters: this call's solver budget (default: the mode's ``max_iter``).
            tol: this call's tolerance (0: run exactly ``iters`` iterations).
            init: (hidden, flow) to start the solve from (a warm start); default the context
                encoder's hidden state and zero flow.
        """
        if iters is not None:  # named as this call names it (the DEQ would say max_iter)
            check_int("iters", iters, minimum=1)
        x, hidden = self.prepare(frame1, frame2)
        z0 = (hidden, torch.zeros_like(x[1])) if init is None else init
        if self.training:
            states = self.deq(x, z0, states=self.correction_states, max_iter=iters, tol=tol)
        else:
            states = [self.deq(x, z0, max_iter=iters, tol=tol)]
        sol = self.deq.last_solution
        assert sol is not None
        predictions = [self.cell.block.upsample(h, f) for h, f in states]
        last = tuple(s.detach() for s in states[-1])
        jacobian = None
        if self.training and self.jacobian_samples:
            jacobian = eq.jacobian_penalty(lambda z: self.cell(z, x), sol.value,
                                           samples=self.jacobian_samples)  # fmt: skip
        return FlowOutput(predictions, last, sol.nstep, sol.residuals,  # type: ignore[arg-type]
                          jacobian)  # fmt: skip
