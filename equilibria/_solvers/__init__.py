"""Fixed-point solvers and the registry that maps names to them."""

from __future__ import annotations

from ._base import Solver, Step
from .anderson import Anderson
from .broyden import Broyden
from .picard import Picard

SOLVERS: dict[str, type[Solver]] = {
    Picard.name: Picard,
    Anderson.name: Anderson,
    Broyden.name: Broyden,
}


def resolve_solver(solver: str | Solver, name: str = "solver") -> Solver:
    """Turn a registry name or a solver object into a solver object."""
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str):
        if solver not in SOLVERS:
            allowed = ", ".join(repr(k) for k in SOLVERS)
            raise ValueError(
                f"unknown {name} {solver!r}: valid names are {allowed}, "
                "or pass a solver object such as eq.Anderson(m=6)"
            )
        return SOLVERS[solver]()
    raise TypeError(
        f"{name} must be a solver name ({', '.join(map(repr, SOLVERS))}) or a solver object "
        f"such as eq.Anderson(), got {type(solver).__name__}"
    )


__all__ = ["SOLVERS", "Anderson", "Broyden", "Picard", "Solver", "Step", "resolve_solver"]
