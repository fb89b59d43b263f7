"""Anderson acceleration on the joint sampling system: DEQ-DDIM's and ParaTAA's layouts.

Both solvers mix the last few rounds of the trajectory by least squares, on the block of active
rows the driver hands them (``equilibria/sampling/_system.py``):

* :class:`Anderson` (Pokle, Geng & Kolter 2022, "Deep Equilibrium Approaches to Diffusion
  Models"): Anderson type II on the cumulative Picard map ``F(X)``, one mixing vector per sample
  over the whole trajectory, or one per timestep (``weights="timestep"``, the layout of DEQ-DDIM's
  code, whose batch rows are the timesteps).
* :class:`Triangular` (Tang et al. 2024, "Accelerating Parallel Sampling of Diffusion Models",
  ParaTAA): triangular Anderson. Row ``k`` of the trajectory depends only on the rows before it,
  so its least-squares problem sums the Gram matrices of the residual differences over the rows
  ``j <= k`` (a cumulative sum down the trajectory: lower-triangular), one small system per row.

Histories are kept per round as the block's own (input, image) pairs, aligned by absolute step
index (rows that entered the window later have no history and take the Picard proposal), so the
memory is ``m`` blocks: bounded by the window, not by T. The small systems are solved in float64
(``accumulate="float64"``, the default) or in the states' dtype, without host synchronisation:
a singular or non-finite system falls back to the Picard proposal through ``torch.where``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

from .._validate import check_choice, check_float, check_int
from ._picard import cumulative_picard
from ._system import Block, SamplingSolver, System, register_solver

Accumulate = Literal["float64", "input"]


class _Entry(NamedTuple):
    """One round's rows, in absolute step layout from ``start``: ``x`` and ``f`` (L, N, D)."""

    start: int
    x: Tensor
    f: Tensor
    valid: Tensor  # (L, N) bool: the rows evaluated that round


def _align(entry: _Entry, start: int, x: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
    """``entry``'s (x, f) on the current rows ``start .. start+L``; the current values where the
    entry has no evaluated row (rows that entered the window later), so differences vanish there.

    The window only slides forward (``start >= entry.start``), so the overlap is one slice.
    """
    L = x.shape[0]
    off = start - entry.start
    n = max(0, min(L, entry.x.shape[0] - off))
    if n == 0:
        return x, f
    valid = entry.valid[off : off + n].unsqueeze(-1)  # (n, N, 1)
    ex = torch.where(valid, entry.x[off : off + n], x[:n])
    ef = torch.where(valid, entry.f[off : off + n], f[:n])
    if n == L:
        return ex, ef
    return torch.cat([ex, x[n:]]), torch.cat([ef, f[n:]])


def _push(history: tuple[_Entry, ...], entry: _Entry, keep: int) -> tuple[_Entry, ...]:
    return (*history, entry)[-keep:] if keep > 0 else ()


def _gram_dtype(x: Tensor, accumulate: Accumulate) -> torch.dtype:
    return torch.float64 if accumulate == "float64" else x.dtype


def _ridge(h: Tensor, lam: float) -> Tensor:
    """``h + (lam * trace(h) / n + floor) I`` for a batch of (n, n) Gram matrices: a ridge relative
    to the Gram's scale (so rescaling the states leaves the mixing unchanged), plus a floor that
    keeps an all-zero Gram (a row already at its fixed point) solvable."""
    n = h.shape[-1]
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    tr = h.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]  # (..., 1, 1)
    floor = torch.finfo(h.dtype).tiny ** 0.5
    return h + (lam * tr / n + floor) * eye


def _flat(t: Tensor) -> Tensor:
    return t.flatten(2)  # (L, N, *shape) -> (L, N, D)


