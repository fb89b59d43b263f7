"""The DEQ module: a thin nn.Module around :func:`equilibria.fixed_point`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ._backward import Backward, Implicit, resolve_backward
from ._dropout import batch_index, own_batch, reset_dropout
from ._fixed_point import (
    StopNorm,
    _check_options,
    _warn_if_unconverged,
    check_compact,
    fixed_point,
    fixed_point_states,
)
from ._norms import norm_cache
from ._solution import Solution
from ._solvers import Solver, resolve_solver
from ._tree import StateSpec, index_batch
from ._validate import check_float, check_int

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
            removed from the batch passed to the cell, and the input ``x`` (every tensor in it
            whose first dimension is the batch size) is indexed to match, so a batch with a few
            hard samples costs far fewer cell evaluations. Results equal the uncompacted solve to
            solver tolerance. Trade-offs: the cell must treat samples independently (batch
            statistics, as in BatchNorm in training mode, would change with the batch), each
            compaction copies the solver's history, and very cheap cells gain less than they pay.
            Not with ``backward="unrolled"``.

    Each forward call resets the cell's :class:`VariationalDropout` masks (in training mode) and
    computes its normalised weights (:func:`apply_norm`) once, reused by every solver iteration and
    by the backward pass.

    Precision: the state is kept in the dtype of ``z0`` (``init(x)``). Under ``torch.autocast``
    the cell runs in the autocast dtype (e.g. bfloat16) and its output is cast back to the state's
    dtype; the solver's own arithmetic (norms, Anderson's least-squares system) runs with autocast
    off, in float32 or better.

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
            check_float("eval_tol", eval_tol, low=0.0, low_open=False)
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
        check_compact(compact, self.backward)
        self.compact = compact
        self.last_solution: Solution | None = None
        self._state_cache: dict[int, torch.Tensor] = {}
        self._adjoint_cache: dict[int, torch.Tensor] = {}
        self._pending: tuple[list[int], Solution] | None = None

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

    def forward(
        self,
        x: Any,
        z0: Any = None,
        *,
        states: int | None = None,
        cache_key: Sequence[int] | torch.Tensor | None = None,
    ) -> Any:
        """Solve for the equilibrium of ``cell(., x)``.

        Args:
            x: the input injection, passed unchanged to the cell.
            z0: initial state (e.g. a previous equilibrium for a warm start); default ``init(x)``.
            states: if given, return that many states along the trajectory, each with its own
                phantom gradient path, for fixed-point correction (see
                :func:`equilibria.fixed_point_states`); the backward method must then be
                ``eq.Phantom`` or ``eq.JFB``.
            cache_key: one integer id per sample (e.g. dataset indices). The equilibria of these
                samples are cached and used as the starting point the next time the same ids
                come (samples without a cached state start from ``init(x)``); with the implicit
                backward, the adjoint solutions are cached too and warm-start the next adjoint
                solve of the same ids. The cache lives on the module (``clear_cache()`` empties
                it) and holds one detached state per id.

        Returns:
            The equilibrium state, or a list of ``states`` states (earliest first).
        """
        tol, max_iter = self._budget()
        if states is not None:
            check_int("states", states, minimum=1)
            if self.compact:
                raise ValueError(
                    f"states={states} (fixed-point correction) cannot be combined with "
                    "compact=True: the trajectory it samples needs every sample at every "
                    "iteration; use a DEQ with compact=False"
                )
        keys = None if cache_key is None else _keys(cache_key)
        if keys is not None:
            self._harvest_adjoints()
            if z0 is not None:
                raise ValueError("pass either z0 or cache_key, not both")
        z0 = self._z0(x, z0)
        if keys is not None:
            batch = StateSpec.of(z0).batch
            if len(keys) != batch:
                raise ValueError(
                    f"cache_key must have one id per sample ({batch}), got {len(keys)} ids"
                )
            z0 = self._cached_start(z0, keys)
        cell = self.cell if isinstance(self.cell, nn.Module) else None
        if self.training and cell is not None:
            reset_dropout(cell)

        def f(z: Any) -> Any:
            return self.cell(z, x)

        batch = StateSpec.of(z0).batch

        def f_indexed(z: Any, index: torch.Tensor | None) -> Any:
            if index is None:
                return self.cell(z, x)
            with batch_index(index):
                return self.cell(z, index_batch(x, index, batch))

        # this DEQ inside another DEQ's compacting cell: its cell sees this DEQ's own batch,
        # not the outer batch index (its dropout would take its rows from the wrong mask)
        with own_batch(), norm_cache(cell):
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
                if self.warn_unconverged:
                    _warn_if_unconverged(sol, "the forward solve")
                out = zs
            else:
                out, sol = fixed_point(
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
        if keys is not None:
            self._store(sol, keys)
        return out

    @contextmanager
    def using(self, backward: str | Backward) -> Iterator[DEQ]:
        """Temporarily use another backward method (e.g. for :func:`gradient_agreement`)."""
        saved = self.backward
        self.backward = resolve_backward(backward)
        try:
            yield self
        finally:
            self.backward = saved

    def clear_cache(self) -> None:
        """Forget the cached equilibria and adjoints of ``cache_key``."""
        self._state_cache.clear()
        self._adjoint_cache.clear()
        self._pending = None

    # -- warm-start cache --------------------------------------------------------------------

    def _cached_start(self, z0: Any, keys: list[int]) -> Any:
        spec = StateSpec.of(z0)
        flat = spec.flatten(z0).detach().clone()
        for row, key in enumerate(keys):
            cached = self._state_cache.get(key)
            if cached is not None and cached.shape == flat.shape[1:]:
                flat[row] = cached.to(flat.device, flat.dtype)
        return spec.unflatten(flat)

    def _store(self, sol: Solution, keys: list[int]) -> None:
        flat = StateSpec.of(sol.value, "value").flatten(sol.value).detach()
        for key, row in zip(keys, flat.unbind(0)):
            self._state_cache[key] = row.clone()  # its own storage: a view would keep the batch
        if isinstance(self.backward, Implicit) and self.training:
            initial = torch.full_like(flat, float("nan"))
            for row, key in enumerate(keys):
                cached = self._adjoint_cache.get(key)
                if cached is not None and cached.shape == flat.shape[1:]:
                    initial[row] = cached
            sol.backward.initial = initial
            self._pending = (keys, sol)

    def _harvest_adjoints(self) -> None:
        if self._pending is None:
            return
        keys, sol = self._pending
        self._pending = None
        adjoint = sol.backward.solution
        if adjoint is not None:
            for key, row in zip(keys, adjoint.value.detach().unbind(0)):
                self._adjoint_cache[key] = row.clone()

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver}, backward={self.backward}, tol={self.tol:g}, "
            f"max_iter={self.max_iter}, eval_tol={self.eval_tol:g}, "
            f"eval_max_iter={self.eval_max_iter}, stop={self.stop!r}, compact={self.compact}"
        )


def _keys(cache_key: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(cache_key, torch.Tensor):
        if (
            cache_key.dim() != 1
            or cache_key.dtype.is_floating_point
            or cache_key.is_complex()
            or cache_key.dtype == torch.bool
        ):
            raise TypeError(
                f"cache_key must be a 1-D integer tensor or a sequence of ints, got a tensor of "
                f"shape {tuple(cache_key.shape)} and dtype {cache_key.dtype}"
            )
        keys = [int(k) for k in cache_key.tolist()]
    elif isinstance(cache_key, Sequence) and all(
        isinstance(k, int) and not isinstance(k, bool) for k in cache_key
    ):
        keys = list(cache_key)
    else:
        raise TypeError(
            f"cache_key must be a 1-D integer tensor or a sequence of ints, got {cache_key!r}"
        )
    if len(set(keys)) != len(keys):
        raise ValueError("cache_key must not repeat an id within a batch")
    return keys
