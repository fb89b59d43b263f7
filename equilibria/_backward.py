"""Backward methods: how gradients reach the parameters and inputs of an equilibrium.

Each method is one class that owns its options and what it does: :meth:`Backward.attach` turns the
detached equilibrium z* of a flat map into a differentiable state, and :meth:`Backward.solve` runs
the forward solve and attaches (only :class:`Unrolled`, which differentiates through the forward
iterations, changes it). The implicit and Neumann methods share the autograd Function
:class:`_Adjoint`, which hands the upstream gradient to the method's :meth:`adjoint`. A new method
is one subclass registered in :data:`BACKWARDS`; nothing elsewhere dispatches on the class.

Notation (Bai et al. 2019; Geng et al. 2021): equilibrium z*, Jacobian J = df/dz at z*, upstream
gradient g = dL/dz*, adjoint u = (I - J^T)^{-1} g.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor

from ._cache import SampleCache
from ._iterate import Iteration, iterate
from ._registry import Registry
from ._solution import BackwardInfo, Solution
from ._solvers import Solver, resolve_solver
from ._solvers._base import Map
from ._validate import check_bool, check_choice, check_float, check_int

if TYPE_CHECKING:
    from ._options import Options

# The adjoint tolerance when the forward solve has tol = 0 (a fixed number of iterations): an
# adjoint solve at tol 0 would spend its whole budget refining round-off.
FIXED_BUDGET_ADJOINT_TOL = 1e-6


@dataclass
class Attachment:
    """What a backward method gets besides the map and the equilibrium.

    Attributes:
        record: the solve's :class:`BackwardInfo`, filled in when backward runs.
        tol: the forward solve's tolerance (what the implicit backward's defaults follow).
        max_iter: the forward solve's budget.
        stop: the forward solve's stop norm.
        keep_value: return z* itself, with the method's gradient (a DEQ in eval mode), instead of
            the value of the method's extra differentiable steps.
        cache: the adjoint warm-start cache of ``DEQ(cache_key=...)``, or None.
        keys: the sample id of each row, with ``cache``.
    """

    record: BackwardInfo
    tol: float
    max_iter: int
    stop: Literal["abs", "rel"]
    keep_value: bool = False
    cache: SampleCache | None = None
    keys: Sequence[int] | None = None


class Backward(abc.ABC):
    """Base class of the backward methods.

    A new method is one class: a frozen dataclass of options with a class attribute ``name``
    that implements :meth:`attach` (and, to differentiate through the forward iterations
    themselves, :meth:`solve`); ``eq.register_backward(cls)`` makes its name resolvable. Its
    ``attach`` should return ``z_star``'s value when ``at.keep_value`` is set (a DEQ in eval mode).

    Example:
        >>> @eq.register_backward
        ... @dataclass(frozen=True)
        ... class HalfJFB(eq.Backward):
        ...     name: ClassVar[str] = "half-jfb"
        ...
        ...     def attach(self, fn, z_star, at):
        ...         h = fn(z_star)  # one differentiable map call, half its gradient
        ...         return z_star + 0.5 * (h - h.detach())
        >>> z, sol = eq.fixed_point(f, z0, backward="half-jfb")
    """

    name: ClassVar[str]
    # whether the method differentiates at any state, not only at an equilibrium: the phantom
    # paths of fixed-point correction (:func:`equilibria.fixed_point_states`) must be
    at_any_state: ClassVar[bool] = False

    @abc.abstractmethod
    def attach(self, fn: Map, z_star: Tensor, at: Attachment) -> Tensor:
        """A differentiable (B, D) state at the detached solution ``z_star`` of the flat ``fn``."""

    def solve(
        self, fn: Callable, x0: Tensor, options: Options, at: Attachment
    ) -> tuple[Iteration, Tensor]:
        """Run the forward solve of the flat map ``fn`` from ``x0`` and attach the gradient.

        Returns the solver loop's result and the (B, D) state to hand out. The default solves
        without autograd and attaches at the best iterate when grad mode is on.
        """
        with torch.no_grad():
            it = options.iterate(fn, x0.detach())
        if not torch.is_grad_enabled():
            return it, it.value
        at.record.method = self.name
        full = (lambda x: fn(x, None)) if options.compact else fn
        return it, self.attach(full, it.value, at)

    def check_compact(self) -> None:  # noqa: B027 (a hook: most methods accept compaction)
        """Raise if the method cannot follow a compacted forward solve (``compact=True``)."""

    def correction(self) -> Backward:
        """The phantom path the states before the last get in fixed-point correction when no
        ``correction`` is given: one differentiable step (DEQ-Flow)."""
        return Phantom(steps=1, damping=1.0)


def _straight_through(z_star: Tensor, h: Tensor) -> Tensor:
    """The value of ``z_star`` with the derivative of ``h``."""
    return z_star + (h - h.detach())


@dataclass(frozen=True)
class Implicit(Backward):
    """Exact gradient by the implicit function theorem.

    dL/dtheta = (df/dtheta)^T u with u = (I - J^T)^{-1} g, found as the fixed point of
    u -> J^T u + g with any solver, one vector-Jacobian product per iteration. Memory does not grow
    with the forward iterations. The adjoint solve's iterations and residual are reported in
    ``Solution.backward``. An upstream gradient holding inf or NaN (a mixed-precision overflow)
    is passed on unsolved, so ``torch.amp.GradScaler`` finds it in the parameter gradients and
    skips the step, as it does with any other layer.

    Settings not given follow the forward solve: ``tol`` and ``max_iter`` left at None take the
    forward's values (for a DEQ, those of the current mode: ``tol`` or ``eval_tol``), so
    ``eq.DEQ(cell, tol=1e-2, max_iter=25)`` solves its adjoint to 1e-2 within 25 iterations.
    ``stop`` defaults to ``"rel"`` whatever the forward's norm: an abs tolerance is in the state's
    units, which the adjoint (in the loss's units: a ``GradScaler`` multiplies it by 65536) does
    not share, while the rel norm means the same in both. Values given explicitly win. A forward
    with ``tol=0`` (a fixed number of iterations) gives the adjoint tol 1e-6
    (``FIXED_BUDGET_ADJOINT_TOL``), not 0, so it stops once converged.

    With ``DEQ(cache_key=...)`` in training mode the adjoint of each sample id is cached and
    starts the next adjoint solve of that id (a warm start, as the forward's).

    Args:
        solver: solver (name or object) for the adjoint fixed point.
        tol: tolerance of the adjoint solve, in the ``stop`` norm; None: the forward's.
        max_iter: iteration budget of the adjoint solve; None: the forward's.
        stop: ``"rel"`` (||r|| / ||J^T u + g||, scale-free; the default) or ``"abs"``.
        warn_unconverged: emit a ``RuntimeWarning`` when the adjoint solve runs out of budget.

    Example:
        >>> z, sol = eq.fixed_point(f, z0, backward=eq.Implicit(tol=1e-6, max_iter=60))

    Reference: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    solver: str | Solver = "anderson"
    tol: float | None = None
    max_iter: int | None = None
    stop: Literal["abs", "rel"] = "rel"
    warn_unconverged: bool = False
    name: ClassVar[str] = "implicit"
    first_order_reason: ClassVar[str] = (
        "its adjoint is a solved fixed point, not a differentiable expression"
    )

    def __post_init__(self) -> None:
        resolve_solver(self.solver, "Implicit solver")
        if self.tol is not None:
            check_float("Implicit tol", self.tol, low=0.0, low_open=False)
        if self.max_iter is not None:
            check_int("Implicit max_iter", self.max_iter, minimum=1)
        check_choice("Implicit stop", self.stop, ("abs", "rel"))
        check_bool("Implicit warn_unconverged", self.warn_unconverged)

    def settled(self, at: Attachment) -> Implicit:
        """This method with the settings not given taken from the forward solve ``at``."""
        tol = at.tol if at.tol > 0 else FIXED_BUDGET_ADJOINT_TOL
        return replace(
            self,
            tol=tol if self.tol is None else self.tol,
            max_iter=at.max_iter if self.max_iter is None else self.max_iter,
        )

    def attach(self, fn: Map, z_star: Tensor, at: Attachment) -> Tensor:
        return _attach_adjoint(fn, z_star, self.settled(at), at)

    def adjoint(self, vjp: Map, grad: Tensor, at: Attachment) -> Tensor:
        """Solve u = J^T u + g (``vjp(u)`` = J^T u), warm-started from ``at.cache``."""
        initial = None
        if at.cache is not None and at.keys is not None:
            initial = at.cache.start(at.keys, grad)
        sol = _solve_adjoint(vjp, grad, self, initial)
        at.record.solution = sol
        if at.cache is not None and at.keys is not None:
            at.cache.store(at.keys, sol.value)
        if self.warn_unconverged:
            sol.warn_if_unconverged("the implicit backward solve")
        return sol.value


@dataclass(frozen=True)
class Phantom(Backward):
    """Unrolled phantom gradient UPG(k, lambda).

    From the detached equilibrium, run ``steps`` damped steps h <- (1 - lambda) h + lambda f(h) with
    autograd on and backpropagate through them. Cheaper than the exact gradient and often trains as
    well or better; memory grows with ``steps``, not with the forward iterations. The returned state
    is the last of these steps (in a DEQ's eval mode, z* itself with the steps' gradient).

    Args:
        steps: number of differentiable steps k >= 1.
        damping: lambda in (0, 1].

    Reference: Geng, Zhang, Bai, Wang & Lin, "On Training Implicit Models", NeurIPS 2021.
    """

    steps: int = 5
    damping: float = 0.5
    name: ClassVar[str] = "phantom"
    at_any_state: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_int("Phantom steps", self.steps, minimum=1)
        check_float("Phantom damping", self.damping, low=0.0, high=1.0)

    def attach(self, fn: Map, z_star: Tensor, at: Attachment) -> Tensor:
        h, lam = z_star, self.damping
        for _ in range(self.steps):
            h = fn(h) if lam == 1.0 else h + lam * (fn(h) - h)
        return _straight_through(z_star, h) if at.keep_value else h

    def correction(self) -> Backward:
        return self


@dataclass(frozen=True)
class Neumann(Backward):
    """Neumann-series phantom gradient NPG(k, lambda).

    With the Jacobian frozen at z*: w <- g + (1 - lambda) w + lambda J^T w for k - 1 steps, then
    dL/dtheta ~ lambda (df/dtheta)^T w. As k grows it approaches the exact gradient when the
    spectral radius of (1 - lambda) I + lambda J is below one. One map evaluation with autograd,
    k - 1 vector-Jacobian products, memory independent of k.

    Args:
        steps: number of terms k >= 1.
        damping: lambda in (0, 1].

    Reference: Geng et al., "On Training Implicit Models", NeurIPS 2021.
    """

    steps: int = 5
    damping: float = 0.5
    name: ClassVar[str] = "neumann"
    first_order_reason: ClassVar[str] = (
        "its adjoint is a truncated series applied to the recorded map call at a detached z*, "
        "whose dependence on the parameters it does not carry"
    )

    def __post_init__(self) -> None:
        check_int("Neumann steps", self.steps, minimum=1)
        check_float("Neumann damping", self.damping, low=0.0, high=1.0)

    def attach(self, fn: Map, z_star: Tensor, at: Attachment) -> Tensor:
        return _attach_adjoint(fn, z_star, self, at)

    def adjoint(self, vjp: Map, grad: Tensor, at: Attachment) -> Tensor:
        """lambda w after k - 1 steps of w <- g + (1 - lambda) w + lambda J^T w from w = g."""
        lam, w = self.damping, grad
        for _ in range(self.steps - 1):
            w = grad + (1.0 - lam) * w + lam * vjp(w)
        return lam * w


@dataclass(frozen=True)
class JFB(Backward):
    """Jacobian-free backprop (one-step gradient): dL/dtheta ~ (df/dtheta)^T g.

    Equal to ``Phantom(steps=1, damping=1)``: one differentiable map call at the detached
    equilibrium (in a DEQ's eval mode, z* itself with that call's gradient).

    Reference: Fung, Heaton, Li, McKenzie, Osher & Yin, "JFB: Jacobian-Free Backpropagation for
    Implicit Networks", AAAI 2022.
    """

    name: ClassVar[str] = "jfb"
    at_any_state: ClassVar[bool] = True

    def attach(self, fn: Map, z_star: Tensor, at: Attachment) -> Tensor:
        h = fn(z_star)
        return _straight_through(z_star, h) if at.keep_value else h

    def correction(self) -> Backward:
        return self


@dataclass(frozen=True)
class Unrolled(Backward):
    """Backpropagation through every iteration of the forward solver (BPTT).

    The reference the cheaper methods are compared with; memory grows with the number of iterations.
    The returned state is the best iterate, so a sample whose best iterate is ``z0`` itself (a warm
    start already within ``tol``) gets no gradient through it: ``z0`` does not depend on the
    parameters. The other methods differentiate at z* instead.
    """

    name: ClassVar[str] = "unrolled"

    def solve(
        self, fn: Callable, x0: Tensor, options: Options, at: Attachment
    ) -> tuple[Iteration, Tensor]:
        if not torch.is_grad_enabled():
            return super().solve(fn, x0, options, at)
        at.record.method = self.name
        it = options.iterate(fn, x0, compact=False)
        # an empty batch: still a graph, like a layer
        return it, it.value if len(it.residual) else fn(x0)

    def attach(self, fn: Map, z_star: Tensor, at: Attachment) -> Tensor:
        raise ValueError(
            "backward='unrolled' needs the forward iterations recorded; it is only available "
            "through fixed_point and DEQ, not at a given state"
        )

    def check_compact(self) -> None:
        raise ValueError(
            "compact=True cannot be combined with backward='unrolled' (backpropagating through a "
            "batch that shrinks); use another backward method or compact=False"
        )

    def correction(self) -> Backward:
        raise TypeError(
            "backward for fixed-point correction must be eq.Implicit(), eq.Neumann(), "
            "eq.Phantom(...) or eq.JFB(), got eq.Unrolled() (it differentiates through the "
            "whole trajectory, not per state)"
        )


BACKWARDS: Registry[Backward] = Registry("backward", Backward, "eq.Phantom(steps=5, damping=0.5)")
for _cls in (Implicit, Phantom, Neumann, JFB, Unrolled):
    BACKWARDS.register(_cls)


def register_backward(cls: type[Backward], *, replace: bool = False) -> type[Backward]:
    """Make a backward method resolvable by its ``name``: ``backward="myname"`` means ``cls()``.

    Usable as a class decorator; the name then works in ``fixed_point``, ``fixed_point_states``,
    ``DEQ`` (and its per-call override) and ``DEQ.using``.

    Args:
        cls: a subclass of :class:`Backward` with a non-empty string class attribute ``name``,
            implementing ``attach``, constructible without arguments (see
            :meth:`Registry.register`).
        replace: allow taking a name another class has (by default a ValueError naming both).

    Returns:
        ``cls`` itself.
    """
    return BACKWARDS.register(cls, replace=replace)


def resolve_backward(backward: str | Backward, argument: str = "backward") -> Backward:
    """Turn a registry name or a backward object into a backward object."""
    return BACKWARDS.resolve(backward, argument)


# -- the implicit and Neumann methods: one recorded map call, an autograd Function -------------


# Not traced under torch.compile: the adjoint Function carries Python objects (the method, the
# mutable record) and the leaf check walks the autograd graph, neither of which dynamo can trace.
@torch.compiler.disable
def _attach_adjoint(fn: Map, z_star: Tensor, method: Implicit | Neumann, at: Attachment) -> Tensor:
    zr = z_star.detach().requires_grad_()
    with torch.enable_grad():
        z_out = fn(zr)
    if not _reaches_other_leaves(z_out, zr):  # f closes over nothing that needs a gradient
        return z_star
    at.record.pair = (z_out, zr)
    return _Adjoint.apply(z_out, zr, z_star, method, at)


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
    the adjoint of the method (``method.adjoint``) and hands it to the recorded call f(z*), so
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
        at: Attachment,
    ) -> Tensor:
        ctx.save_for_backward(z_out, zr)
        ctx.method = method
        ctx.at = at
        return z_star.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        method, at = ctx.method, ctx.at
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is being recorded
            raise NotImplementedError(
                f"backward={method.name!r} gives first derivatives only: "
                f"{method.first_order_reason}, so backward with create_graph=True (double "
                "backward, gradient penalties through the equilibrium) would be silently wrong; "
                "use backward='unrolled' or eq.Phantom(...) for higher derivatives"
            )
        z_out, zr = ctx.saved_tensors

        def vjp(u: Tensor) -> Tensor:  # J^T u; 0 when f(z) does not depend on z through autograd
            out = torch.autograd.grad(z_out, zr, u, retain_graph=True, allow_unused=True)[0]
            return torch.zeros_like(u) if out is None else out

        at.record.calls += 1
        if not bool(torch.isfinite(grad).all()):
            # an overflowing loss (mixed precision: GradScaler scales the loss up until it does)
            # hands down inf or NaN, and the scaler relies on seeing them in the parameter
            # gradients to skip the step: pass the gradient on instead of solving with it
            at.record.solution = None
            return grad, None, None, None, None
        return method.adjoint(vjp, grad, at), None, None, None, None


def _solve_adjoint(vjp: Map, grad: Tensor, method: Implicit, initial: Tensor | None) -> Solution:
    """Solve u = J^T u + g, from ``initial`` (a warm start; rows of NaN, or None: from u0 = g).

    ``method`` is settled (:meth:`Implicit.settled`): its tol, max_iter and stop are given.
    """
    solver = resolve_solver(method.solver)
    u0 = grad
    if initial is not None:
        initial = initial.to(grad.device, grad.dtype)
        # a sample with no upstream gradient has the adjoint 0 exactly: start it there, not at a
        # warm start it would only approach geometrically (its rel residual would not fall)
        cold = torch.isnan(initial) | (grad == 0).all(1, keepdim=True)
        u0 = torch.where(cold, grad, initial)
    it = iterate(
        lambda u: vjp(u) + grad,
        u0,
        solver,
        tol=method.tol,  # type: ignore[arg-type]
        max_iter=method.max_iter,  # type: ignore[arg-type]
        stop=method.stop,  # type: ignore[arg-type]
        what="the implicit backward solve",
    )
    return Solution.of(it, it.value, solver.name, method.stop, method.tol)  # type: ignore[arg-type]