@register_solver
@dataclass(frozen=True)
class Anderson(SamplingSolver):
    """DEQ-DDIM's solver: Anderson acceleration of the cumulative Picard map over the trajectory.

    Each round mixes the last ``m`` iterates ``X_i`` and their cumulative-Picard images ``F_i``
    (``_picard.cumulative_picard``) per sample: ``min ||sum a_i (F_i - X_i)||² + lam' ||a||²``
    subject to ``sum a_i = 1``, then ``X <- beta sum a_i F_i + (1 - beta) sum a_i X_i``. On
    ``benchmarks/sampling.py`` it needs about 2x cumulative Picard's rounds on the Gaussian
    mixture (the triangular structure that makes Picard exact one step per round is mixed away)
    and 0.72-0.94x on the trained digits model.

    Args:
        m: history size (iterates mixed), >= 1 (``m=1`` is cumulative Picard).
        lam: ridge in [0, 1e6], relative to the mean diagonal of the Gram matrix (DEQ-DDIM:
            1e-3, there absolute).
        beta: mixing parameter in (0, 1].
        weights: ``"trajectory"``: one mixing vector per sample over all its active rows;
            ``"timestep"``: one per (timestep, sample), as in DEQ-DDIM's code.
        accumulate: ``"float64"`` (Gram and solve in float64) or ``"input"`` (the states' dtype).

    Example:
        >>> x0, sol = sampling.sample(model, x_T, sched, solver=sampling.Anderson(m=5))

    Reference: Pokle, Geng & Kolter, NeurIPS 2022 (m = 5, lam = 1e-3, beta = 1).
    """

    m: int = 5
    lam: float = 1e-3
    beta: float = 1.0
    weights: Literal["trajectory", "timestep"] = "trajectory"
    accumulate: Accumulate = "float64"
    name: ClassVar[str] = "anderson"

    def __post_init__(self) -> None:
        check_int("m", self.m, minimum=1)
        check_float("lam", self.lam, low=0.0, high=1e6, low_open=False)
        check_float("beta", self.beta, low=0.0, high=1.0)
        check_choice("weights", self.weights, ("trajectory", "timestep"))
        check_choice("accumulate", self.accumulate, ("float64", "input"))

    def init(self, system: System) -> Any:
        return ()

    def update(self, system: System, block: Block, state: Any) -> tuple[Tensor, Any]:
        picard = cumulative_picard(block)
        x, f = _flat(block.x[1:]).clone(), _flat(picard)  # (L, N, D); x: the driver's view
        history = _push(state, _Entry(block.start, x, f, block.active), self.m)
        if len(history) == 1:
            return picard, history
        xs, fs = zip(*(_align(e, block.start, x, f) for e in history[:-1]), strict=True)
        X = torch.stack([*xs, x])  # (n, L, N, D), oldest first
        F = torch.stack([*fs, f])
        mask = block.active.unsqueeze(-1)  # (L, N, 1)
        gdt = _gram_dtype(x, self.accumulate)
        G = torch.where(mask, F - X, torch.zeros_like(F)).to(gdt)  # (n, L, N, D)
        if self.weights == "trajectory":
            h = torch.einsum("ilnd,jlnd->nij", G, G)  # (N, n, n)
        else:
            h = torch.einsum("ilnd,jlnd->lnij", G, G)  # (L, N, n, n)
        a = _affine_weights(_ridge(h, self.lam))  # (N, n) or (L, N, n)
        if self.weights == "trajectory":
            a = a.unsqueeze(0)  # (1, N, n)
        a = a.to(x.dtype).permute(2, 0, 1).unsqueeze(-1)  # (n, L or 1, N, 1)
        out = (a * F).sum(0)
        if self.beta != 1.0:
            out = out - (1.0 - self.beta) * (a * (F - X)).sum(0)
        return out.reshape(picard.shape), history


def _affine_weights(h: Tensor) -> Tensor:
    """The minimiser of ``a^T h a`` subject to ``sum a = 1``: ``h^-1 1 / (1^T h^-1 1)``, for a
    batch of (n, n) positive definite ``h``; the newest iterate alone (Picard) where the solve
    fails or is not finite. Returns (..., n)."""
    n = h.shape[-1]
    ones = torch.ones((*h.shape[:-1], 1), dtype=h.dtype, device=h.device)
    y = torch.linalg.solve_ex(h, ones)[0].squeeze(-1)  # (..., n)
    a = y / y.sum(-1, keepdim=True)
    newest = torch.zeros(n, dtype=h.dtype, device=h.device)
    newest[-1] = 1.0
    ok = torch.isfinite(a).all(-1, keepdim=True)
    return torch.where(ok, a, newest)


def order_picard(block: Block, order: int | None) -> Tensor:
    """ParaTAA's order-``p`` map (its "nonlinear equations of order p"): row ``k+1`` is the state
    ``p`` steps back plus the drifts of those ``p`` steps, ``X[k+1-p] + sum_{j=k+1-p}^{k}
    (step_j(X[j]) - X[j])``, never reaching before the sample's accepted state ``X[lo]``;
    ``order=None`` (or >= the block) is cumulative Picard. Returns (L, N, *shape)."""
    L, N = block.active.shape
    if order is None or order >= L:
        return cumulative_picard(block)
    mask = block.active.reshape(block.active.shape + (1,) * (block.f.ndim - 2))
    drift = torch.where(mask, block.f - block.x[:-1], torch.zeros_like(block.f))
    csum = torch.cat([torch.zeros_like(drift[:1]), drift.cumsum(0)])  # (L+1, N, *shape)
    rows = torch.arange(L, device=drift.device).unsqueeze(1)  # (L, 1)
    rel = (block.lo - block.start).clamp(0, L).unsqueeze(0)  # (1, N)
    back = torch.maximum(rows + 1 - order, rel)  # (L, N) row of the base state
    cols = torch.arange(N, device=drift.device).unsqueeze(0).expand(L, N)
    return block.x[back, cols] + csum[1:] - csum[back, cols]


