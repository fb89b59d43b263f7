"""Fixed-point solvers and the registry that maps names to them."""

from __future__ import annotations

from .._registry import Registry
from ._base import Map, Solver, Step
from .anderson import Anderson
from .broyden import Broyden
from .picard import Picard

SOLVERS: Registry[Solver] = Registry("solver", Solver, "eq.Anderson(m=6)")
for _cls in (Picard, Anderson, Broyden):
    SOLVERS.register(_cls)


def register_solver(cls: type[Solver], *, replace: bool = False) -> type[Solver]:
    """Make a solver class resolvable by its ``name``: ``solver="myname"`` then means ``cls()``.

    Usable as a class decorator. The name then works wherever a solver is taken: ``eq.solve``,
    ``eq.fixed_point``, ``eq.DEQ`` and the adjoint solve of ``eq.Implicit(solver=...)``.

    Args:
        cls: a subclass of :class:`Solver` with a non-empty string class attribute ``name``.
        replace: allow taking a name that another class has (by default that is a ValueError
            naming both classes).

    Raises:
        TypeError: ``cls`` is not a Solver subclass, has no ``name``, leaves ``init`` or
            ``step`` unimplemented, or cannot be built without arguments.
        ValueError: the name is taken by another class.

    Returns:
        ``cls`` itself.

    Example:
        >>> @eq.register_solver
        ... @dataclass(frozen=True)
        ... class Relaxed(eq.Solver):
        ...     name: ClassVar[str] = "relaxed"
        ...     ...
        >>> sol = eq.solve(f, z0, solver="relaxed")
    """
    return SOLVERS.register(cls, replace=replace)


def resolve_solver(solver: str | Solver, name: str = "solver") -> Solver:
    """Turn a registry name or a solver object into a solver object."""
    return SOLVERS.resolve(solver, name)


__all__ = [
    "SOLVERS",
    "Anderson",
    "Broyden",
    "Map",
    "Picard",
    "Solver",
    "Step",
    "register_solver",
    "resolve_solver",
]
