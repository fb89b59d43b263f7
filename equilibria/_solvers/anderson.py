"""Anderson acceleration (type II) with a scale-invariant ridge.

Notation of Walker & Ni (SIAM J. Numer. Anal. 2011): the last n <= m images F_i = f(X_i) and
residuals G_i = F_i - X_i; per sample solve
min_a ||sum_i a_i G_i||^2 + lam' ||a||^2  s.t.  sum_i a_i = 1,  then
z <- beta * sum_i a_i F_i + (1 - beta) * sum_i a_i X_i.

Two choices make it fast and robust:
* The Gram matrix G G^T (B, m, m) is kept up to date with one new row per iteration (one batched
  matrix-vector product) instead of being rebuilt, in float32 or better (float64 for float64
  states), also under autocast.
* The ridge is relative: lam' = lam * ||G_newest||^2, so rescaling the problem (z -> s z) leaves the
  coefficients, and hence the iteration count, unchanged. A ridge added as an absolute constant
  (TorchDEQ's lam = 1e-4) dominates the Gram matrix of small residuals and turns Anderson into slow
  plain iteration; one relative to trace(G G^T) is dominated by the oldest residual once the
  iteration converges fast, with a milder version of the same effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from .._validate import check_float, check_int
from ._base import Map, Solver, Step, write_slot

# The largest relative ridge accepted: far past the point where the ridge dominates the Gram block
# (the step is then the plain average of the history), still far from float32's overflow.
MAX_LAM = 1e6


class AndersonState(NamedTuple):
    images: Tensor  # (B, m, D)  F_i, zero in unused slots
    residuals: Tensor  # (B, m, D)  G_i, zero in unused slots
    system: Tensor  # (B, m+1, m+1)  bordered [[0, 1^T], [1, G G^T]], float32 or float64
    rhs: Tensor  # (B, m+1, 1)  (1, 0, ..., 0)
    ridge_eye: Tensor  # (m+1, m+1)  diag(0, 1, ..., 1): where the ridge goes
    ridge_weights: Tensor  # (m, m+1, 2)  [k]: ridge and trace as weights of diag(system), newest k
    border: Tensor  # (m+1, m+1)  1 in row 0 and column 0 (corner 0), 0 elsewhere
    block: Tensor  # (m+1, m+1)  1 - border: the Gram block
    count: int  # columns written so far (the newest is at slot (count - 1) % m)


@dataclass(frozen=True)
class Anderson(Solver):
    """Anderson acceleration: extrapolate from the last ``m`` iterates by least squares.

    The default solver: usually far fewer iterations than Picard at almost the same cost per
    iteration. The ridge ``lam`` is relative to the size of the residuals, so the same settings work
    whatever the scale of the state.

    Args:
        m: history size (number of past iterates mixed), >= 1. ``m=1`` is Picard with damping beta.
        lam: ridge in [0, 1e6] on the mixing coefficients, relative to the newest squared
            residual norm. The default 1e-2 was chosen on the problems of ``benchmarks/solvers.py``
            and the test suite's affine and tanh maps (fewest iterations over all of them). From
            about 1e2 on the ridge dominates and the step averages the history; the bound keeps
            the ridge finite in float32 (above it the step was NaN).
        beta: mixing (damping) parameter in (0, 1]; 1 takes the extrapolated images.

    Example:
        >>> sol = eq.solve(f, z0, solver=eq.Anderson(m=6, lam=1e-3))

    Reference: Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal.
    2011; used for DEQs by Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    m: int = 5
    lam: float = 1e-2
    beta: float = 1.0
    name: ClassVar[str] = "anderson"

    def __post_init__(self) -> None:
        check_int("Anderson m", self.m, minimum=1)
        check_float("Anderson lam", self.lam, low=0.0, high=MAX_LAM, low_open=False)
        check_float("Anderson beta", self.beta, low=0.0, high=1.0)

    def init(self, x: Tensor, fx: Tensor, g: Tensor) -> AndersonState:
        b, d = x.shape
        gdt = _gram_dtype(x)
        rhs = torch.zeros(b, self.m + 1, 1, dtype=gdt, device=x.device)
        rhs[:, 0] = 1.0
        ridge_eye = torch.eye(self.m + 1, dtype=gdt, device=x.device)
        ridge_eye[0, 0] = 0.0
        border = torch.zeros(self.m + 1, self.m + 1, dtype=gdt, device=x.device)
        border[0, 1:] = border[1:, 0] = 1.0
        # [..., 0]: lam' = lam * ||G_newest||^2 + floor * trace(G G^T); [..., 1]: trace(G G^T);
        # both from one product with diag(system)
        weights = torch.zeros(self.m, self.m + 1, 2, dtype=gdt, device=x.device)
        weights[:, 1:, 0] = _ridge_floor(gdt)
        weights[:, 1:, 0] += self.lam * torch.eye(self.m, dtype=gdt, device=x.device)
        weights[:, 1:, 1] = 1.0
        state = AndersonState(
            images=x.new_zeros(b, self.m, d),
            residuals=x.new_zeros(b, self.m, d),
            system=torch.zeros(b, self.m + 1, self.m + 1, dtype=gdt, device=x.device),
            rhs=rhs,
            ridge_eye=ridge_eye,
            ridge_weights=weights,
            border=border,
            block=1.0 - border,
            count=0,
        )
        return _push(state, fx, g)

    def step(self, fn: Map, x: Tensor, fx: Tensor, g: Tensor, state: AndersonState) -> Step:
        if state.count == 1:
            x = fx if self.beta == 1.0 else x + self.beta * g
        else:
            alpha = _mixing(state)  # (B, 1, m)
            if alpha.dtype != x.dtype:
                alpha = alpha.to(x.dtype)
            x = torch.bmm(alpha, state.images).squeeze(1)
            if self.beta != 1.0:
                x = x - (1.0 - self.beta) * torch.bmm(alpha, state.residuals).squeeze(1)
        fx = fn(x)
        g = fx - x
        state = _push(state, fx, g)
        # <g, g> is the new diagonal entry of the Gram block: the driver's residual norm for free
        slot = (state.count - 1) % self.m + 1
        return Step(x, fx, g, state, 1, state.system.select(2, slot).select(1, slot))

    def select(self, state: AndersonState, index: Tensor) -> AndersonState:
        return state._replace(
            images=state.images.index_select(0, index),
            residuals=state.residuals.index_select(0, index),
            system=state.system.index_select(0, index),
            rhs=state.rhs.index_select(0, index),
        )


