"""The one driver loop shared by every solver.

It owns what solvers should not repeat: the iteration budget, per-sample stopping in the abs or rel
norm, the best iterate per sample, the residual traces, divergence and non-finite detection, and the
final status. Each iteration costs one host synchronisation (three scalars: the largest current
residual, the largest best residual and the largest gain), which decides whether to stop and whether
the best iterate must be copied; nothing else leaves the device.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ._errors import NonFiniteError
from ._solution import Status
from ._solvers import Solver
from ._solvers._base import Map

# The solve stops as DIVERGED when the largest residual exceeds this multiple of the smallest
# largest-residual seen so far (a blow-up, not a transient).
DIVERGENCE_FACTOR = 1e6


class Iteration(NamedTuple):
    value: Tensor  # (B, D) best iterate per sample
    residual: Tensor  # (B,) its residual in the stop norm
    status: Status
    nstep: int
    nfev: int
    trace: list[float]  # largest residual per iteration
    residuals: list[Tensor]  # (B,) per iteration
    trajectory: list[Tensor] | None  # every iterate (B, D), when asked for


def residual_norm(g: Tensor, fx: Tensor, stop: Literal["abs", "rel"]) -> Tensor:
    """(B,) residual ||g|| (abs) or ||g|| / ||f(z)|| (rel) per sample."""
    r = torch.linalg.vector_norm(g, dim=1)
    if stop == "rel":
        r = r / (torch.linalg.vector_norm(fx, dim=1) + torch.finfo(fx.dtype).tiny)
    return r


def iterate(
    fn: Map,
    x0: Tensor,
    solver: Solver,
    *,
    tol: float,
    max_iter: int,
    stop: Literal["abs", "rel"],
    keep_trajectory: bool = False,
    what: str = "the solve",
) -> Iteration:
    """Run ``solver`` on the flat map ``fn`` (B, D) -> (B, D) from ``x0`` (B, D).

    Under ``torch.autocast`` the map runs with autocast on, while the solver's own arithmetic
    (mixing, Gram matrices, norms) runs with autocast off, in the state's dtype or float64.
    """
    device_type = x0.device.type
    autocast_ctx = nullcontext()
    if torch.is_autocast_enabled(device_type):
        fn = _with_autocast(fn, device_type, torch.get_autocast_dtype(device_type))
        autocast_ctx = torch.autocast(device_type, enabled=False)
    with autocast_ctx:
        return _loop(fn, x0, solver, tol, max_iter, stop, keep_trajectory, what)


def _with_autocast(fn: Map, device_type: str, dtype: torch.dtype) -> Map:
    def fn_autocast(x: Tensor) -> Tensor:
        with torch.autocast(device_type, dtype=dtype):
            return fn(x)

    return fn_autocast


def _loop(
    fn: Map,
    x0: Tensor,
    solver: Solver,
    tol: float,
    max_iter: int,
    stop: Literal["abs", "rel"],
    keep_trajectory: bool,
    what: str,
) -> Iteration:
    if not bool(torch.isfinite(x0).all()):
        bad = _bad_samples(~torch.isfinite(x0).all(1))
        raise NonFiniteError(f"the initial state of {what} contains NaN or inf (samples {bad})")
    x = x0
    fx = fn(x)
    g = fx - x
    r = residual_norm(g, fx, stop)
    best_x, best_r = x, r
    rmax = float(r.max())
    if not math.isfinite(rmax):
        _raise_nonfinite(what, 1, x, fx, r)
    trace, residuals = [rmax], [r]
    trajectory = [x] if keep_trajectory else None
    nfev, nstep = 1, 1
    status = Status.CONVERGED if rmax < tol else Status.MAX_ITER
    state = solver.init(x, fx, g) if status is not Status.CONVERGED and max_iter > 1 else None
    lowest = rmax
    while status is Status.MAX_ITER and nstep < max_iter:
        x, fx, g, state, used = solver.step(fn, x, fx, g, state)
        nfev += used
        nstep += 1
        r = residual_norm(g, fx, stop)
        gain = r - best_r  # (B,) negative where the new iterate is better
        best_r = torch.minimum(best_r, r)
        # the one host synchronisation per iteration: largest residual, largest best residual,
        # largest gain (a NaN residual propagates into all three and is caught below)
        rmax, bmax, gmax = torch.stack((r, best_r, gain)).amax(1).tolist()
        # usually every sample improved: the best iterate is then the current one, no copy needed
        best_x = x if gmax < 0 else torch.where((gain < 0).unsqueeze(1), x, best_x)
        if not math.isfinite(rmax):
            _raise_nonfinite(what, nstep, x, fx, r)
        trace.append(rmax)
        residuals.append(r)
        if trajectory is not None:
            trajectory.append(x)
        if bmax < tol:
            status = Status.CONVERGED
        elif rmax > DIVERGENCE_FACTOR * lowest:
            status = Status.DIVERGED
        lowest = min(lowest, rmax)
    if best_x is x0:
        best_x = best_x.clone()
    return Iteration(best_x, best_r, status, nstep, nfev, trace, residuals, trajectory)


def _bad_samples(mask: Tensor, limit: int = 10) -> str:
    idx = mask.nonzero().flatten().tolist()
    shown = ", ".join(map(str, idx[:limit]))
    return shown + (f", ... ({len(idx)} in all)" if len(idx) > limit else "")


def _raise_nonfinite(what: str, nstep: int, x: Tensor, fx: Tensor, r: Tensor) -> None:
    x_bad = ~torch.isfinite(x).all(1)
    fx_bad = ~torch.isfinite(fx).all(1)
    if bool(x_bad.any()):
        source = f"the solver's update produced NaN or inf (samples {_bad_samples(x_bad)})"
    elif bool(fx_bad.any()):
        source = f"the map returned NaN or inf (samples {_bad_samples(fx_bad)})"
    else:
        source = f"the residual overflowed (samples {_bad_samples(~torch.isfinite(r))})"
    raise NonFiniteError(f"non-finite values in {what} at iteration {nstep}: {source}")
