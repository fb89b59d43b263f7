"""The functional core: solve a fixed point, and make it differentiable.

``solve`` finds z* = f(z*) without autograd. ``fixed_point`` does the same and attaches a backward
method (ALGORITHMS.md §2) so that gradients reach every parameter and tensor ``f`` closes over.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ._backward import JFB, Backward, Implicit, Neumann, Phantom, Unrolled, resolve_backward
from ._iterate import Iteration, iterate
from ._solution import BackwardInfo, Solution, Status
from ._solvers import Solver, resolve_solver
from ._solvers._base import Map
from ._tree import StateSpec
from ._validate import check_bool, check_choice, check_float, check_int

StopNorm = Literal["abs", "rel"]


def _check_options(tol: Any, max_iter: Any, stop: Any, warn_unconverged: Any) -> None:
    check_float("tol", tol, low=0.0, low_open=False)
    check_int("max_iter", max_iter, minimum=1)
    check_choice("stop", stop, ("abs", "rel"))
    check_bool("warn_unconverged", warn_unconverged)


def _check_callable(f: Any) -> None:
    if not callable(f):
        raise TypeError(f"f must be callable (a map z -> f(z)), got {type(f).__name__}")


# not traced: dynamo would guard on the signature of f, a new closure at every DEQ call, and
# recompile the surrounding module at every call
@torch.compiler.disable
def _check_takes_index(f: Any, compact: bool) -> None:
    """Under compaction ``f`` must accept ``f(z, index)``."""
    if compact:
        try:
            inspect.signature(f).bind(None, None)
        except TypeError:
            raise TypeError(
                "with compact=True, f is called as f(z, index) (index: the positions in the full "
                "batch of the rows of z, None for the whole batch), but f takes no second "
                "argument"
            ) from None
        except ValueError:  # no signature to inspect (a builtin): the call will tell
            pass


def _to_solution(
    it: Iteration, spec: StateSpec, solver: Solver, stop: str, tol: float, value: Tensor
) -> Solution:
    dtype = value.dtype if value.dtype in (torch.float32, torch.float64) else torch.float32
    residual = torch.from_numpy(it.residual).to(device=value.device, dtype=dtype)
    return Solution(
        value=spec.unflatten(value),
        status=it.status,
        nstep=it.nstep,
        nfev=it.nfev,
        residual=residual,
        converged=torch.from_numpy(it.residual < tol).to(value.device),
        trace=torch.tensor(it.trace, dtype=torch.float64, device="cpu"),
        residuals=torch.from_numpy(
            np.stack(it.residuals) if it.residuals else np.zeros((0, len(it.residual)))
        ),
        evaluations=it.evaluations,
        stop=stop,
        tol=tol,
        solver=solver.name,
    )


def _warn_if_unconverged(sol: Solution, what: str) -> None:
    if sol.status is not Status.CONVERGED:
        n_bad = int((~sol.converged).sum())
        warnings.warn(
            f"{what} ended with status {sol.status.value!r} after {sol.nstep} iterations: "
            f"{n_bad} of {sol.converged.numel()} samples above tol={sol.tol:g} "
            f"(largest residual {float(sol.residual.max()):.3e})",
            RuntimeWarning,
            stacklevel=3,
        )


def solve(
    f: Callable[[Any], Any],
    z0: Any,
    *,
    solver: str | Solver = "anderson",
    tol: float = 1e-4,
    max_iter: int = 50,
    stop: StopNorm = "rel",
    warn_unconverged: bool = False,
    compact: bool = False,
) -> Solution:
    """Find z* = f(z*) from ``z0`` without recording gradients.

    Use it for inference, for analysis, or inside your own differentiation scheme; use
    :func:`fixed_point` when gradients must flow to what ``f`` closes over.

    Args:
        f: the map; takes and returns a state with the structure of ``z0``.
        z0: initial state: a batch-first tensor, or a tuple or dict of them (same batch size,
            dtype and device). Every sample is solved independently. An empty batch (size 0)
            returns at once: no map call, ``nstep`` 0, status converged.
        solver: a registered name (``"picard"``, ``"anderson"``, ``"broyden"``) or a solver object
            such as ``eq.Anderson(m=6)``.
        tol: a sample stops when its residual falls below ``tol``; ``0`` runs the whole budget
            (a fixed number of iterations).
        max_iter: iteration budget (map evaluations at the iterates, ``z0`` included).
        stop: ``"rel"``: ||f(z) - z|| / ||f(z)|| (scale-free); ``"abs"``: ||f(z) - z||. The rel
            norm has no absolute floor (one would break scale invariance, also of adjoint solves
            with tiny gradients), so a sample whose fixed point is 0 approached geometrically
            keeps a rel residual near 1 - rho: use ``"abs"`` for such problems. Divergence is
            judged per sample on ||f(z) - z|| in either norm.
        warn_unconverged: emit a ``RuntimeWarning`` when the budget runs out or the solve diverges.
        compact: per-sample compaction: samples that reached ``tol`` are dropped from the batch
            passed to ``f``, which is then called as ``f(z, index)`` with ``index`` the positions
            of the rows of ``z`` in the original batch (a 1-D long tensor) or ``None`` for the whole
            batch. A converged sample keeps its first iterate below ``tol``. See :class:`DEQ` for
            the module form, which indexes the input for you.

    Returns:
        A :class:`Solution`; ``sol.value`` is the best iterate per sample. Running out of budget is
        reported in ``sol.status`` and ``sol.converged``, never silently.

    Precision: the state is kept in the dtype of ``z0``. Under ``torch.autocast`` the map runs in
    the autocast dtype and its output is cast back to the state's dtype; the solver's arithmetic
    (norms, Anderson's small least-squares systems) runs with autocast off, in float32 or better
    (float64 for float64 states).

    Raises:
        NonFiniteError: NaN or inf in ``z0`` or appearing during the solve.

    Example:
        >>> A = 0.5 * torch.eye(3)
        >>> sol = eq.solve(lambda z: z @ A.T + 1.0, torch.zeros(4, 3))
        >>> sol.value  # 2.0 everywhere
    """
    _check_callable(f)
    spec = StateSpec.of(z0)
    solver = resolve_solver(solver)
    _check_options(tol, max_iter, stop, warn_unconverged)
    check_bool("compact", compact)
    _check_takes_index(f, compact)
    fn = spec.flat_map(f)
    with torch.no_grad():
        it = iterate(
            fn, spec.flatten(z0), solver, tol=tol, max_iter=max_iter, stop=stop, compact=compact
        )
    sol = _to_solution(it, spec, solver, stop, tol, it.value)
    if warn_unconverged:
        _warn_if_unconverged(sol, "the solve")
    return sol


def fixed_point(
    f: Callable[[Any], Any],
    z0: Any,
    *,
    solver: str | Solver = "anderson",
    backward: str | Backward = "implicit",
    tol: float = 1e-4,
    max_iter: int = 50,
    stop: StopNorm = "rel",
    warn_unconverged: bool = False,
    compact: bool = False,
) -> tuple[Any, Solution]:
    """Differentiable equilibrium z* = f(z*).

    The forward solve runs without autograd; the ``backward`` method then decides how gradients
    reach the parameters and tensors ``f`` closes over (see :class:`Implicit`, :class:`Phantom`,
    :class:`Neumann`, :class:`JFB`, :class:`Unrolled`).

    Args:
        f: the map; takes and returns a state with the structure of ``z0``.
        z0: initial state (batch-first tensor, tuple or dict of tensors). No gradient flows to it
            except with ``backward="unrolled"``. An empty batch is passed through without a solve;
            under grad mode the backward method's differentiable map calls still run on it, so
            the output is part of the graph, as a layer's would be.
        solver: forward solver, name or object.
        backward: backward method, name (``"implicit"``, ``"phantom"``, ``"neumann"``, ``"jfb"``,
            ``"unrolled"``) or object such as ``eq.Phantom(steps=5, damping=0.5)``.
        tol: forward tolerance.
        max_iter: forward iteration budget.
        stop: stop norm, ``"rel"`` or ``"abs"``.
        warn_unconverged: emit a ``RuntimeWarning`` when the forward solve does not converge.
        compact: per-sample compaction of the forward solve; ``f`` is then called as
            ``f(z, index)`` (see :func:`solve`). The backward pass always runs on the whole batch.
            Not available with ``backward="unrolled"``.

    Returns:
        ``(z, sol)``: the differentiable state and the forward :class:`Solution`. For the implicit
        and Neumann methods ``z`` equals ``sol.value``; for the phantom methods and JFB it is the
        output of their extra differentiable steps from ``sol.value``. ``sol.backward`` is filled in
        when backward runs (adjoint iterations and residual for the implicit method).

    Example:
        >>> lin = torch.nn.Linear(8, 8)
        >>> x = torch.randn(4, 8)
        >>> z, sol = eq.fixed_point(lambda z: torch.tanh(0.5 * lin(z) + x), torch.zeros(4, 8))
        >>> z.sum().backward()  # exact gradients in lin.weight.grad, lin.bias.grad
    """
    _check_callable(f)
    spec = StateSpec.of(z0)
    solver = resolve_solver(solver)
    backward = resolve_backward(backward)
    _check_options(tol, max_iter, stop, warn_unconverged)
    check_compact(compact, backward)
    _check_takes_index(f, compact)
    fn = spec.flat_map(f)
    x0 = spec.flatten(z0)
    if isinstance(backward, Unrolled) and torch.is_grad_enabled():
        it = iterate(fn, x0, solver, tol=tol, max_iter=max_iter, stop=stop)
        sol = _to_solution(it, spec, solver, stop, tol, it.value.detach())
        sol.backward.method = backward.name
        z = it.value if len(it.residual) else fn(x0)  # an empty batch: still a graph, like a layer
    else:
        with torch.no_grad():
            it = iterate(
                fn, x0.detach(), solver, tol=tol, max_iter=max_iter, stop=stop, compact=compact
            )
        sol = _to_solution(it, spec, solver, stop, tol, it.value)
        z = it.value
        if torch.is_grad_enabled():
            full = (lambda x: fn(x, None)) if compact else fn
            z = attach_backward(full, z, backward, sol.backward)
    if z is it.value:  # never hand out the storage of sol.value (an in-place edit would change it)
        z = z.clone()
    if warn_unconverged:
        _warn_if_unconverged(sol, "the forward solve")
    return spec.unflatten(z), sol


def check_compact(compact: bool, backward: Backward) -> None:
    check_bool("compact", compact)
    if compact and isinstance(backward, Unrolled):
        raise ValueError(
            "compact=True cannot be combined with backward='unrolled' (backpropagating through a "
            "batch that shrinks); use another backward method or compact=False"
        )


# Not traced under torch.compile: the adjoint Function carries Python objects (the method, the
# mutable record) and the leaf check walks the autograd graph, neither of which dynamo can trace.
@torch.compiler.disable
def _attach_adjoint(
    fn: Map, z_star: Tensor, backward: Implicit | Neumann, record: BackwardInfo
) -> Tensor:
    zr = z_star.detach().requires_grad_()
    with torch.enable_grad():
        z_out = fn(zr)
    if not _reaches_other_leaves(z_out, zr):  # f closes over nothing that needs a gradient
        return z_star
    record.pair = (z_out, zr)
    return _Adjoint.apply(z_out, zr, z_star, backward, record)


def attach_backward(fn: Map, z_star: Tensor, backward: Backward, record: BackwardInfo) -> Tensor:
    """Return a differentiable (B, D) state at the detached solution ``z_star`` of ``fn``."""
    record.method = backward.name
    if isinstance(backward, JFB):
        return fn(z_star)
    if isinstance(backward, Phantom):
        h, lam = z_star, backward.damping
        for _ in range(backward.steps):
            h = fn(h) if lam == 1.0 else h + lam * (fn(h) - h)
        return h
    if isinstance(backward, (Implicit, Neumann)):
        return _attach_adjoint(fn, z_star, backward, record)
    if isinstance(backward, Unrolled):
        raise ValueError(
            "backward='unrolled' needs the forward iterations recorded; it is only available "
            "through fixed_point and DEQ, not at a given state"
        )
    raise TypeError(f"unsupported backward method {type(backward).__name__}")


def _reaches_other_leaves(z_out: Tensor, zr: Tensor) -> bool:
    """Whether the graph of ``z_out`` reaches anything needing a gradient besides ``zr``.

    A depth-first walk that stops at the first such node; in the common case (the map uses a
    parameter) it ends after a handful of nodes.
    """
    if z_out.grad_fn is None:
        return False
    # the visited nodes are kept alive: an autograd node's Python wrapper can be freed and its id
    # reused by another node's wrapper (torch 2.11 does this), which would skip unvisited nodes
    seen: dict[int, Any] = {}
    stack = [z_out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        variable = getattr(node, "variable", None)
        if variable is not None:  # an AccumulateGrad node: a leaf that requires grad
            if variable is not zr:
                return True
            continue
        if not node.next_functions:  # a graph input with no further history
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    return False


class _Adjoint(torch.autograd.Function):
    """Identity on z* in the forward pass; in the backward pass replaces the upstream gradient g by
    the adjoint u of the implicit (or Neumann) method and hands it to the recorded call f(z*), so
    autograd applies (df/dtheta)^T u and (df/dx)^T u.

    The vector-Jacobian products reuse the graph of that one call (``retain_graph``), so each
    layer call owns its own graph: calling the layer twice before backward, in eval mode, or with
    DistributedDataParallel needs no hooks.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z_out: Tensor,
        zr: Tensor,
        z_star: Tensor,
        method: Implicit | Neumann,
        record: BackwardInfo,
    ) -> Tensor:
        ctx.save_for_backward(z_out, zr)
        ctx.method = method
        ctx.record = record
        return z_star.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        method, record = ctx.method, ctx.record
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is being recorded
            why = (
                "its adjoint is a truncated series applied to the recorded map call at a detached "
                "z*, whose dependence on the parameters it does not carry"
                if isinstance(method, Neumann)
                else "its adjoint is a solved fixed point, not a differentiable expression"
            )
            raise NotImplementedError(
                f"backward={method.name!r} gives first derivatives only: {why}, so backward with "
                "create_graph=True (double backward, gradient penalties through the equilibrium) "
                "would be silently wrong; use backward='unrolled' or eq.Phantom(...) for higher "
                "derivatives"
            )
        z_out, zr = ctx.saved_tensors

        def vjp(u: Tensor) -> Tensor:  # J^T u; 0 when f(z) does not depend on z through autograd
            out = torch.autograd.grad(z_out, zr, u, retain_graph=True, allow_unused=True)[0]
            return torch.zeros_like(u) if out is None else out

        record.calls += 1
        if not bool(torch.isfinite(grad).all()):
            # an overflowing loss (mixed precision: GradScaler scales the loss up until it does)
            # hands down inf or NaN, and the scaler relies on seeing them in the parameter
            # gradients to skip the step: pass the gradient on instead of solving with it
            record.solution = None
            return grad, None, None, None, None
        if isinstance(method, Neumann):
            lam, w = method.damping, grad
            for _ in range(method.steps - 1):
                w = grad + (1.0 - lam) * w + lam * vjp(w)
            return lam * w, None, None, None, None
        adjoint = _solve_adjoint(vjp, grad, method, record.initial)
        record.solution = adjoint
        if method.warn_unconverged:
            _warn_if_unconverged(adjoint, "the implicit backward solve")
        return adjoint.value, None, None, None, None