@register_solver
@dataclass(frozen=True)
class Triangular(SamplingSolver):
    """ParaTAA's triangular Anderson acceleration (Tang et al. 2024).

    With the order-``p`` residual ``R = F_p(X) - X`` (:func:`order_picard`) and the differences
    ``dX_i, dR_i`` of the last ``m`` iterates, row ``k`` solves
    ``(sum_{j<=k} dR_j dR_j^T + lam' I) gamma_k = sum_{j<=k} dR_j^T R_j`` (the rows it depends on:
    a cumulative, lower-triangular Gram) and moves to ``X_k + R_k - (dX_k + dR_k) gamma_k``.

    Args:
        m: iterates kept including the current one, >= 1 (ParaTAA's ``memory_size``, 2; ``m=1``
            is the Picard iteration of the order-``p`` map).
        lam: ridge in [0, 1e6], relative to the mean diagonal of each row's Gram (ParaTAA: 1e-3,
            there absolute).
        order: ``p``, steps each residual spans, >= 1 (ParaTAA: 20); None: all (cumulative).
        rule: the tolerance rule: ``"exact"`` (the driver's ``||g_k|| / ||f_k - x_k||``) or
            ``"parataa"``: the RMS of ``g_k`` over ``max(1, sigma_k)``, sigma_k the step's DDPM
            posterior std (ParaTAA's ``tol1 = tol2 = tol``: done when the RMS is below tol or
            below tol * sigma_k).
        accumulate: ``"float64"`` (as ParaTAA) or ``"input"``.

    Example:
        >>> x0, sol = sampling.sample(model, x_T, sched, solver=sampling.Triangular(order=None))

    Reference: Tang, Tang, Luo, Zhang & Li, "Accelerating Parallel Sampling of Diffusion Models",
    ICML 2024.
    """

    m: int = 2
    lam: float = 1e-3
    order: int | None = 20
    rule: Literal["exact", "parataa"] = "exact"
    accumulate: Accumulate = "float64"
    name: ClassVar[str] = "triangular"

    def __post_init__(self) -> None:
        check_int("m", self.m, minimum=1)
        check_float("lam", self.lam, low=0.0, high=1e6, low_open=False)
        if self.order is not None:
            check_int("order", self.order, minimum=1)
        check_choice("rule", self.rule, ("exact", "parataa"))
        check_choice("accumulate", self.accumulate, ("float64", "input"))

    def residual(self, system: System, block: Block) -> Tensor:
        if self.rule == "exact":
            return super().residual(system, block)
        L = block.active.shape[0]
        var = system.schedule.step_variance()[block.start : block.start + L]  # (L,)
        scale = var.to(block.g.device, torch.float64).sqrt().clamp(min=1.0).unsqueeze(1)
        g = _flat(block.g).double()
        r = g.pow(2).mean(2).sqrt() / scale  # (L, N)
        return torch.where(block.active, r, torch.zeros_like(r))

    def init(self, system: System) -> Any:
        return ()

    def update(self, system: System, block: Block, state: Any) -> tuple[Tensor, Any]:
        proposal = order_picard(block, self.order)
        x = _flat(block.x[1:]).clone()  # block.x is the driver's view, changed after the round
        mask = block.active.unsqueeze(-1)  # (L, N, 1)
        r = torch.where(mask, _flat(proposal) - x, torch.zeros_like(x))  # (L, N, D)
        history = _push(state, _Entry(block.start, x, r, block.active), self.m)
        if len(history) == 1:
            return proposal, history
        xs, rs = zip(*(_align(e, block.start, x, r) for e in history[:-1]), strict=True)
        X, R = torch.stack([*xs, x]), torch.stack([*rs, r])  # (n+1, L, N, D)
        gdt = _gram_dtype(x, self.accumulate)
        dX, dR = (X[1:] - X[:-1]).to(gdt), (R[1:] - R[:-1]).to(gdt)  # (n, L, N, D)
        b = torch.einsum("ilnd,jlnd->lnij", dR, dR).cumsum(0)  # (L, N, n, n)
        d = torch.einsum("ilnd,lnd->lni", dR, r.to(gdt)).cumsum(0)  # (L, N, n)
        gamma = torch.linalg.solve_ex(_ridge(b, self.lam), d.unsqueeze(-1))[0]  # (L, N, n, 1)
        gamma = torch.where(torch.isfinite(gamma), gamma, torch.zeros_like(gamma))
        step = torch.einsum("ilnd,lni->lnd", dX + dR, gamma.squeeze(-1)).to(x.dtype)
        out = x + r - step
        return out.reshape(proposal.shape), history
