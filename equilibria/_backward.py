"""Backward methods: how gradients reach the parameters and inputs of an equilibrium.

Each method is a small frozen config object; :func:`equilibria.fixed_point` applies it. Notation of
ALGORITHMS.md §2: equilibrium z*, Jacobian J = df/dz at z*, upstream gradient g = dL/dz*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ._solvers import Solver, resolve_solver
from ._validate import check_bool, check_choice, check_float, check_int


class Backward:
    """Base class of the backward methods."""

    name: ClassVar[str]


@dataclass(frozen=True)
class Implicit(Backward):
    """Exact gradient by the implicit function theorem.

    dL/dtheta = (df/dtheta)^T u with u = (I - J^T)^{-1} g, found as the fixed point of
    u -> J^T u + g with any solver, one vector-Jacobian product per iteration. Memory does not grow
    with the forward iterations. The adjoint solve's iterations and residual are reported in
    ``Solution.backward``. An upstream gradient holding inf or NaN (a mixed-precision overflow)
    is passed on unsolved, so ``torch.amp.GradScaler`` finds it in the parameter gradients and
    skips the step, as it does with any other layer.

    Args:
        solver: solver (name or object) for the adjoint fixed point.
        tol: tolerance of the adjoint solve, in the ``stop`` norm.
        max_iter: iteration budget of the adjoint solve.
        stop: ``"rel"`` (||r|| / ||J^T u + g||, scale-free) or ``"abs"``.
        warn_unconverged: emit a ``RuntimeWarning`` when the adjoint solve runs out of budget.

    Example:
        >>> z, sol = eq.fixed_point(f, z0, backward=eq.Implicit(tol=1e-6, max_iter=60))

    Reference: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    solver: str | Solver = "anderson"
    tol: float = 1e-6
    max_iter: int = 50
    stop: Literal["abs", "rel"] = "rel"
    warn_unconverged: bool = False
    name: ClassVar[str] = "implicit"

    def __post_init__(self) -> None:
        resolve_solver(self.solver, "Implicit solver")
        check_float("Implicit tol", self.tol, low=0.0, low_open=False)
        check_int("Implicit max_iter", self.max_iter, minimum=1)
        check_choice("Implicit stop", self.stop, ("abs", "rel"))
        check_bool("Implicit warn_unconverged", self.warn_unconverged)


@dataclass(frozen=True)
class Phantom(Backward):
    """Unrolled phantom gradient UPG(k, lambda).

    From the detached equilibrium, run ``steps`` damped steps h <- (1 - lambda) h + lambda f(h) with
    autograd on and backpropagate through them. Cheaper than the exact gradient and often trains as
    well or better; memory grows with ``steps``, not with the forward iterations. The returned state
    is the last of these steps.

    Args:
        steps: number of differentiable steps k >= 1.
        damping: lambda in (0, 1].

    Reference: Geng, Zhang, Bai, Wang & Lin, "On Training Implicit Models", NeurIPS 2021.
    """

    steps: int = 5
    damping: float = 0.5
    name: ClassVar[str] = "phantom"

    def __post_init__(self) -> None:
        check_int("Phantom steps", self.steps, minimum=1)
        check_float("Phantom damping", self.damping, low=0.0, high=1.0)


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

    def __post_init__(self) -> None:
        check_int("Neumann steps", self.steps, minimum=1)
        check_float("Neumann damping", self.damping, low=0.0, high=1.0)


@dataclass(frozen=True)
class JFB(Backward):
    """Jacobian-free backprop (one-step gradient): dL/dtheta ~ (df/dtheta)^T g.

    Equal to ``Phantom(steps=1, damping=1)``: one differentiable map call at the detached
    equilibrium.

    Reference: Fung, Heaton, Li, McKenzie, Osher & Yin, "JFB: Jacobian-Free Backpropagation for
    Implicit Networks", AAAI 2022.
    """

    name: ClassVar[str] = "jfb"


@dataclass(frozen=True)
class Unrolled(Backward):
    """Backpropagation through every iteration of the forward solver (BPTT).

    The reference the cheaper methods are compared with; memory grows with the number of iterations.
    The returned state is the best iterate, so a sample whose best iterate is ``z0`` itself (a warm
    start already within ``tol``) gets no gradient through it: ``z0`` does not depend on the
    parameters. The other methods differentiate at z* instead.
    """

    name: ClassVar[str] = "unrolled"


BACKWARDS: dict[str, type[Backward]] = {
    cls.name: cls for cls in (Implicit, Phantom, Neumann, JFB, Unrolled)
}


def resolve_backward(backward: str | Backward) -> Backward:
    """Turn a registry name or a backward object into a backward object."""
    if isinstance(backward, Backward):
        return backward
    if isinstance(backward, str):
        if backward not in BACKWARDS:
            allowed = ", ".join(repr(k) for k in BACKWARDS)
            raise ValueError(
                f"unknown backward {backward!r}: valid names are {allowed}, "
                "or pass an object such as eq.Phantom(steps=5, damping=0.5)"
            )
        return BACKWARDS[backward]()
    raise TypeError(
        f"backward must be a name ({', '.join(map(repr, BACKWARDS))}) or an object such as "
        f"eq.Implicit(), got {type(backward).__name__}"
    )