def _solve_adjoint(vjp: Map, grad: Tensor, method: Implicit, initial: Tensor | None) -> Solution:
    """Solve u = J^T u + g, from ``initial`` (a warm start; rows of NaN, or None: from u0 = g)."""
    solver = resolve_solver(method.solver)
    spec = StateSpec.of(grad, "grad")
    u0 = grad
    if initial is not None:
        if initial.shape != grad.shape:
            raise ValueError(
                f"the adjoint warm start has shape {tuple(initial.shape)}, expected "
                f"{tuple(grad.shape)} (one row per sample of the flattened state)"
            )
        initial = initial.to(grad.device, grad.dtype)
        # a sample with no upstream gradient has the adjoint 0 exactly: start it there, not at a
        # warm start it would only approach geometrically (its rel residual would not fall)
        cold = torch.isnan(initial) | (grad == 0).all(1, keepdim=True)
        u0 = torch.where(cold, grad, initial)
    it = iterate(
        lambda u: vjp(u) + grad,
        u0,
        solver,
        tol=method.tol,
        max_iter=method.max_iter,
        stop=method.stop,
        what="the implicit backward solve",
    )
    return _to_solution(it, spec, solver, method.stop, method.tol, it.value)


def fixed_point_states(
    f: Callable[[Any], Any],
    z0: Any,
    n: int,
    *,
    solver: str | Solver = "anderson",
    backward: str | Phantom | JFB | None = None,
    tol: float = 1e-4,
    max_iter: int = 50,
    stop: StopNorm = "rel",
) -> tuple[list[Any], Solution]:
    """States along the solver's trajectory, each with its own gradient path.

    This is fixed-point correction (DEQ-Flow).

    The forward solve records its iterates; ``n`` of them, evenly spaced along the trajectory and
    ending with the best iterate, each receive a short phantom gradient path. Supervise all of them
    and combine the losses with :func:`correction_loss`. The extra memory is the detached trajectory
    ((B, D) per iteration) plus the ``n`` phantom paths.

    Args:
        f: the map.
        z0: initial state.
        n: number of states >= 1; the last one is at the equilibrium.
        solver: forward solver, name or object.
        backward: the phantom path given to each state, ``eq.Phantom(...)`` or ``eq.JFB()``
            (or their names ``"phantom"``, ``"jfb"``); default ``eq.Phantom(steps=1,
            damping=1.0)`` (one differentiable step, as in DEQ-Flow).
        tol: forward tolerance.
        max_iter: forward budget.
        stop: stop norm.

    Returns:
        ``(states, sol)``: a list of ``n`` differentiable states (structure of ``z0``), earliest
        first.

    Reference: Bai, Geng, Mangalam, Bansal, Feng & Kolter, "Deep Equilibrium Optical Flow
    Estimation", CVPR 2022.
    """
    _check_callable(f)
    check_int("n", n, minimum=1)
    backward = Phantom(steps=1, damping=1.0) if backward is None else resolve_backward(backward)
    if not isinstance(backward, (Phantom, JFB)):
        raise TypeError(
            "backward for fixed-point correction must be eq.Phantom(...) or eq.JFB() (the states "
            f"are not equilibria, so implicit gradients do not apply), got {backward!r}"
        )
    spec = StateSpec.of(z0)
    solver = resolve_solver(solver)
    _check_options(tol, max_iter, stop, False)
    fn = spec.flat_map(f)
    with torch.no_grad():
        it = iterate(
            fn,
            spec.flatten(z0).detach(),
            solver,
            tol=tol,
            max_iter=max_iter,
            stop=stop,
            keep_trajectory=True,
        )
    sol = _to_solution(it, spec, solver, stop, tol, it.value)
    trajectory = it.trajectory or [it.value]  # an empty batch has no iterates
    picks = [trajectory[max(0, round((i + 1) * it.nstep / n) - 1)] for i in range(n - 1)]
    picks.append(it.value)
    if not torch.is_grad_enabled():  # copies: the picks can be sol.value, z0 or each other
        return [spec.unflatten(p.clone()) for p in picks], sol
    return [spec.unflatten(attach_backward(fn, p, backward, sol.backward)) for p in picks], sol


def correction_loss(losses: Sequence[Tensor], gamma: float = 0.8) -> Tensor:
    """Weighted sum sum_i gamma^(n - 1 - i) L_i of the losses of the states from
    :func:`fixed_point_states` (earliest first; the last state gets weight 1).

    Args:
        losses: scalar losses, one per state, earliest first.
        gamma: decay in (0, 1].
    """
    check_float("gamma", gamma, low=0.0, high=1.0)
    if not isinstance(losses, Sequence) or isinstance(losses, str):
        raise TypeError(
            "losses must be a list or tuple of scalar tensors, one per state, got "
            f"{type(losses).__name__}"
        )
    if len(losses) == 0:
        raise ValueError("losses must be a non-empty sequence of scalar tensors, one per state")
    for i, loss in enumerate(losses):
        if not (isinstance(loss, Tensor) and loss.dim() == 0):
            what = repr(loss)
            if isinstance(loss, Tensor):
                what = f"a tensor of shape {tuple(loss.shape)}"
            raise ValueError(f"losses[{i}] must be a scalar (0-d) tensor, got {what}")
    n = len(losses)
    total = losses[-1]
    for i, loss in enumerate(losses[:-1]):
        total = total + gamma ** (n - 1 - i) * loss
    return total
