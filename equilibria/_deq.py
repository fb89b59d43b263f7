"""The DEQ module: a thin nn.Module around :func:`equilibria.fixed_point`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._backward import Backward, Unrolled, resolve_backward
from ._fixed_point import StopNorm, _check_options, fixed_point, fixed_point_states
from ._solution import Solution
from ._solvers import Solver, resolve_solver
from ._tree import index_batch
from ._validate import check_bool, check_float, check_int

Cell = Callable[[Any, Any], Any]


class DEQ(nn.Module):
    """Deep equilibrium layer: returns z* with z* = cell(z*, x).

    Holds the cell (whose parameters it registers) and the solver settings; the maths lives in
    :func:`equilibria.fixed_point`. Training and evaluation have separate budgets, since evaluation
    often affords more iterations.

    Args:
        cell: ``cell(z, x) -> z``, usually an ``nn.Module``. ``z`` may be a tensor, tuple or dict.
        solver: forward solver, name or object (``eq.Anderson(m=6)``).
        backward: backward method, name or object (``eq.Phantom(steps=5, damping=0.5)``).
        tol: forward tolerance in training.
        max_iter: forward budget in training.
        stop: stop norm, ``"rel"`` or ``"abs"``.
        eval_tol: tolerance in eval mode (default: ``tol``).
        eval_max_iter: budget in eval mode (default: ``max_iter``).
        init: ``init(x) -> z0`` used when no ``z0`` is passed; default ``torch.zeros_like(x)``,
            which assumes the state has the shape of the input.
        warn_unconverged: warn when a forward solve does not converge.
        compact: per-sample compaction in the forward solve: samples that have converged are
            removed from the batch passed to the cell, and the input ``x`` (every batch-first tensor
            in it) is indexed to match, so a batch with a few hard samples costs far fewer cell
            evaluations. Results equal the uncompacted solve to solver tolerance. Trade-offs: the
            cell must treat samples independently (batch statistics, as in BatchNorm in training
            mode, would change with the batch), each compaction copies the solver's history, and
            very cheap cells gain less than they pay. Not with ``backward="unrolled"``.

    Attributes:
        last_solution: the :class:`Solution` of the latest forward call (its ``backward`` field is
            filled in when gradients are computed).

    Example:
        >>> cell = MyCell()  # cell(z, x) -> z
        >>> layer = eq.DEQ(cell, solver="anderson", backward=eq.Phantom(steps=5), max_iter=30)
        >>> z = layer(x)
        >>> layer.last_solution.nstep

    Reference: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    def __init__(
        self,
        cell: Cell,
        *,
        solver: str | Solver = "anderson",
        backward: str | Backward = "implicit",
        tol: float = 1e-4,
        max_iter: int = 50,
        stop: StopNorm = "rel",
        eval_tol: float | None = None,
        eval_max_iter: int | None = None,
        init: Callable[[Any], Any] | None = None,
        warn_unconverged: bool = False,
        compact: bool = False,
    ) -> None:
        super().__init__()
        if not callable(cell):
            raise TypeError(f"cell must be callable as cell(z, x), got {type(cell).__name__}")
        if init is not None and not callable(init):
            raise TypeError(f"init must be callable as init(x) -> z0, got {type(init).__name__}")
        _check_options(tol, max_iter, stop, warn_unconverged)
        if eval_tol is not None:
            check_float("eval_tol", eval_tol, low=0.0)
        if eval_max_iter is not None:
            check_int("eval_max_iter", eval_max_iter, minimum=1)
        self.cell = cell
        self.solver = resolve_solver(solver)
        self.backward = resolve_backward(backward)
        self.tol = tol
        self.max_iter = max_iter
        self.stop = stop
        self.eval_tol = tol if eval_tol is None else eval_tol
        self.eval_max_iter = max_iter if eval_max_iter is None else eval_max_iter
        self.init = init
        self.warn_unconverged = warn_unconverged
        check_bool("compact", compact)
        if compact and isinstance(self.backward, Unrolled):
            raise ValueError(
                "compact=True cannot be combined with backward='unrolled'; use another backward "
                "method or compact=False"
            )
        self.compact = compact
        self.last_solution: Solution | None = None

    def _budget(self) -> tuple[float, int]:
        return (self.tol, self.max_iter) if self.training else (self.eval_tol, self.eval_max_iter)

    def _z0(self, x: Any, z0: Any) -> Any:
        if z0 is not None:
            return z0
        if self.init is not None:
            return self.init(x)
        if isinstance(x, torch.Tensor):
            return torch.zeros_like(x)
        raise TypeError(
            "z0 is required when x is not a tensor: pass z0=... or give the DEQ an init(x) -> z0"
        )

    def forward(self, x: Any, z0: Any = None, *, states: int | None = None) -> Any:
        """Solve for the equilibrium of ``cell(., x)``.

        Args:
            x: the input injection, passed unchanged to the cell.
            z0: initial state (e.g. a previous equilibrium for a warm start); default ``init(x)``.
            states: if given, return that many states along the trajectory, each with its own
                phantom gradient path, for fixed-point correction (see
                :func:`equilibria.fixed_point_states`); the backward method must then be
                ``eq.Phantom`` or ``eq.JFB``.

        Returns:
            The equilibrium state, or a list of ``states`` states (earliest first).
        """
        tol, max_iter = self._budget()
        z0 = self._z0(x, z0)

        def f(z: Any) -> Any:
            return self.cell(z, x)

        def f_indexed(z: Any, index: torch.Tensor | None) -> Any:
            return self.cell(z, x if index is None else index_batch(x, index))

        if states is not None:
            zs, sol = fixed_point_states(
                f,
                z0,
                states,
                solver=self.solver,
                backward=self.backward,  # type: ignore[arg-type]
                tol=tol,
                max_iter=max_iter,
                stop=self.stop,
            )
            self.last_solution = sol
            return zs
        z, sol = fixed_point(
            f_indexed if self.compact else f,
            z0,
            solver=self.solver,
            backward=self.backward,
            tol=tol,
            max_iter=max_iter,
            stop=self.stop,
            warn_unconverged=self.warn_unconverged,
            compact=self.compact,
        )
        self.last_solution = sol
        return z

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver}, backward={self.backward}, tol={self.tol:g}, "
            f"max_iter={self.max_iter}, eval_tol={self.eval_tol:g}, "
            f"eval_max_iter={self.eval_max_iter}, stop={self.stop!r}, compact={self.compact}"
        )
