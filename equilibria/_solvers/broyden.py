"""Limited-memory ("good") Broyden root finding on g(z) = f(z) - z.

Broyden (Math. Comp. 1965), limited memory as in Bai, Kolter & Koltun, "Deep Equilibrium Models"
(NeurIPS 2019): the inverse Jacobian of g is approximated by H = -I + sum_i u_i v_i^T
with at most M pairs, so memory does not grow with the iteration budget (the original DEQ code and
TorchDEQ allocate max_iter pairs and multiply by all of them every step); when the M slots are used
up the approximation restarts from H = -I, updated at once with the latest secant pair (a bare -I
would throw away all curvature and take a Picard step). Step
p = -H g; after a step dz with residual change dg:  v = H^T dz,  u = (dz - H dg) / (v^T dg), skipped
per sample when the denominator vanishes. With H = -I the step is exactly a Picard step.

Each iteration costs four batched products with the stored vectors: H g_new (two) and H^T dz (two).
H dg is not computed separately: H dg = H g_new - H g = H g_new + p; and the next step
p' = -H' g_new follows from H g_new by a rank-one correction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from .._validate import check_bool, check_int
from ._base import Map, Solver, Step, write_slot

# |v^T dg| below this fraction of ||v|| ||dg|| skips the update (the secant pair carries no
# information and would blow up u).
_SKIP = 1e-10


class BroydenState(NamedTuple):
    us: Tensor  # (B, M, D)  u_i
    vs: Tensor  # (B, M, D)  v_i
    count: int  # pairs stored (at most M; the update after the M-th restarts with one pair)
    p: Tensor  # (B, D)  the next step, -H g


@dataclass(frozen=True)
class Broyden(Solver):
    """Limited-memory Broyden's method (a quasi-Newton root finder for f(z) - z = 0).

    Converges superlinearly near the solution and handles maps that are not contractive as long as
    the root is isolated; the memory is ``memory`` pairs of (B, D) vectors whatever the budget.

    Args:
        memory: number of rank-one updates kept before the approximation restarts from -I
            (with the latest update applied to it), >= 2.
        line_search: backtrack the step per sample (Armijo condition on ||g||) when it does not
            decrease the residual; costs extra map evaluations, reported in ``Solution.nfev``.
        max_backtracks: halvings of the step tried by the line search, in [1, 60] (a step
            halved more often than a float64 mantissa has bits changes nothing).

    Example:
        >>> sol = eq.solve(f, z0, solver=eq.Broyden(memory=20, line_search=True))

    Reference: Broyden, "A class of methods for solving nonlinear simultaneous equations", Math.
    Comp. 1965; used for DEQs by Bai, Kolter & Koltun, NeurIPS 2019.
    """

    memory: int = 20
    line_search: bool = False
    max_backtracks: int = 4
    name: ClassVar[str] = "broyden"

    def __post_init__(self) -> None:
        check_int("Broyden memory", self.memory, minimum=2)
        check_bool("Broyden line_search", self.line_search)
        check_int("Broyden max_backtracks", self.max_backtracks, minimum=1, maximum=60)

    def init(self, x: Tensor, fx: Tensor, g: Tensor) -> BroydenState:
        b, d = x.shape
        us, vs = x.new_zeros(b, self.memory, d), x.new_zeros(b, self.memory, d)
        return BroydenState(us, vs, 0, g)

    def step(self, fn: Map, x: Tensor, fx: Tensor, g: Tensor, state: BroydenState) -> Step:
        p = state.p
        if self.line_search:
            x_new, fx_new, g_new, nfev = self._search(fn, x, g, p)
        else:
            x_new = x + p
            fx_new = fn(x_new)
            g_new = fx_new - x_new
            nfev = 1
        if state.count >= self.memory:
            # The ring is full: restart from H = -I, for which -H g = g, and apply this step's
            # secant pair to it as its first update. (Dropping only the oldest pair is not sound:
            # every later pair was computed relative to an H that contained it, and the iteration
            # measurably diverges that way.)
            n, minus_h_g = 0, g
        else:
            n, minus_h_g = state.count, p
        us, vs = state.us[:, :n], state.vs[:, :n]  # (B, n, D)
        dx, dg = x_new - x, g_new - g
        h_g = _combine(us, _dots(vs, g_new)) - g_new if n else -g_new  # H g_new
        h_dg = h_g + minus_h_g  # H dg = H g_new - H g
        v = _combine(vs, _dots(us, dx)) - dx if n else -dx  # H^T dx
        denom = torch.linalg.vecdot(v, dg).unsqueeze(1)  # (B, 1)
        scale = torch.linalg.vector_norm(v, dim=1, keepdim=True) * torch.linalg.vector_norm(
            dg, dim=1, keepdim=True
        )
        keep = denom.abs() > _SKIP * scale
        u = torch.where(keep, (dx - h_dg) / torch.where(keep, denom, 1.0), 0.0)
        # next step p' = -H' g_new with H' = H + u v^T
        p_next = -torch.addcmul(h_g, u, torch.linalg.vecdot(v, g_new).unsqueeze(1))
        state = BroydenState(write_slot(state.us, n, u), write_slot(state.vs, n, v), n + 1, p_next)
        return Step(x_new, fx_new, g_new, state, nfev)

    def _search(self, fn: Map, x: Tensor, g: Tensor, p: Tensor) -> tuple[Tensor, ...]:
        """Per-sample backtracking: accept t where ||g(x + t p)|| <= (1 - 1e-4 t) ||g(x)||.

        Samples that never satisfy the condition keep the trial with the smallest residual.
        """
        norm0 = torch.linalg.vector_norm(g, dim=1)
        t = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        for trial in range(self.max_backtracks + 1):
            x_try = x + t * p
            fx_try = fn(x_try)
            g_try = fx_try - x_try
            norm = torch.linalg.vector_norm(g_try, dim=1)
            if trial == 0:
                best_x, best_fx, best_g, best_norm = x_try, fx_try, g_try, norm
            else:
                better = norm < best_norm
                b = better.unsqueeze(1)
                best_x = torch.where(b, x_try, best_x)
                best_fx = torch.where(b, fx_try, best_fx)
                best_g = torch.where(b, g_try, best_g)
                best_norm = torch.where(better, norm, best_norm)
            accepted = norm <= (1.0 - 1e-4 * t.squeeze(1)) * norm0
            if bool(accepted.all()):
                break
            t = torch.where(accepted.unsqueeze(1), t, 0.5 * t)
        return best_x, best_fx, best_g, trial + 1


def _dots(vectors: Tensor, x: Tensor) -> Tensor:
    """(B, n, D), (B, D) -> (B, 1, n): the dot product of x with every stored vector.

    Written as (B, 1, D) @ (B, D, n), several times faster on CPUs than (B, n, D) @ (B, D, 1).
    """
    return torch.bmm(x.unsqueeze(1), vectors.mT)


def _combine(vectors: Tensor, coeffs: Tensor) -> Tensor:
    """(B, n, D), (B, 1, n) -> (B, D): sum_i coeffs_i * vectors_i."""
    return torch.bmm(coeffs, vectors).squeeze(1)
