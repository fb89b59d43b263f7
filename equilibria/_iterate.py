"""The one driver loop shared by every solver.

It owns what solvers should not repeat: the iteration budget, per-sample stopping in the abs or rel
norm, the best iterate per sample, the residual traces, divergence and non-finite detection, the
final status, and the range of the values a solver sees: a problem whose values lie far from 1
(beyond 2^+-32 in float32, 2^+-256 in float64) is iterated in per-sample power-of-two units, so
that no solver's products overflow or underflow and every solver is scale invariant over the
dtype's whole range (``_units``).

Each iteration moves the per-sample residual norms (B or 2B scalars) to the host: on a GPU that
is the one synchronisation per iteration, and on a CPU it costs nothing. All bookkeeping on those
scalars then runs in NumPy instead of as a string of tiny tensor operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._errors import NonFiniteError
from ._solution import Status
from ._solvers import Solver
from ._solvers._base import Map

# The solve stops as DIVERGED when a sample's residual ||f(z) - z|| exceeds this multiple of the
# lowest it has had (a blow-up, not a transient).
DIVERGENCE_FACTOR = 1e6


class Iteration(NamedTuple):
    value: Tensor  # (B, D) best iterate per sample
    residual: np.ndarray  # (B,) float64, its residual in the stop norm
    status: Status
    nstep: int
    nfev: int
    trace: list[float]  # largest residual per iteration
    residuals: list[np.ndarray]  # (B,) per iteration; NaN for samples no longer iterated
    trajectory: list[Tensor] | None  # every iterate (B, D), when asked for (not with compaction)
    evaluations: int  # sample-evaluations of the map (rows passed to it, summed over calls)


def residual_norm(
    g: Tensor,
    fx: Tensor,
    stop: Literal["abs", "rel"],
    gsq: Tensor | None = None,
    scaled: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(B,) float64 residuals per sample, on the host: in the stop norm, ||g|| (abs) or
    ||g|| / ||f(z)|| (rel), and ||g|| itself (the same array for abs).

    The per-sample norms are computed on the device; the few scalars per sample then live on the
    host, where the bookkeeping of a solve (best iterate, stopping, traces) costs next to nothing.
    This is the one device-to-host transfer (on a GPU, the one synchronisation) per iteration.
    ``gsq``, the squared norms of ``g`` when the solver already has them, saves a pass over ``g``.
    ``scaled``: the values are in the driver's units (``_units``), not the problem's own.

    Edge cases are exact rather than fast: a norm that underflows to 0 or overflows is recomputed
    exactly (see :func:`exact_norms`); a zero residual is 0 whatever ||f(z)||; a non-zero residual
    over ``f(z) = 0`` counts as the largest finite float (not converged, not an error). Raises
    nothing: non-finite values come back as NaN and are reported by the caller.
    """
    norms, regular = _host_norms(g, fx, 1 if stop == "abs" else 2, gsq, scaled)
    if stop == "abs":
        return norms[0], norms[0]
    return (norms[0] / norms[1] if regular else _rel_exact(*norms)), norms[0]


def _host_norms(
    g: Tensor, fx: Tensor, count: int, gsq: Tensor | None = None, scaled: bool = False
) -> tuple[list[np.ndarray], bool]:
    """[||g||] or [||g||, ||f(z)||] per sample on the host, fast, with the exact fallback; and
    whether they are all positive and finite (no special case needed). ``scaled``: the values
    are in the driver's units, so a small ||g|| may stand for a large abs residual."""
    tensors = [torch.linalg.vector_norm(g, dim=1) if gsq is None else gsq]
    if count == 2:
        tensors.append(torch.linalg.vector_norm(fx, dim=1))
    norms = to_host(tensors)
    if gsq is not None:
        # a squared norm near the bottom of its dtype's range has lost precision (or hit 0)
        if not bool(norms[0].min() > _SQUARE_FLOOR[gsq.dtype]):
            return to_host(exact_norms((g, fx)[:count])), False
        norms[0] = np.sqrt(norms[0])  # a new array: gsq may be a view of the solver's state
    floor = _NORM_FLOOR.get(g.dtype, 0.0)
    if all(_regular(n, floor) for n in norms):
        return norms, True
    # A norm below the floor (its squares subnormal or 0) is as good as exact where the residual
    # it gives is negligible anyway: ||g|| < 1e-154 over an ||f(z)|| in the float64 band (rel), or
    # in the problem's own units (abs). Otherwise it may be an underflow far from the truth: the
    # units are chosen at the first iterate, and a z0 at 1e200 from an O(1) fixed point puts
    # f(z) - z under 1e-162 in them, whose plain norm is 0.
    if g.dtype == torch.float64 and gsq is None and bool(np.isfinite(norms[0]).all()):
        if count == 2 and _regular(norms[1], _BAND_FLOOR_F64):
            return norms, False
        if count == 1 and not scaled:
            return norms, False
    return to_host(exact_norms((g, fx)[:count])), False


