"""The default sampling solver: a Newton-type forward sweep with per-row secant Jacobians.

The joint system ``X[k+1] = step_k(X[k])`` (``equilibria/sampling/_system.py``) is block
lower-bidiagonal, so a Newton step is one forward sweep over the rows,
``X'[k+1] = step_k(X[k]) + J_k (X'[k] - X[k])`` with ``J_k = d step_k / d x`` at ``X[k]``:
no extra model call, only the Jacobians are missing. Cumulative Picard (ParaDiGMS) is this sweep
with ``J_k = I``. :class:`Secant` takes ``J_k = I + w_k u_k^T / (u_k^T u_k)``: the identity
corrected along the direction ``u_k`` the row's input moved between the last two rounds, so that
it maps ``u_k`` to the change of the row's image (Broyden's update of the identity, one per row
and sample, from pairs the rounds computed anyway).

The safeguard: a row uses the secant only where, on the previous round, the secant of the round
before predicted the row's new image better than the identity did (per row and sample, through
``torch.where``, no host synchronisation); elsewhere it is Picard's sweep. Together with the
driver's acceptance (the first unaccepted step is set exactly every round) the sweep keeps
Picard's bound of T rounds.

On ``benchmarks/sampling.py`` it needs at most as many rounds as every other solver at its
published defaults (cumulative Picard, ParaDiGMS, DEQ-DDIM's Anderson, ParaTAA's triangular
Anderson) to bring the sample within 1e-3 of the sequential one, with Picard's NFE per round;
plain and triangular Anderson did not earn that place there (see the README's table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._validate import check_bool
from ._anderson import _align, _Entry, _flat, _push
from ._system import Block, SamplingSolver, System, register_solver


@register_solver
@dataclass(frozen=True)
class Secant(SamplingSolver):
    """Newton-type forward sweep with a rank-one secant Jacobian per row, safeguarded by Picard.

    Use it (or its alias ``"default"``) to sample in few rounds; it costs what cumulative Picard
    costs per round (the same model calls, plus one sweep over the block's rows).

    Args:
        gate: use a row's secant only where the previous one predicted the row's image better
            than the identity (True, the safeguard); False uses every secant from the second
            round on.

    Example:
        >>> x0, sol = sampling.sample(model, x_T, sched, solver="secant")

    References: Shih et al. 2023 (ParaDiGMS, the cumulative Picard sweep this generalises);
    Broyden, "A class of methods for solving nonlinear simultaneous equations", Math. Comp. 1965.
    """

    gate: bool = True
    name: ClassVar[str] = "secant"

    def __post_init__(self) -> None:
        check_bool("gate", self.gate)

    def init(self, system: System) -> Any:
        return ()

    def update(self, system: System, block: Block, state: Any) -> tuple[Tensor, Any]:
        xin = _flat(block.x[:-1]).clone()  # (L, N, D) row inputs X[k] (block.x is a view)
        xout = _flat(block.x[1:])  # (L, N, D) the current X[k+1]
        f = _flat(block.f)  # (L, N, D) step_k(X[k])
        L = f.shape[0]
        history = _push(state, _Entry(block.start, xin, f, block.active), 3)
        u, coef = _secant(history, block.start, xin, f, self.gate)
        rel = (block.lo - block.start).clamp(0, L)  # (N,) row of each sample's accepted state
        rows = torch.arange(L, device=f.device).unsqueeze(1)  # (L, 1)
        live = (block.active & (rows >= rel.unsqueeze(0))).unsqueeze(-1)  # (L, N, 1)
        out = torch.empty_like(f)
        delta = torch.zeros_like(f[0])  # (N, D) X'[k] - X[k]; 0 at the accepted state
        for j in range(L):  # the forward sweep: X'[k+1] = f_k + J_k delta_k
            p = f[j] + delta
            if coef is not None:
                p = p + coef[j] * (u[j] * delta).sum(-1, keepdim=True)
            out[j] = p
            delta = torch.where(live[j], p - xout[j], torch.zeros_like(p))
        return out.reshape(block.f.shape), history


def _secant(
    history: tuple[_Entry, ...], start: int, x: Tensor, f: Tensor, gate: bool
) -> tuple[Tensor, Tensor | None]:
    """``(u, c)`` with ``J_k delta = delta + c_k (u_k . delta)`` per row and sample: ``u`` the
    input's change since the last round (L, N, D), ``c = (df - u) / |u|²`` where the secant is
    used and 0 elsewhere; ``c`` is None before the second round."""
    if len(history) < 2:
        return f, None
    tiny = torch.finfo(f.dtype).tiny
    xp, fp = _align(history[-2], start, x, f)
    u = x - xp
    uu = (u * u).sum(-1, keepdim=True)  # (L, N, 1)
    coef = ((f - fp) - u) / uu.clamp(min=tiny)
    use = uu > 0
    if gate:
        if len(history) < 3:
            return u, None  # nothing to check the first secant against yet
        xpp, fpp = _align(history[-3], start, xp, fp)
        u1 = xp - xpp
        uu1 = (u1 * u1).sum(-1, keepdim=True).clamp(min=tiny)
        identity = fp + u  # what Picard's J = I predicted for f
        secant = identity + ((fp - fpp) - u1) * ((u1 * u).sum(-1, keepdim=True) / uu1)
        better = (f - secant).pow(2).sum(-1, keepdim=True) < (f - identity).pow(2).sum(
            -1, keepdim=True
        )
        use = use & better
    return u, torch.where(use, coef, torch.zeros_like(coef))


@register_solver
@dataclass(frozen=True)
class Default(Secant):
    """The benchmarked default, ``solver="default"``: :class:`Secant` with the safeguard on.

    Chosen on ``benchmarks/sampling.py`` (see ``equilibria/sampling/_default.py``).
    """

    name: ClassVar[str] = "default"
