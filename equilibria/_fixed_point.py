"""The functional core: solve a fixed point, and make it differentiable.

``solve`` finds z* = f(z*) without autograd. ``fixed_point`` does the same and lets its backward
method (:mod:`equilibria._backward`) attach the gradient, so that gradients reach every parameter
and tensor ``f`` closes over. ``fixed_point_states`` hands out states along the trajectory for
fixed-point correction. Each builds the state's :class:`StateSpec` and an :class:`Options` once;
:func:`solve_flat` and :func:`states_flat` then work on the flat (B, D) state, and
:class:`equilibria.DEQ` calls them directly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ._backward import JFB, Attachment, Backward, Phantom, resolve_backward
from ._iterate import IndexedMap
from ._norms import norm_cache
from ._options import Options, StopNorm
from ._solution import Solution
from ._solvers import Solver
from ._solvers._base import Map
from ._tree import StateSpec
from ._validate import check_float, check_int

__all__ = ["StopNorm", "correction_loss", "fixed_point", "fixed_point_states", "solve"]


def _check_callable(f: Any) -> None:
    if not callable(f):
        raise TypeError(f"f must be callable (a map z -> f(z)), got {type(f).__name__}")


# not traced: dynamo would guard on the signature of f, a new closure at every DEQ call, and
# recompile the surrounding module at every call; and the transform check reads torch internals
@torch.compiler.disable
def check_entry(f: Any, compact: bool) -> None:
    """Refuse torch.func transforms; under compaction ``f`` must accept ``f(z, index)``."""
    refuse_transforms()
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


def refuse_transforms() -> None:
    """Raise a clear error inside ``torch.func`` transforms (vmap, grad, jacrev, jvp, ...).

    The solver loop stops on residuals read back to the host (data-dependent control flow) and
    keeps Python-side state, which functorch's wrapped tensors cannot provide: torch would fail
    deep inside with "Cannot access data pointer of Tensor".
    """
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    if peek is not None and peek() is not None:
        raise RuntimeError(
            "equilibria's solves cannot run inside torch.func transforms (vmap, grad, jacrev, "
            "jvp, functional_call under them): the solver stops on residuals read back to the "
            "host. Use torch.autograd instead: fixed_point / DEQ with backward='implicit' (the "
            "default) gives exact gradients through loss.backward() or torch.autograd.grad, "
            "torch.autograd.functional.jacobian gives Jacobians, and the solve is already "
            "batched (each row of z0 is an independent problem), so vmap over samples is not "
            "needed"
        )


def _module_cache(f: Any) -> AbstractContextManager[None]:
    """:func:`norm_cache` of ``f`` when it is a module (its normalised weights computed once per
    solve); a closure's modules are not visible: wrap the call in ``eq.norm_cache(cell)``."""
    return norm_cache(f) if isinstance(f, nn.Module) else nullcontext()


def solve_flat(
    fn: Map | IndexedMap,
    spec: StateSpec,
    x0: Tensor,
    options: Options,
    at: Attachment | None = None,
) -> tuple[Tensor, Solution]:
    """The differentiable flat (B, D) equilibrium of the flat map ``fn`` and its Solution.

    ``at``: what the backward method gets (default: ``options.attachment()``).
    """
    at = options.attachment() if at is None else at
    it, z = options.backward.solve(fn, x0, options, at)
    sol = options.solution(it, spec.unflatten(it.value.detach()), at.record)
    if z is it.value:  # never hand out the storage of sol.value (an in-place edit would change it)
        z = z.clone()
    if options.warn_unconverged:
        sol.warn_if_unconverged("the forward solve")
    return z, sol


