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
    """A new iterate ``x``, its image ``fx = f(x)``, the residual ``g = fx - x``, the solver state
    and the number of map evaluations the step used; ``gsq``, when the solver computed it anyway,
    is ``||g||^2`` per sample (B,), which spares the driver a pass over ``g``."""

    x: Tensor
    fx: Tensor
    g: Tensor
    state: Any
    nfev: int
    gsq: Tensor | None = None


class Solver(abc.ABC):
    """Base class of the fixed-point solvers (Picard, Anderson, Broyden)."""

    name: ClassVar[str]

    @abc.abstractmethod
    def init(self, x: Tensor, fx: Tensor, g: Tensor) -> Any:
        """State after the first iterate ``x`` (B, D) with image ``fx`` and residual ``g``."""

    @abc.abstractmethod
    def step(self, fn: Map, x: Tensor, fx: Tensor, g: Tensor, state: Any) -> Step:
        """Propose the next iterate from the current one and the state, and evaluate ``fn``."""

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
