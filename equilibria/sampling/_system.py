"""The joint lower-triangular system of a sampler's trajectory, and the solver interface.

A schedule with T steps maps ``x_T`` through ``x_{k+1} = step_k(x_k)`` (``step_k`` includes the
model call at ``timesteps[k]`` and, for stochastic samplers, the pre-drawn noise ``noise[k]``).
Stacking the states ``X = (X_0 = x_T, X_1, ..., X_T = x_0)`` gives one fixed point

    X_{k+1} = step_k(X_k),   k = 0 .. T-1,

whose Jacobian is strictly block lower-triangular: its unique solution is the sequential
trajectory, any solver that makes the residual ``G_k = step_k(X_k) - X_{k+1}`` zero recovers it,
and Picard needs at most T iterations (Pokle, Geng & Kolter 2022, "Deep Equilibrium Approaches to
Diffusion Models"; Shih et al. 2023, "Parallel Sampling of Diffusion Models" (ParaDiGMS); Tang
et al. 2024, "Accelerating Parallel Sampling of Diffusion Models" (ParaTAA)).

Layout: the trajectory is ``X`` of shape (T+1, N, *shape) (step index first, then samples); the
step index ``k`` of a pair ``(k, n)`` means "the update from X[k] to X[k+1]".

The driver (:func:`equilibria.sampling.sample`) owns everything around a solver:

* the sliding window (ParaDiGMS): per sample ``n`` the steps ``[lo_n, hi_n)`` are active, with
  ``lo_n`` the first step not yet accepted and ``hi_n = min(lo_n + window, T)``; rows entering
  the window for the first time start from the last row before them (unless ``init=`` gave a
  trajectory);
* one *round* = one batched evaluation (:meth:`System.evaluate`) of every active pair, which
  the system splits into ``chunk``-row model calls and over the ranks of ``process_group``;
* acceptance: in each sample, the leading active steps whose residual meets the tolerance are
  accepted as they are, and the first failing step ``k`` is set exactly, ``X[k+1] = step_k(X[k])``
  (its input is accepted), so every round accepts at least one step; the remaining active rows
  take the solver's proposal;
* rounds, NFE, per-step residuals, traces, ``max_rounds``, non-finite checks.

A solver (:class:`SamplingSolver`) therefore only proposes new states for the active rows from
one :class:`Block` per round; its state may keep anything (histories in absolute step layout:
``block.start`` says where the block sits in the trajectory).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from .._errors import NonFiniteError
from .._registry import Registry
from ._schedule import Schedule

Model = Callable[[Tensor, Tensor], Tensor]


class Block(NamedTuple):
    """One round's view of the trajectory, the rows ``start .. start + L`` (L = ``f.shape[0]``).

    Every sample's active steps lie inside the block (``start = min lo``); rows outside a
    sample's window are inactive for it.

    Attributes:
        start: the step index of the block's first row (``x[0] = X[start]``).
        x: (L+1, N, *shape) the current states ``X[start .. start+L]`` (a view: do not modify).
        f: (L, N, *shape) ``step_{start+j}(x[j])`` on active pairs, ``x[j+1]`` elsewhere (so
            ``g`` is zero there).
        g: (L, N, *shape) the residual ``f - x[1:]``.
        active: (L, N) bool, the pairs evaluated this round.
        lo: (N,) int64, the first active step of each sample (absolute; ``T`` when done).
        residual: (L, N) float64, the residual of each pair in the solver's tolerance rule
            (0 on inactive pairs; None while :meth:`SamplingSolver.residual` computes it).
    """

    start: int
    x: Tensor
    f: Tensor
    g: Tensor
    active: Tensor
    lo: Tensor
    residual: Tensor | None


class SamplingSolver(abc.ABC):
    """Base class of the parallel samplers' solvers (sequential, Picard, ParaDiGMS, and yours).

    The interface, with everything else in the driver (see this module's docstring):

    * a frozen dataclass of options checked in ``__post_init__``, and a class attribute ``name``;
    * :meth:`default_window` ``(T) -> int``: the window when ``sample(window=None)``;
    * :meth:`init` ``(system) -> state``;
    * :meth:`update` ``(system, block, state) -> (proposal, state)``: ``proposal`` is
      (L, N, *shape), new values for ``X[start+1 .. start+L]`` (only active rows are used; the
      driver then overwrites the accepted and the exactly-set rows);
    * optionally :meth:`residual` ``(system, block) -> (L, N)``: the per-pair quantity compared
      with ``tol`` (default: ``||g_k|| / ||f_k - x_k||``, relative to the step's displacement;
      zero exactly on the sequential trajectory; ``block.residual`` is None when it is called).

    Register a class with :func:`equilibria.sampling.register_solver` to use it by name.
    """

    name: ClassVar[str]
    #: the sequential reference ignores ``tol`` (it accepts a step only when its residual is 0)
    exact: ClassVar[bool] = False

    def default_window(self, T: int) -> int:
        """The active window when ``sample(window=None)`` (default: all T steps)."""
        return T

    def residual(self, system: System, block: Block) -> Tensor:
        """(L, N) float64, the exact rule: ``||g_k|| / ||f_k - x_k||`` per active pair, 0
        elsewhere.

        The residual relative to the step's own displacement: a step is accepted when its state
        moved as the step says to within that fraction, so accepted errors add up to at most
        ``tol`` times the trajectory's path length whatever T is (a residual relative to the state
        would accept an unevaluated copy ``X[k+1] = X[k]`` wherever one step moves the state less
        than ``tol``, as the last steps of a 1000-step schedule do). No rounding allowance:
        in bfloat16 a step can move a state by less than one rounding, and accepting errors of
        a few roundings per step adds up over T steps (at T = 100, 9x the bfloat16 loop's
        error to the float64 sample; tests/test_sampling.py).
        """
        gn = block.g.flatten(2).norm(dim=2).double()
        dn = (block.f - block.x[:-1]).flatten(2).norm(dim=2).double()
        r = gn / dn.clamp(min=torch.finfo(torch.float64).tiny)
        return torch.where(block.active, r, torch.zeros_like(r))

    @abc.abstractmethod
    def init(self, system: System) -> Any:
        """The solver's state before the first round."""

    @abc.abstractmethod
    def update(self, system: System, block: Block, state: Any) -> tuple[Tensor, Any]:
        """Propose ``X[start+1 .. start+L]`` (L, N, *shape) from this round's block."""


