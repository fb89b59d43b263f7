"""Picard (damped fixed-point) iteration: z <- (1 - tau) z + tau f(z)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .._validate import check_float
from ._base import Map, Solver, Step


@dataclass(frozen=True)
class Picard(Solver):
    """Plain or damped fixed-point iteration.

    The cheapest solver per iteration and the most robust for strongly contractive maps; converges
    linearly at the rate of the map's contraction, so Anderson or Broyden usually need far fewer
    iterations. Damping (``tau < 1``) helps maps whose Jacobian has eigenvalues near -1.

    Args:
        damping: step size ``tau`` in (0, 1]; 1 is the undamped iteration ``z <- f(z)``.

    Example:
        >>> sol = eq.solve(f, z0, solver=eq.Picard(damping=0.8))
    """

    damping: float = 1.0
    name: ClassVar[str] = "picard"

    def __post_init__(self) -> None:
        check_float("Picard damping", self.damping, low=0.0, high=1.0)

    def init(self, x: Tensor, fx: Tensor, g: Tensor) -> None:
        return None

    def step(self, fn: Map, x: Tensor, fx: Tensor, g: Tensor, state: None) -> Step:
        x = fx if self.damping == 1.0 else x + self.damping * g
        fx = fn(x)
        return Step(x, fx, fx - x, None, 1)
