"""The sequential reference loop and the Picard family (cumulative Picard, ParaDiGMS).

All three are proposals on the joint triangular system of ``_system.py``; the driver supplies the
window, acceptance, counting and stopping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from .._validate import check_choice, check_int
from ._system import Block, SamplingSolver, System, register_solver


def cumulative_picard(block: Block) -> Tensor:
    """ParaDiGMS' cumulative Picard proposal (Shih et al. 2023, Algorithm 1).

    ``X[k+1] <- X[lo] + sum_{j=lo}^{k} (step_j(X[j]) - X[j])`` over each sample's active steps:
    the drifts of the current iterate, summed from the sample's last accepted state.

    Returns:
        (L, N, *shape) the proposal for ``X[start+1 .. start+L]``.
    """
    L, N = block.active.shape
    rel = (block.lo - block.start).clamp(0, L)  # (N,) row of X[lo] in the block
    base = block.x[rel, torch.arange(N, device=rel.device)]  # (N, *shape)
    mask = block.active.reshape(block.active.shape + (1,) * (block.f.ndim - 2))
    drift = torch.where(mask, block.f - block.x[:-1], torch.zeros_like(block.f))  # (L, N, *shape)
    return base.unsqueeze(0) + drift.cumsum(0)


@register_solver
@dataclass(frozen=True)
class Sequential(SamplingSolver):
    """The reference loop: one step per round, T rounds and T·N model evaluations.

    It ignores ``tol`` (each step is computed from the previous one, exactly as a plain loop) and
    takes no window (it is 1).
    """

    name: ClassVar[str] = "sequential"
    exact: ClassVar[bool] = True

    def default_window(self, T: int) -> int:
        return 1

    def init(self, system: System) -> Any:
        return None

    def update(self, system: System, block: Block, state: Any) -> tuple[Tensor, Any]:
        return block.f, state


@register_solver
@dataclass(frozen=True)
class Picard(SamplingSolver):
    """Cumulative Picard over the whole trajectory (window T unless ``window=`` is given).

    Each round evaluates every unaccepted step at once; the first unaccepted step becomes exact
    every round, so at most T rounds (Pokle et al. 2022; Shih et al. 2023 for the cumulative form).
    """

    name: ClassVar[str] = "picard"

    def init(self, system: System) -> Any:
        return None

    def update(self, system: System, block: Block, state: Any) -> tuple[Tensor, Any]:
        return cumulative_picard(block), state


@register_solver
@dataclass(frozen=True)
class Paradigms(SamplingSolver):
    """ParaDiGMS (Shih et al. 2023): cumulative Picard on a sliding window.

    Args:
        window: the default window size (``sample(window=...)`` overrides it); ParaDiGMS'
            ``parallel`` (10 in its diffusers pipeline).
        rule: the tolerance rule. ``"exact"`` (ours): a step is accepted when
            ``||step_k(X_k) - X_{k+1}|| / ||step_k(X_k) - X_k|| <= tol``, a residual of the joint
            fixed point whose zero is the sequential trajectory. ``"paradigms"``: the paper's
            ``||Δ_k||² / (D σ_k²) < tol²`` with ``Δ_k`` the cumulative correction since the
            window's start and ``σ_k²`` the step's DDPM posterior variance (the last step, whose
            variance is 0 when ``ᾱ`` ends at 1, takes the smallest positive one), i.e. within a
            noise-relative tolerance of the sequential sample, not equal to it (``tol=0.1`` in
            its diffusers pipeline). Its code scales the state ``X_{k+1}`` by the variance of
            step ``k+1`` instead and pads the last with an inverse variance of 0, so the final
            state, the sample, is never checked; here every state is.
    """

    window: int = 10
    rule: Literal["exact", "paradigms"] = "exact"
    name: ClassVar[str] = "paradigms"

    def __post_init__(self) -> None:
        check_int("window", self.window, minimum=1)
        check_choice("rule", self.rule, ("exact", "paradigms"))

    def default_window(self, T: int) -> int:
        return min(self.window, T)

    def residual(self, system: System, block: Block) -> Tensor:
        if self.rule == "exact":
            return super().residual(system, block)
        var = system.schedule.step_variance().to(torch.float64)  # (T,)
        var = torch.where(var > 0, var, var[var > 0].min() if (var > 0).any() else 1.0)
        L = block.active.shape[0]
        var = var[block.start : block.start + L].to(block.g.device)  # (L,)
        mask = block.active.reshape(block.active.shape + (1,) * (block.g.ndim - 2))
        delta = torch.where(mask, block.g, torch.zeros_like(block.g)).cumsum(0)  # (L, N, *shape)
        D = block.g[0, 0].numel()
        r = (delta.flatten(2).double().pow(2).sum(2) / (D * var[:, None])).sqrt()  # (L, N)
        return torch.where(block.active, r, torch.zeros_like(r))

    def init(self, system: System) -> Any:
        return None

    def update(self, system: System, block: Block, state: Any) -> tuple[Tensor, Any]:
        return cumulative_picard(block), state