def exact_norms(tensors: tuple[Tensor, ...]) -> list[Tensor]:
    """Per-sample 2-norms (B,) that neither overflow nor underflow while the result is a normal
    float64: in float64 for lower precisions, and for float64 tensors by dividing each row by its
    largest magnitude first (``torch.linalg.vector_norm`` sums the plain squares, which overflow
    from about 1e154 and underflow below about 1e-162). Non-finite rows give inf or NaN."""
    norms = []
    for t in tensors:
        t = t.detach()
        if t.dtype != torch.float64:
            norms.append(torch.linalg.vector_norm(t, dim=1, dtype=torch.float64))
            continue
        top = t.abs().amax(dim=1, keepdim=True)  # (B, 1)
        top = torch.where((top > 0) & torch.isfinite(top), top, 1.0)
        norms.append(torch.linalg.vector_norm(t / top, dim=1) * top.squeeze(1))
    return norms


_SQUARE_FLOOR = {
    dt: float(torch.finfo(dt).tiny / torch.finfo(dt).eps)
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


# Below sqrt(tiny) a norm summed from squares in the tensor's own dtype (float32, float64) had
# only subnormal squares: imprecise, or 0 by underflow. Half-precision norms accumulate in float32.
_NORM_FLOOR = {dt: math.sqrt(torch.finfo(dt).tiny) for dt in (torch.float32, torch.float64)}


# the bottom of the float64 band of _units, 2^-256
_BAND_FLOOR_F64 = 2.0**-256


def _regular(norms: np.ndarray, floor: float = 0.0) -> bool:
    """All norms above ``floor`` (and positive) and finite: the fast path needs no special
    case."""
    return bool(norms.min() > floor) and bool(norms.min() > 0.0) and bool(norms.max() < np.inf)


def _rel_exact(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """||g|| / ||f(z)|| with the exact treatment of zero and non-finite norms."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = num / den
    finite = np.isfinite(num) & np.isfinite(den)
    r = np.where(num == 0.0, 0.0, np.where(den == 0.0, _HUGE, r))
    return np.where(finite, np.minimum(r, _HUGE), np.nan)


_HUGE = float(np.finfo(np.float64).max)


def to_host(tensors: list[Tensor]) -> list[np.ndarray]:
    """Move small (B,) tensors to the host as float64 arrays in one transfer."""
    tensors = [t.detach() for t in tensors]
    if tensors[0].device.type == "cpu":  # zero-copy views, no synchronisation
        return [_as_float64((t if t.dtype in _NUMPY_OK else t.float()).numpy()) for t in tensors]
    stacked = torch.stack([t if t.dtype in _NUMPY_OK else t.float() for t in tensors]).cpu()
    return [_as_float64(row) for row in stacked.numpy()]


_NUMPY_OK = (torch.float32, torch.float64)


def _as_float64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64, copy=False)


IndexedMap = Callable[[Tensor, "Tensor | None"], Tensor]


# Under torch.compile of a whole model, dynamo runs the solver loop eagerly instead of tracing it:
# its control flow depends on residuals read back every iteration and its ring-buffer slots are
# Python ints, so tracing would recompile over and over (and hit dynamo's recompile limit). A cell
# compiled on its own (``torch.compile(cell)``) still runs compiled inside the loop.
@torch.compiler.disable
def iterate(
    fn: Map | IndexedMap,
    x0: Tensor,
    solver: Solver,
    *,
    tol: float,
    max_iter: int,
    stop: Literal["abs", "rel"],
    keep_trajectory: bool = False,
    compact: bool = False,
    what: str = "the solve",
) -> Iteration:
    """Run ``solver`` on the flat map ``fn`` (B, D) -> (B, D) from ``x0`` (B, D).

    With ``compact=True`` the map is called as ``fn(x, index)``, where ``index`` (a 1-D long tensor
    of positions in the original batch, or None for the whole batch) says which samples the rows
    of ``x`` are; samples that reached ``tol`` are dropped from the batch (per-sample compaction)
    and keep their first iterate below ``tol``.

    Under ``torch.autocast`` the map runs with autocast on, while the solver's own arithmetic
    (mixing, Gram matrices, norms) runs with autocast off, in the state's dtype or better.
    """
    if x0.shape[0] == 0:  # an empty batch (as torch layers accept): nothing to solve, no map call
        return Iteration(x0.clone(), np.zeros(0), Status.CONVERGED, 0, 0, [], [],
                         [] if keep_trajectory else None, 0)  # fmt: skip
    device_type = x0.device.type
    autocast_ctx = nullcontext()
    if torch.is_autocast_enabled(device_type):
        fn = _with_autocast(fn, device_type, torch.get_autocast_dtype(device_type))
        autocast_ctx = torch.autocast(device_type, enabled=False)
    with autocast_ctx:
        if compact:
            return _loop_compact(fn, x0, solver, tol, max_iter, stop, what)  # type: ignore[arg-type]
        return _loop(fn, x0, solver, tol, max_iter, stop, keep_trajectory, what)  # type: ignore[arg-type]


def _with_autocast(fn: Callable[..., Tensor], device_type: str, dtype: torch.dtype) -> Callable:
    def fn_autocast(*args: Any) -> Tensor:
        # No cast cache in no-grad iterations: torch before 2.5 caches the low-precision copies of
        # parameters made under no_grad too, and the differentiable call after the solve (same
        # outer autocast region) then reuses copies without a graph: the parameter gradients
        # silently vanished. Newer torch does not cache there either.
        with torch.autocast(device_type, dtype=dtype, cache_enabled=torch.is_grad_enabled()):
            return fn(*args)

    return fn_autocast


class _Divergence:
    """Per-sample blow-up test on the abs residual ||f(z) - z||, whatever the stop norm.

    A sample diverges when its residual exceeds DIVERGENCE_FACTOR times the lowest it has had. The
    lowest is floored at the round-off level of a residual, the dtype's eps times the batch's
    largest ||f(z0)|| (or first residual, if larger), so that a sample that reached its fixed point
    exactly is not declared divergent by round-off noise, also when the solve starts at the fixed
    point (a warm start, whose first residuals are round-off themselves); and the abs residual,
    unlike the rel one, stays meaningful for a sample whose fixed point is 0.
    """

    def __init__(self, first: np.ndarray, scale: float, dtype: torch.dtype) -> None:
        self.lowest = first.copy()
        self.floor = float(torch.finfo(dtype).eps) * max(float(first.max()), scale)

    def blown(self, residual: np.ndarray, active: np.ndarray | None = None) -> bool:
        lowest = self.lowest if active is None else self.lowest[active]
        out = bool((residual > DIVERGENCE_FACTOR * np.maximum(lowest, self.floor)).any())
        if active is None:
            self.lowest = np.minimum(lowest, residual)
        else:
            self.lowest[active] = np.minimum(lowest, residual)
        return out


def _first_iterate(
    x: Tensor, fx: Tensor, stop: Literal["abs", "rel"], what: str
) -> tuple[Tensor, np.ndarray, float, _Divergence, _Units | None]:
    """g, the stop-norm residuals, their maximum, the divergence test of the first iterate and
    the per-sample units the solver iterates in (None: the values are fine as they are)."""
    g = fx - x
    norms, _ = _host_norms(g, fx, 2)  # one transfer, ||f(z0)|| included
    r = norms[0] if stop == "abs" else _rel_exact(*norms)
    rmax = float(r.max())
    if not math.isfinite(rmax):
        _raise_nonfinite(what, 1, x, fx, r)
    divergence = _Divergence(norms[0], float(norms[1].max()), x.dtype)
    return g, r, rmax, divergence, _units(np.maximum(norms[0], norms[1]), x)


class _Units:
    """Per-sample powers of two that bring each sample's values near 1: the solver iterates on
    the map ``z -> unit * f(z / unit)`` from ``unit * z0`` (exact in floating point, but for
    entries so far below their sample's size that they fall among the subnormals), so its
    Gram matrices, dot products and squared norms neither overflow nor underflow however large or
    small the problem's values are, and a problem rescaled by any factor is solved in the same
    steps (by a power of two: bitwise the same). Abs residuals are divided back on the host."""

    def __init__(self, unit: np.ndarray, like: Tensor) -> None:
        self.inv_host = 1.0 / unit  # (B,) exact: powers of two
        self.unit = torch.from_numpy(unit).to(like.device, like.dtype).unsqueeze(1)  # (B, 1)
        self.inv = torch.from_numpy(self.inv_host).to(like.device, like.dtype).unsqueeze(1)

    def map(self, fn: Map) -> Map:
        def fn_units(z: Tensor) -> Tensor:
            return fn(z * self.inv) * self.unit

        return fn_units

    def indexed_map(self, fn: IndexedMap) -> IndexedMap:
        def fn_units(z: Tensor, index: Tensor | None) -> Tensor:
            unit, inv = self.unit, self.inv
            if index is not None:
                unit, inv = unit.index_select(0, index), inv.index_select(0, index)
            return fn(z * inv, index) * unit

        return fn_units


# the dtype's largest binary exponent plus one (NumPy's finfo.maxexp): float32 128, float64 1024
_MAXEXP = {
    dt: math.frexp(torch.finfo(dt).max)[1]
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


def _units(size: np.ndarray, x: Tensor) -> _Units | None:
    """The units for samples of sizes ``size`` (B,) (max of ||f(z0) - z0|| and ||f(z0)||), or None
    when every size lies within 2^(+-maxexp/4) of 1 in the dtype the solvers' products run in
    (float32 for half states): the common case, in which nothing changes and nothing is added.

    Inside that band the squares of residuals down to the dtype's round-off relative to the size
    are normal numbers, and Gram entries and dot products stay far from overflow."""
    band = _MAXEXP[x.dtype if x.dtype == torch.float64 else torch.float32] // 4  # 32 or 256
    with np.errstate(divide="ignore"):
        exponent = np.log2(size)  # -inf for a sample at its fixed point 0: any unit serves it
    if bool((np.abs(exponent[size > 0]) <= band).all()):  # sizes 0 do not count
        return None
    top = _MAXEXP[x.dtype] - 2  # 2^+-top is a normal number of the state's dtype
    exponent = np.where(np.isfinite(exponent), -np.round(exponent), 0.0).clip(-top, top)
    return _Units(np.exp2(exponent), x)


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
    batch = x0.shape[0]
    x = x0
    fx = fn(x)
    g, r, rmax, divergence, units = _first_iterate(x, fx, stop, what)
    best_x, best_r = x, r
    trace, residuals = [rmax], [r]
    trajectory = [x] if keep_trajectory else None
    nfev, nstep = 1, 1
    status = Status.CONVERGED if rmax < tol else Status.MAX_ITER
    if units is not None and status is Status.MAX_ITER and max_iter > 1:
        fn, x, fx, g = units.map(fn), x * units.unit, fx * units.unit, g * units.unit
        best_x = x
    state = solver.init(x, fx, g) if status is Status.MAX_ITER and max_iter > 1 else None
    while status is Status.MAX_ITER and nstep < max_iter:
        x, fx, g, state, used, gsq = solver.step(fn, x, fx, g, state)
        nfev += used
        nstep += 1
        # the one device-to-host transfer per iteration
        r, r_abs = residual_norm(g, fx, stop, gsq, scaled=units is not None)
        if units is not None:
            r_abs = r_abs * units.inv_host
            r = r_abs if stop == "abs" else r
        rmax = float(r.max())  # NaN propagates
        if not math.isfinite(rmax):
            _raise_nonfinite(what, nstep, x, fx, r)
        better = r < best_r
        if better.all():  # the usual case: no copy, the best iterate is the current one
            best_x = x
        elif better.any():
            mask = torch.from_numpy(better).to(x.device).unsqueeze(1)
            best_x = torch.where(mask, x, best_x)
        best_r = np.minimum(best_r, r)
        trace.append(rmax)
        residuals.append(r)
        if trajectory is not None:
            trajectory.append(x if units is None else x * units.inv)
        if best_r.max() < tol:
            status = Status.CONVERGED
        elif divergence.blown(r_abs):
            status = Status.DIVERGED
    if best_x is x0:
        best_x = best_x.clone()
    elif units is not None:
        best_x = best_x * units.inv
    evaluations = batch * nfev
    return Iteration(best_x, best_r, status, nstep, nfev, trace, residuals, trajectory, evaluations)


def _loop_compact(
    fn: IndexedMap,
    x0: Tensor,
    solver: Solver,
    tol: float,
    max_iter: int,
    stop: Literal["abs", "rel"],
    what: str,
) -> Iteration:
    batch = x0.shape[0]
    x = x0
    fx = fn(x, None)
    g, r, rmax, divergence, units = _first_iterate(x, fx, stop, what)
    best_x, best_r = x0.clone(), r.copy()
    trace, residuals = [rmax], [r]
    nfev, nstep, evaluations = 1, 1, batch
    active = np.arange(batch)  # positions in the original batch of the rows being iterated
    index: Tensor | None = None
    status = Status.CONVERGED if rmax < tol else Status.MAX_ITER
    if status is not Status.MAX_ITER or max_iter == 1:
        units = None  # no step to take: best_x stays z0 in the problem's own units
    if units is not None:
        fn, x, fx, g = units.indexed_map(fn), x * units.unit, fx * units.unit, g * units.unit
        best_x = x.clone()
    state = solver.init(x, fx, g) if status is Status.MAX_ITER and max_iter > 1 else None
    done = r < tol
    while status is Status.MAX_ITER and nstep < max_iter:
        if done.any():  # drop the samples that reached tol from everything the solver carries
            keep = torch.from_numpy(np.flatnonzero(~done)).to(x.device)
            state = solver.select(state, keep)
            x, fx, g = x.index_select(0, keep), fx.index_select(0, keep), g.index_select(0, keep)
            active = active[~done]
            index = torch.from_numpy(active).to(x.device)

        def fn_active(z: Tensor, index: Tensor | None = index) -> Tensor:
            return fn(z, index)

        x, fx, g, state, used, gsq = solver.step(fn_active, x, fx, g, state)
        nfev += used
        nstep += 1
        evaluations += used * len(active)
        r_active, abs_active = residual_norm(g, fx, stop, gsq, scaled=units is not None)
        if units is not None:
            abs_active = abs_active * units.inv_host[active]
            r_active = abs_active if stop == "abs" else r_active
        rmax = float(r_active.max())
        if not math.isfinite(rmax):
            _raise_nonfinite(what, nstep, x, fx, r_active, active)
        better = r_active < best_r[active]
        if better.any():
            rows = torch.from_numpy(np.flatnonzero(better)).to(x.device)
            best_x.index_copy_(0, torch.from_numpy(active[better]).to(x.device), x[rows])
            best_r[active[better]] = r_active[better]
        r = np.full(batch, np.nan)
        r[active] = r_active
        trace.append(rmax)
        residuals.append(r)
        done = r_active < tol
        if done.all():
            status = Status.CONVERGED
        elif divergence.blown(abs_active, active):
            status = Status.DIVERGED
    if units is not None:
        best_x = best_x * units.inv
    return Iteration(best_x, best_r, status, nstep, nfev, trace, residuals, None, evaluations)


def _bad_samples(
    mask: Tensor | np.ndarray, active: np.ndarray | None = None, limit: int = 10
) -> str:
    """The sample indices where ``mask`` is true (mapped through ``active`` under compaction)."""
    if isinstance(mask, Tensor):
        mask = mask.cpu().numpy()
    idx = np.flatnonzero(mask)
    if active is not None:
        idx = active[idx]
    shown = ", ".join(map(str, idx[:limit].tolist()))
    return shown + (f", ... ({len(idx)} in all)" if len(idx) > limit else "")


def _raise_nonfinite(
    what: str,
    nstep: int,
    x: Tensor,
    fx: Tensor,
    r: np.ndarray,
    active: np.ndarray | None = None,
) -> None:
    x_bad = ~torch.isfinite(x).all(1)
    fx_bad = ~torch.isfinite(fx).all(1)
    if nstep == 1 and bool(x_bad.any()):  # checked here, not up front: the fast path skips it
        bad = _bad_samples(x_bad, active)
        raise NonFiniteError(f"the initial state of {what} contains NaN or inf (samples {bad})")
    if bool(x_bad.any()):
        source = f"the solver's update produced NaN or inf (samples {_bad_samples(x_bad, active)})"
    elif bool(fx_bad.any()):
        source = f"the map returned NaN or inf (samples {_bad_samples(fx_bad, active)})"
    else:
        source = f"the residual overflowed (samples {_bad_samples(~np.isfinite(r), active)})"
    raise NonFiniteError(f"non-finite values in {what} at iteration {nstep}: {source}")
