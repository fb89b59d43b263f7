"""Diagnostics: convergence plots and gradient-quality checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._backward import Backward, Implicit, resolve_backward
from ._solution import Solution


def plot_convergence(
    sol: Solution,
    ax: Any = None,
    *,
    samples: bool = True,
    backward: bool = True,
    title: str | None = None,
) -> Any:
    """Draw the residual traces of a solve (and of its adjoint solve) on a log scale.

    Needs matplotlib (``pip install equilibria[zoo]``).

    Args:
        sol: a :class:`Solution` (from ``solve``, ``fixed_point`` or ``DEQ.last_solution``).
        ax: a matplotlib Axes to draw on; a new figure is made when None.
        samples: draw every sample's residual as a thin line, besides the batch maximum.
        backward: also draw the adjoint solve of the implicit backward, if it ran.
        title: the Axes title.

    Returns:
        The matplotlib Axes.

    Example:
        >>> ax = eq.plot_convergence(layer.last_solution)
        >>> ax.figure.savefig("convergence.png")
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_convergence needs matplotlib: pip install 'equilibria[zoo]'"
        ) from err
    if not isinstance(sol, Solution):
        raise TypeError(f"sol must be an equilibria Solution, got {type(sol).__name__}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    runs = [("forward", sol, "C0")]
    if backward and sol.backward.solution is not None:
        runs.append(("backward (adjoint)", sol.backward.solution, "C3"))
    for label, run, color in runs:
        steps = torch.arange(1, run.nstep + 1, device="cpu")
        if samples:
            for column in run.residuals.T:
                ax.plot(steps, column.clamp_min(1e-300), color=color, alpha=0.15, lw=0.7)
        ax.plot(
            steps,
            run.trace.clamp_min(1e-300),
            color=color,
            lw=2,
            label=f"{label}: {run.solver}, {run.nstep} it, {run.status.value}",
        )
        ax.axhline(run.tol, color=color, ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"residual ({sol.stop})")
    ax.set_title(title or "convergence (thin: samples, bold: batch maximum, dotted: tol)")
    ax.legend(loc="upper right", fontsize=8)
    return ax


@dataclass(frozen=True)
class GradientAgreement:
    """How well an approximate gradient matches the exact one.

    Attributes:
        cosine: cosine between the two gradients over all parameters.
        relative_error: ||g - g_exact|| / ||g_exact||.
        norm_ratio: ||g|| / ||g_exact||.
        per_parameter: cosine per parameter (by position in ``parameters``; NaN where either
            gradient is zero).
    """

    cosine: float
    relative_error: float
    norm_ratio: float
    per_parameter: tuple[float, ...]


def gradient_agreement(
    loss: Callable[[Backward], Tensor],
    parameters: Iterable[Tensor],
    backward: str | Backward,
    *,
    reference: str | Backward | None = None,
) -> GradientAgreement:
    """Compare the gradient of a backward method with the exact implicit gradient on one batch.

    Args:
        loss: ``loss(backward) -> scalar``: computes the loss with the given backward method (for a
            :class:`equilibria.DEQ`, use ``with layer.using(backward): ...`` inside).
        parameters: the tensors to differentiate (e.g. ``model.parameters()``).
        backward: the method to check, name or object.
        reference: the exact method, name or object; default
            ``eq.Implicit(tol=1e-8, max_iter=200)``.

    Both losses start from the same state of torch's global random number generator (the CPU
    one and those of the parameters' CUDA devices), so a model in training mode draws the same
    dropout masks and random initial bases for both; explicit ``torch.Generator`` objects of your
    own are not reset. Buffers that a training-mode forward updates (spectral norm's power
    iteration vectors, batch-norm statistics) still advance between the two losses, so the second
    gradient is taken at slightly different weights: for an exact comparison of such a model, call
    it in eval mode.

    Returns:
        A :class:`GradientAgreement`.

    Example:
        >>> def loss(b):
        ...     with layer.using(b):
        ...         return criterion(head(layer(x)), y)
        >>> eq.gradient_agreement(loss, model.parameters(), eq.Phantom(steps=5)).cosine
    """
    params = list(parameters)
    if not params:
        raise ValueError("parameters must contain at least one tensor")
    backward = resolve_backward(backward)
    if reference is None:
        reference = Implicit(tol=1e-8, max_iter=200)
    reference = resolve_backward(reference, "reference")
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):  # the second loss starts from the same state
        approx = _grads(loss(backward), params)
    exact = _grads(loss(reference), params)
    dot = sum(float((a * b).sum()) for a, b in zip(approx, exact))
    na = math.sqrt(sum(float(a.pow(2).sum()) for a in approx))
    ne = math.sqrt(sum(float(b.pow(2).sum()) for b in exact))
    diff = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(approx, exact)))
    per = []
    for a, b in zip(approx, exact):
        denom = float(a.norm() * b.norm())
        per.append(float((a * b).sum()) / denom if denom > 0 else math.nan)
    return GradientAgreement(
        cosine=dot / (na * ne) if na > 0 and ne > 0 else math.nan,
        relative_error=diff / ne if ne > 0 else math.nan,
        norm_ratio=na / ne if ne > 0 else math.nan,
        per_parameter=tuple(per),
    )


def _grads(loss: Tensor, params: list[Tensor]) -> list[Tensor]:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("loss(backward) must return a scalar tensor")
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
