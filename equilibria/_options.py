"""The options of one solve, validated once.

:func:`equilibria.solve`, :func:`equilibria.fixed_point`, :func:`equilibria.fixed_point_states`
and :class:`equilibria.DEQ` take the same keyword arguments; :class:`Options` holds them with
names resolved to objects, so each entry point builds one and validates nothing itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from ._backward import Attachment, Backward, resolve_backward
from ._iterate import Iteration, iterate
from ._solution import BackwardInfo, Solution
from ._solvers import Solver, resolve_solver
from ._validate import check_bool, check_choice, check_float, check_int

StopNorm = Literal["abs", "rel"]


@dataclass(frozen=True)
class Options:
    """Solver, backward method, tolerance, budget, stop norm, warning and compaction of a solve.

    Built with names or objects; after construction ``solver`` and ``backward`` are objects and
    every field has been checked (a bad value raises naming the argument, the value and what is
    allowed). :meth:`replace` gives a validated copy with some fields changed (the per-call
    overrides of :class:`equilibria.DEQ`).
    """

    solver: str | Solver = "anderson"
    backward: str | Backward = "implicit"
    tol: float = 1e-4
    max_iter: int = 50
    stop: StopNorm = "rel"
    warn_unconverged: bool = False
    compact: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the names to objects once, here
        set_(self, "solver", resolve_solver(self.solver))
        set_(self, "backward", resolve_backward(self.backward))
        check_float("tol", self.tol, low=0.0, low_open=False)
        check_int("max_iter", self.max_iter, minimum=1)
        check_choice("stop", self.stop, ("abs", "rel"))
        check_bool("warn_unconverged", self.warn_unconverged)
        check_bool("compact", self.compact)
        if self.compact:
            self.backward.check_compact()

    def iterate(
        self, fn: Any, x0: Tensor, *, compact: bool | None = None, keep_trajectory: bool = False
    ) -> Iteration:
        """Run the solver loop on the flat map ``fn`` from ``x0`` with these settings
        (``compact`` overrides this object's)."""
        return iterate(
            fn,
            x0,
            self.solver,  # type: ignore[arg-type]
            tol=self.tol,
            max_iter=self.max_iter,
            stop=self.stop,
            keep_trajectory=keep_trajectory,
            compact=self.compact if compact is None else compact,
        )

    def solution(self, it: Iteration, value: Any, record: BackwardInfo | None = None) -> Solution:
        """The :class:`Solution` of the loop's result ``it`` with ``value`` (state structure)."""
        return Solution.of(it, value, self.solver.name, self.stop, self.tol, record)  # type: ignore[union-attr]

    def attachment(self, **extra: Any) -> Attachment:
        """What the backward method gets with a fresh record: these forward settings and
        ``extra`` (``keep_value``, ``cache``, ``keys``; see :class:`Attachment`)."""
        return Attachment(BackwardInfo(), self.tol, self.max_iter, self.stop, **extra)

    def replace(self, **changes: Any) -> Options:
        """A validated copy with ``changes`` applied (fields given as None are left as they are)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self