def states_flat(
    fn: Map,
    spec: StateSpec,
    x0: Tensor,
    n: int,
    options: Options,
    correction: Backward,
    at: Attachment | None = None,
) -> tuple[list[Tensor], Solution]:
    """``n`` flat states along the trajectory of ``fn`` from ``x0``, earliest first: the last at
    the best iterate with ``options.backward``'s gradient, the others with ``correction``'s."""
    at = options.attachment() if at is None else at
    with torch.no_grad():
        it = options.iterate(fn, x0.detach(), keep_trajectory=True)
    sol = options.solution(it, spec.unflatten(it.value), at.record)
    trajectory = it.trajectory or [it.value]  # an empty batch has no iterates
    picks = [trajectory[max(0, round((i + 1) * it.nstep / n) - 1)] for i in range(n - 1)]
    if not torch.is_grad_enabled():  # copies: the picks can be sol.value, z0 or each other
        return [p.clone() for p in [*picks, it.value]], sol
    at.record.method = options.backward.name
    states = [correction.attach(fn, p, at) for p in picks]
    last = options.backward.attach(fn, it.value, at)
    states.append(last.clone() if last is it.value else last)
    return states, sol


def check_correction(backward: Backward, correction: str | Backward | None) -> Backward:
    """The phantom path of the states before the last (``correction``, or the backward method's
    default), checked to differentiate at states that are not equilibria; raises for a
    ``backward`` that gives no gradient per state (unrolled), also when ``correction`` is given."""
    default = backward.correction()
    return default if correction is None else check_path(correction)


def check_path(correction: str | Backward) -> Backward:
    """``correction`` resolved and checked to differentiate at states that are not equilibria."""
    path = resolve_backward(correction, "correction")
    if not path.at_any_state:
        raise TypeError(
            "correction (the gradient path of the states before the last) must be "
            "eq.Phantom(...) or eq.JFB(): those states are not equilibria, so implicit "
            f"gradients do not apply to them, got {path!r}"
        )
    return path


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
        z0: initial state: a batch-first tensor, or a tuple, list or dict of them (same batch
            size, dtype and device); ``f`` may return a list for a tuple state and vice versa.
            Every sample is solved independently. An empty batch (size 0) returns at once: no
            map call, ``nstep`` 0, status converged.
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

    ``f`` may edit its input in place: it then gets a copy of each iterate, and ``z0`` is never
    changed. When ``f`` is an ``nn.Module`` its normalised weights (:func:`apply_norm`) are
    computed once per solve; for a closure over such a module, wrap the call in
    ``with eq.norm_cache(cell):``.

    Raises:
        NonFiniteError: NaN or inf in ``z0`` or appearing during the solve.
        RuntimeError: inside a ``torch.func`` transform (vmap, grad, jacrev), which the solver
            loop cannot run under; use ``torch.autograd`` with :func:`fixed_point` instead.

    Example:
        >>> A = 0.5 * torch.eye(3)
        >>> sol = eq.solve(lambda z: z @ A.T + 1.0, torch.zeros(4, 3))
        >>> sol.value  # 2.0 everywhere
    """
    _check_callable(f)
    spec = StateSpec.of(z0)
    options = Options(solver, "implicit", tol, max_iter, stop, warn_unconverged, compact)
    check_entry(f, compact)
    with torch.no_grad(), _module_cache(f):
        it = options.iterate(spec.flat_map(f), spec.flatten(z0))
    sol = options.solution(it, spec.unflatten(it.value))
    if warn_unconverged:
        sol.warn_if_unconverged("the solve")
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
        z0: initial state (batch-first tensor, tuple, list or dict of tensors). No gradient flows
            to it except with ``backward="unrolled"``. An empty batch is passed through without a
            solve; under grad mode the backward method's differentiable map calls still run on
            it, so the output is part of the graph, as a layer's would be.
        solver: forward solver, name or object.
        backward: backward method, name (``"implicit"``, ``"phantom"``, ``"neumann"``, ``"jfb"``,
            ``"unrolled"``) or object such as ``eq.Phantom(steps=5, damping=0.5)``. The
            implicit method's tol and max_iter, when not given, are this solve's (its stop norm
            is ``"rel"`` unless given, whatever ``stop`` is; see :class:`Implicit`).
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

    As in :func:`solve`, ``f`` may edit its input in place, an ``nn.Module`` ``f`` has its
    normalised weights cached for the solve, and ``torch.func`` transforms are refused.

    Example:
        >>> lin = torch.nn.Linear(8, 8)
        >>> x = torch.randn(4, 8)
        >>> z, sol = eq.fixed_point(lambda z: torch.tanh(0.5 * lin(z) + x), torch.zeros(4, 8))
        >>> z.sum().backward()  # exact gradients in lin.weight.grad, lin.bias.grad
    """
    _check_callable(f)
    spec = StateSpec.of(z0)
    options = Options(solver, backward, tol, max_iter, stop, warn_unconverged, compact)
    check_entry(f, compact)
    with _module_cache(f):
        z, sol = solve_flat(spec.flat_map(f), spec, spec.flatten(z0), options)
    return spec.unflatten(z), sol


