"""The interface every fixed-point solver implements.

A solver is a small frozen dataclass of hyper-parameters with two methods: ``init`` builds its
state from the first iterate and ``step`` proposes the next iterate, evaluates the map there and
updates the state. Budgets, stopping, best-iterate tracking, traces and statuses live once, in
:func:`equilibria._iterate.iterate`. All tensors are flat: (B, D), one independent problem per row.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

Map = Callable[[Tensor], Tensor]


class Step(NamedTuple):
    """What :meth:`Solver.step` returns: one iteration's result.

    Attributes:
        x: (B, D) the new iterate.
        fx: (B, D) its image ``f(x)``.
        g: (B, D) the residual ``fx - x``.
        state: the solver's state after the step (anything; see :meth:`Solver.select`).
        nfev: the number of map evaluations the step used (a line search may use several).
        gsq: optional (B,) ``||g||^2`` per sample, when the solver computed it anyway (Anderson
            has it on its Gram diagonal): it spares the driver a pass over ``g``. The driver
            recomputes the norm where a squared norm is too small to be precise.
    """

    x: Tensor
    fx: Tensor
    g: Tensor
    state: Any
    nfev: int
    gsq: Tensor | None = None


class Solver(abc.ABC):
    """Base class of the fixed-point solvers (Picard, Anderson, Broyden, and yours).

    Write a solver to try an iteration the library does not have; the driver loop supplies
    everything around it: budgets, per-sample stopping in the abs or rel norm, the best iterate
    per sample, traces, divergence and non-finite checks, compaction, autocast, and the backward
    methods (the adjoint solve of ``eq.Implicit(solver=...)`` runs the same interface on the
    transposed linear map).

    The interface:

    * a frozen dataclass of hyper-parameters, checked in ``__post_init__`` (a ValueError or
      TypeError naming the argument, the value and what is allowed), and a class attribute
      ``name``;
    * :meth:`init` ``(x, fx, g) -> state``: the state after the first iterate;
    * :meth:`step` ``(fn, x, fx, g, state) -> Step``: propose the next iterate, evaluate
      ``fn`` there (once or more) and return it with the new state;
    * optionally :meth:`select` ``(state, index) -> state``: keep only some samples of the state
      (per-sample compaction); the default handles states made of batched tensors, NamedTuples
      of them and Python scalars.

    All tensors are flat, (B, D): one independent problem per row, so every reduction is per
    row. The driver hands the solver samples whose sizes lie within 2^+-32 (float32 and lower) or
    2^+-256 (float64) of 1 (a problem whose values lie further out is iterated in per-sample
    power-of-two units), so a solver's products need no guard against overflow; ``step`` is only
    called while some sample has not converged, and the driver keeps the best iterate, so a
    solver returns its latest one. Register the class with :func:`equilibria.register_solver` to
    use it by name.

    Example:
        A Picard iteration whose per-sample damping halves whenever a step increases that
        sample's residual::

            @eq.register_solver
            @dataclass(frozen=True)
            class Halving(eq.Solver):
                damping: float = 1.0
                name: ClassVar[str] = "halving"

                def init(self, x, fx, g):
                    # (B, 1), on the state's device
                    return x.new_full((x.shape[0], 1), self.damping)

                def step(self, fn, x, fx, g, tau):
                    x_new = x + tau * g
                    fx_new = fn(x_new)
                    g_new = fx_new - x_new
                    worse = g_new.norm(dim=1, keepdim=True) > g.norm(dim=1, keepdim=True)
                    return eq.Step(x_new, fx_new, g_new, torch.where(worse, tau / 2, tau), 1)

            sol = eq.solve(f, z0, solver="halving")
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def init(self, x: Tensor, fx: Tensor, g: Tensor) -> Any:
        """State after the first iterate ``x`` (B, D) with image ``fx`` and residual ``g``."""

    @abc.abstractmethod
    def step(self, fn: Map, x: Tensor, fx: Tensor, g: Tensor, state: Any) -> Step:
        """Propose the next iterate from the current one and the state, and evaluate ``fn``.

        Args:
            fn: the flat map (B, D) -> (B, D); each call counts as one evaluation (``nfev``).
            x: (B, D) the current iterate (the one the last step returned).
            fx: (B, D) its image.
            g: (B, D) its residual ``fx - x``.
            state: what :meth:`init` or the last step returned.
        """

    def select(self, state: Any, index: Tensor) -> Any:
        """Keep only the samples ``index`` (1-D long tensor) of every batched tensor in ``state``.

        Used by per-sample compaction; states made of batched tensors and Python scalars work
        without overriding this.
        """
        if isinstance(state, tuple) and hasattr(state, "_fields"):
            return type(state)(*(self.select(s, index) for s in state))
        if isinstance(state, Tensor):
            return state.index_select(0, index)
        return state


def write_slot(buf: Tensor, slot: int, value: Tensor) -> Tensor:
    """``buf[:, slot] = value``; in place unless autograd records the solve (unrolled backprop)."""
    if torch.is_grad_enabled() and (buf.requires_grad or value.requires_grad):
        index = torch.tensor([slot], device=buf.device)
        return buf.index_copy(1, index, value.unsqueeze(1))
    buf[:, slot] = value
    return buf
