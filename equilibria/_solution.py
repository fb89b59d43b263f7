"""What a solve returns: one object with fixed fields."""

from __future__ import annotations

import copy
import enum
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from ._iterate import Iteration


class Status(enum.Enum):
    """How a solve ended.

    ``CONVERGED``: every sample reached the tolerance. ``MAX_ITER``: the iteration budget ran out
    first (normal for a DEQ in training; the best iterate per sample is still returned).
    ``DIVERGED``: the largest residual grew by more than the solver's divergence factor over the
    smallest seen so far, so the solve stopped early; the best iterate per sample is returned.
    """

    CONVERGED = "converged"
    MAX_ITER = "max_iter"
    DIVERGED = "diverged"


@dataclass(frozen=True)
class Solution:
    """The result of a fixed-point solve.

    Attributes:
        value: the best iterate per sample, with the structure of ``z0`` (detached).
        status: how the solve ended, see :class:`Status`.
        nstep: iterations taken: iterates whose residual was evaluated, ``z0`` included.
        nfev: calls of the map (more than ``nstep`` only with a line search).
        residual: (B,) float64 on the CPU, the residual of ``value`` per sample in the stop norm
            (the solver loop computes it on the host, where it stays).
        converged: (B,) bool on the CPU, whether each sample reached ``tol``.
        trace: (nstep,) float64 on the CPU, the largest residual over the batch at each iteration.
        residuals: (nstep, B) float64 on the CPU, the residual of every sample at every iteration
            (NaN for samples no longer iterated because per-sample compaction dropped them).
        evaluations: sample-evaluations of the map (rows passed to it, summed over calls):
            ``B * nfev`` without compaction, fewer with it.
        stop: the stop norm, ``"abs"`` or ``"rel"``.
        tol: the tolerance.
        solver: the solver's name.
        backward: statistics of the backward solve, filled in when gradients are computed through
            the implicit (or Neumann) backward; see :class:`BackwardInfo`.
    """

    value: Any
    status: Status
    nstep: int
    nfev: int
    residual: Tensor
    converged: Tensor
    trace: Tensor
    residuals: Tensor
    evaluations: int
    stop: str
    tol: float
    solver: str
    backward: BackwardInfo = field(default_factory=lambda: BackwardInfo())

    def jacobian_penalty(
        self,
        *,
        samples: int = 1,
        reduction: Literal["mean", "none"] = "mean",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The Jacobian penalty at this solution, reusing the map evaluation recorded by the
        implicit or Neumann backward (no extra map call; one VJP per probe).

        See :func:`equilibria.jacobian_penalty` for the estimate and its arguments. Available for
        solutions of ``fixed_point`` or ``DEQ`` with ``backward="implicit"`` or ``"neumann"``
        computed with gradients on; otherwise call ``eq.jacobian_penalty(f, z)``.
        """
        if self.backward.pair is None:
            raise ValueError(
                "this solution has no recorded map evaluation (it needs fixed_point or DEQ with "
                "the implicit or Neumann backward, under grad mode); use eq.jacobian_penalty(f, z)"
            )
        from ._stabilisers import penalty_at

        return penalty_at(*self.backward.pair, samples, reduction, generator)

    @staticmethod
    def of(
        it: Iteration,
        value: Any,
        solver: str,
        stop: str,
        tol: float,
        backward: BackwardInfo | None = None,
    ) -> Solution:
        """The solution of the solver loop's result ``it``, with ``value`` (``it.value`` in the
        state's structure) and the record its backward method fills in. The per-sample statistics
        stay on the host, where the loop made them."""
        batch = len(it.residual)
        return Solution(
            value=value,
            status=it.status,
            nstep=it.nstep,
            nfev=it.nfev,
            residual=torch.from_numpy(it.residual),
            converged=torch.from_numpy(it.residual < tol),
            trace=torch.tensor(it.trace, dtype=torch.float64, device="cpu"),
            residuals=torch.from_numpy(
                np.stack(it.residuals) if it.residuals else np.zeros((0, batch))
            ),
            evaluations=it.evaluations,
            stop=stop,
            tol=tol,
            solver=solver,
            backward=BackwardInfo() if backward is None else backward,
        )

    def warn_if_unconverged(self, what: str) -> None:
        """Emit a ``RuntimeWarning`` naming ``what`` unless every sample converged."""
        if self.status is not Status.CONVERGED:
            n_bad = int((~self.converged).sum())
            warnings.warn(
                f"{what} ended with status {self.status.value!r} after {self.nstep} iterations: "
                f"{n_bad} of {self.converged.numel()} samples above tol={self.tol:g} "
                f"(largest residual {_largest(self.residual):.3e})",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def all_converged(self) -> bool:
        """Whether every sample converged (same as ``status is Status.CONVERGED``)."""
        return self.status is Status.CONVERGED

    def __repr__(self) -> str:
        return (
            f"Solution(status={self.status.value}, nstep={self.nstep}, nfev={self.nfev}, "
            f"max_residual={_largest(self.residual):.3e}, "
            f"converged={int(self.converged.sum())}/{self.converged.numel()}, stop={self.stop!r}, "
            f"tol={self.tol:g}, solver={self.solver!r}, backward={self.backward!r})"
        )


@dataclass
class BackwardInfo:
    """Statistics of the backward pass of one solve, filled in when backward runs.

    Attributes:
        method: name of the backward method attached to the solve, or None without one.
        solution: for the implicit backward, the :class:`Solution` of the adjoint solve
            ``u = J^T u + g``; None for the other methods, and when the upstream gradient ``g``
            held inf or NaN (an overflow under mixed precision), which is passed on unsolved so
            that ``torch.amp.GradScaler`` sees it and skips the step.
        calls: how many times backward ran through this solve (e.g. twice with ``retain_graph``);
            counted for the implicit and Neumann methods, whose backward is equilibria's own.
            Phantom, JFB and unrolled gradients are plain autograd and leave it at 0.
    """

    method: str | None = None
    solution: Solution | None = None
    calls: int = 0
    # the recorded map evaluation (f(z*), z*) of the implicit and Neumann methods, flat (B, D),
    # reused by Solution.jacobian_penalty
    pair: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def __deepcopy__(self, memo: dict[int, Any]) -> BackwardInfo:
        # the recorded map call is part of an autograd graph, and torch refuses to deep-copy
        # non-leaf tensors: a copy (of a DEQ's last_solution, with its model) keeps the
        # statistics and drops the recording, as a solution computed without gradients has none
        return BackwardInfo(
            method=self.method,
            solution=copy.deepcopy(self.solution, memo),
            calls=self.calls,
        )

    @property
    def nstep(self) -> int | None:
        """Iterations of the adjoint solve, or None if there was none."""
        return None if self.solution is None else self.solution.nstep

    @property
    def residual(self) -> Tensor | None:
        """(B,) residual of the adjoint solve, or None if there was none."""
        return None if self.solution is None else self.solution.residual

    @property
    def converged(self) -> Tensor | None:
        """(B,) whether the adjoint solve converged, or None if there was none."""
        return None if self.solution is None else self.solution.converged

    def __repr__(self) -> str:
        if self.method is None:
            return "BackwardInfo(not run)"
        if self.solution is None:
            if self.method not in ("implicit", "neumann"):
                return f"BackwardInfo(method={self.method!r})"
            return f"BackwardInfo(method={self.method!r}, calls={self.calls})"
        s = self.solution
        return (
            f"BackwardInfo(method={self.method!r}, calls={self.calls}, nstep={s.nstep}, "
            f"max_residual={_largest(s.residual):.3e}, status={s.status.value})"
        )


def _largest(residual: Tensor) -> float:
    """The largest residual, 0 for an empty batch."""
    return float(residual.max()) if residual.numel() else 0.0