def fixed_point_states(
    f: Callable[[Any], Any],
    z0: Any,
    n: int,
    *,
    solver: str | Solver = "anderson",
    backward: str | Backward | None = None,
    correction: str | Phantom | JFB | None = None,
    tol: float = 1e-4,
    max_iter: int = 50,
    stop: StopNorm = "rel",
) -> tuple[list[Any], Solution]:
    """States along the solver's trajectory, each with its own gradient path.

    This is fixed-point correction (DEQ-Flow).

    The forward solve records its iterates; ``n`` of them, evenly spaced along the trajectory and
    ending with the best iterate, each receive a gradient path. With a phantom ``backward``
    (Phantom, JFB) every state gets it; with ``backward="implicit"`` (or Neumann) the last state,
    the equilibrium, gets that method's gradient (the exact implicit gradient, as
    ``fixed_point`` gives it) and the earlier ones the ``correction`` path (TorchDEQ's
    ``n_states`` with ``ift=True``). Supervise all of them and combine the losses with
    :func:`correction_loss`. The extra memory is the detached trajectory ((B, D) per iteration)
    plus the phantom paths.

    Args:
        f: the map.
        z0: initial state.
        n: number of states >= 1; the last one is at the equilibrium.
        solver: forward solver, name or object.
        backward: the gradient of the last state, name or object: ``eq.Phantom(...)`` or
            ``eq.JFB()`` (then also of the earlier states, unless ``correction`` is given),
            ``eq.Implicit(...)`` or ``eq.Neumann(...)``; default ``eq.Phantom(steps=1,
            damping=1.0)`` (one differentiable step, as in DEQ-Flow). Not ``"unrolled"``.
        correction: the phantom path of the states before the last, ``eq.Phantom(...)`` or
            ``eq.JFB()`` (or their names); default: ``backward`` itself when it is a phantom
            method, else ``eq.Phantom(steps=1, damping=1.0)``.
        tol: forward tolerance.
        max_iter: forward budget.
        stop: stop norm.

    Returns:
        ``(states, sol)``: a list of ``n`` differentiable states (structure of ``z0``), earliest
        first.

    Example:
        >>> states, sol = eq.fixed_point_states(f, z0, 3, backward="implicit")
        >>> loss = eq.correction_loss([criterion(z, y) for z in states])

    Reference: Bai, Geng, Mangalam, Bansal, Feng & Kolter, "Deep Equilibrium Optical Flow
    Estimation", CVPR 2022.
    """
    _check_callable(f)
    check_int("n", n, minimum=1)
    method = Phantom(steps=1, damping=1.0) if backward is None else resolve_backward(backward)
    path = check_correction(method, correction)
    spec = StateSpec.of(z0)
    options = Options(solver, method, tol, max_iter, stop)
    check_entry(f, False)
    with _module_cache(f):
        states, sol = states_flat(spec.flat_map(f), spec, spec.flatten(z0), n, options, path)
    return [spec.unflatten(z) for z in states], sol


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