def _gram_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 states, float32 otherwise (also under autocast and for half states)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _push(state: AndersonState, fx: Tensor, g: Tensor) -> AndersonState:
    """Write (fx, g) into the next ring slot and update the Gram block's row and column.

    Unused slots hold zeros, so the products always run over all m slots (no slicing), and an unused
    slot's row of the bordered system reduces to ``ridge * a_j = 0``, i.e. a_j = 0.
    """
    m = state.images.shape[1]
    slot = state.count % m
    images = write_slot(state.images, slot, fx)
    residuals = write_slot(state.residuals, slot, g)
    stored = residuals
    if g.dtype != state.system.dtype:
        g, stored = g.to(state.system.dtype), stored.to(state.system.dtype)
    # (B, 1, D) @ (B, D, m): this layout is several times faster than (B, m, D) @ (B, D, 1) on CPUs
    row = torch.bmm(g.unsqueeze(1), stored.mT).squeeze(1)  # (B, m): <g, G_j>
    system = state.system
    if torch.is_grad_enabled() and row.requires_grad:
        system = system.clone()
    system.select(1, slot + 1).narrow(1, 1, m).copy_(row)
    system.select(2, slot + 1).narrow(1, 1, m).copy_(row)
    if state.count < m:  # first use of this slot: border it with ones
        system[:, 0, slot + 1] = 1.0
        system[:, slot + 1, 0] = 1.0
    return state._replace(images=images, residuals=residuals, system=system, count=state.count + 1)


def _mixing(state: AndersonState) -> Tensor:
    """Coefficients (B, 1, m) minimising ||a G||^2 + lam' ||a||^2 subject to sum(a) = 1.

    Solves the bordered system [[0, 1^T], [1, G G^T + lam' I]] [nu; a] = [1; 0] (the optimality
    conditions of the constrained least squares in the module docstring) with lam' = lam *
    ||G_newest||^2: relative to the newest residual, which keeps the ridge scale-free without
    letting the old, large residuals of a fast-converging iteration dominate it (as a ridge relative
    to trace(G G^T) does). A floor relative to the trace keeps the system away from round-off
    singularity and the tiny absolute term keeps an all-zero Gram (a sample already exactly at its
    fixed point) solvable. Both relative terms are one product of the system's diagonal with the
    precomputed weights of the newest slot.

    The Gram block is divided by its trace before the solve. That leaves ``a`` unchanged (only the
    multiplier nu scales), puts every entry of the system in [-1, 1] next to the border of ones,
    and makes the system of a problem rescaled by a power of two bitwise the same, so the
    iteration count cannot depend on the scale through the round-off of the solve (on a GPU's
    batched LU it did: 9 instead of 8 iterations at scale 2^40 in float32).
    """
    newest = (state.count - 1) % state.images.shape[1]
    diag = state.system.diagonal(dim1=1, dim2=2)  # (B, m+1): 0, ||G_1||^2, ..., ||G_m||^2
    terms = torch.matmul(diag, state.ridge_weights[newest])  # (B, 2): ridge, trace
    ridge, trace = terms.clamp_min_(_tiny(state.system.dtype)).view(-1, 2, 1, 1).unbind(1)
    system = torch.addcmul(state.system, ridge, state.ridge_eye)
    system = system.mul_(torch.addcdiv(state.border, state.block, trace))
    solution = torch.linalg.solve_ex(system, state.rhs)[0]  # (B, m+1, 1)
    return solution[:, 1:].mT  # (B, 1, m)


def _ridge_floor(dtype: torch.dtype) -> float:
    # above the round-off of a Gram matrix accumulated in this dtype
    return 1e-12 if dtype == torch.float64 else 1e-6


def _tiny(dtype: torch.dtype) -> float:
    # the smallest normal number: only an all-zero Gram block (a sample exactly at its fixed
    # point) ever meets it, so the ridge stays relative, and the iteration scale-free, down to
    # residuals whose squares are still normal numbers
    return float(torch.finfo(dtype).tiny)