@dataclass
class System:
    """The joint system: evaluates ``step_k(X[k, n])`` for any set of pairs, in one round.

    Attributes:
        model: ``model(x, t)`` with x (M, *shape) and t (M,) int64.
        schedule: the sampler (``len(schedule)`` = T steps).
        noise: (T, N, *shape) pre-drawn noise, or None for deterministic samplers.
        chunk: at most this many rows per model call (None: the whole round at once).
        process_group: None, or a ``torch.distributed`` group over whose ranks each round's
            rows are split (contiguous pieces, all-gathered; every rank holds the trajectory).
        T, N, shape: steps, samples, per-sample shape.
        rounds, nfe, calls: batched evaluations so far, (sample, step) pairs evaluated (over
            all ranks), model invocations on this rank.
    """

    model: Model
    schedule: Schedule
    noise: Tensor | None
    chunk: int | None
    process_group: Any
    T: int
    N: int
    shape: tuple[int, ...]
    rounds: int = 0
    nfe: int = 0
    calls: int = 0

    def evaluate(self, x: Tensor, active: Tensor, start: int = 0) -> Tensor:
        """One round: ``f[j, n] = step_{start+j}(x[j, n])`` on active pairs, ``x[j+1, n]``
        elsewhere.

        Args:
            x: (L+1, N, *shape) the states ``X[start .. start+L]``.
            active: (L, N) bool, the pairs to evaluate.
            start: the step index of ``x[0]``.

        Returns:
            f: (L, N, *shape).
        """
        f = x[1:].clone()
        j, n = active.nonzero(as_tuple=True)  # (M,), (M,)
        M = j.shape[0]
        self.rounds += 1
        self.nfe += M
        if M == 0:
            return f
        k = j + start  # absolute step index per row
        rows = x[j, n]  # (M, *shape)
        t = self.schedule.timesteps.to(x.device)[k]  # (M,) int64
        out = self._model_rows(rows, t)
        if not torch.isfinite(out).all():
            bad = (~torch.isfinite(out.flatten(1))).any(1).nonzero()[0, 0]
            raise NonFiniteError(
                f"the model returned non-finite values at timestep {int(t[bad])} (step index "
                f"{int(k[bad])}, sample {int(n[bad])})"
            )
        noise = None if self.noise is None else self.noise[k, n]
        new = self.schedule.step(rows, out, k, noise)
        if not torch.isfinite(new).all():
            bad = (~torch.isfinite(new.flatten(1))).any(1).nonzero()[0, 0]
            raise NonFiniteError(
                f"the sampler's update is non-finite at timestep {int(t[bad])} (step index "
                f"{int(k[bad])}, sample {int(n[bad])})"
            )
        f[j, n] = new
        return f

    def _model_rows(self, rows: Tensor, t: Tensor) -> Tensor:
        """The model's output on rows (M, *shape), split into chunks and over ranks."""
        group = self.process_group
        if group is None:
            return self._model_chunks(rows, t)
        import torch.distributed as dist

        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        M = rows.shape[0]
        per = -(-M // world)  # rows per rank, the last ranks may hold fewer (or none)
        lo, hi = min(rank * per, M), min((rank + 1) * per, M)
        mine = rows.new_zeros((per, *rows.shape[1:]))
        if hi > lo:
            mine[: hi - lo] = self._model_chunks(rows[lo:hi], t[lo:hi])
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine.contiguous(), group=group)
        return torch.cat(parts)[:M]

    def _model_chunks(self, rows: Tensor, t: Tensor) -> Tensor:
        size = rows.shape[0] if self.chunk is None else self.chunk
        outs = []
        for i in range(0, rows.shape[0], size):
            x, tt = rows[i : i + size], t[i : i + size]
            out = self.model(x, tt)
            self.calls += 1
            if not isinstance(out, Tensor) or out.shape != x.shape:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"model(x, t) must return a tensor shaped like x {tuple(x.shape)}, got {got}"
                )
            outs.append(out.to(rows.dtype))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


SOLVERS: Registry[SamplingSolver] = Registry(
    "sampling solver", SamplingSolver, "sampling.Paradigms(window=20)"
)


def register_solver(cls: type[SamplingSolver], *, replace: bool = False) -> type[SamplingSolver]:
    """Make a sampling solver class usable by name: ``sample(..., solver="myname")``.

    Usable as a class decorator; the class derives from :class:`SamplingSolver`, has a string
    ``name`` and is constructible without arguments (``equilibria/_registry.py``).
    """
    return SOLVERS.register(cls, replace=replace)
