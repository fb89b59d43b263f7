"""Jacobian regularisation (Bai, Koltun & Kolter, ICML 2021) and the spectral radius."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from ._random import check_generator, draw
from ._tree import StateSpec
from ._validate import check_choice, check_int

Reduction = Literal["mean", "none"]


def jacobian_penalty(
    f: Callable[[Any], Any],
    z: Any,
    *,
    samples: int = 1,
    reduction: Reduction = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hutchinson estimate of ||J||_F^2 / D at ``z``, J = df/dz, differentiable in the parameters.

    Adding ``gamma * jacobian_penalty(f, z)`` to the loss keeps the equilibrium map well conditioned
    during training, so the solver needs fewer iterations and the backward stays stable.
    E_eps ||eps^T J||^2 = ||J||_F^2 for eps ~ N(0, I); each probe costs one vector-Jacobian product
    with ``create_graph=True`` (plus one map evaluation at ``z`` shared by all probes). When ``z``
    comes from the implicit or Neumann backward, ``Solution.jacobian_penalty`` reuses the map
    evaluation already recorded there and costs only the VJPs.

    Args:
        f: the map (same structure as ``z``). Samples must not interact (the estimate is per
            sample, so a map that mixes samples, e.g. BatchNorm in training mode, adds cross
            terms).
        z: the state at which to evaluate, usually the equilibrium; it is detached.
        samples: number of random probes >= 1 averaged.
        reduction: ``"mean"`` over the batch (a scalar) or ``"none"`` (a (B,) tensor).
        generator: random generator for the probes (a CPU one also serves CUDA data).

    Returns:
        The penalty: a scalar or (B,) tensor with a graph to the parameters ``f`` closes over.

    The penalty differentiates through a vector-Jacobian product (double backward), which cells
    compiled with ``torch.compile`` do not support (an AOTAutograd limitation): use the eager cell
    for the penalty.

    Example:
        >>> z, sol = eq.fixed_point(f, z0)
        >>> loss = task_loss(z) + 2.0 * eq.jacobian_penalty(f, z)

    Reference: Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization",
    ICML 2021.
    """
    check_int("samples", samples, minimum=1)
    check_choice("reduction", reduction, ("mean", "none"))
    check_generator(generator)
    spec = StateSpec.of(z, "z")
    zr = spec.flatten(z).detach().requires_grad_()
    with torch.enable_grad():
        fz = spec.flat_map(f)(zr)
    return penalty_at(fz, zr, samples, reduction, generator)


def penalty_at(
    fz: Tensor,
    zr: Tensor,
    samples: int,
    reduction: Reduction,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The penalty from a recorded map evaluation ``fz = f(zr)`` (both flat (B, D))."""
    check_int("samples", samples, minimum=1)
    check_choice("reduction", reduction, ("mean", "none"))
    total = fz.new_zeros(fz.shape[0])
    if not fz.requires_grad:  # the map depends on nothing that needs a gradient: J = 0
        return total.mean() if reduction == "mean" else total
    with torch.enable_grad():
        for _ in range(samples):
            eps = draw(fz.shape, normal=True, generator=generator, dtype=fz.dtype, device=fz.device)
            (vjp,) = torch.autograd.grad(
                fz, zr, eps, create_graph=True, retain_graph=True, allow_unused=True
            )
            if vjp is not None:  # None: the map does not depend on z, J = 0
                total = total + vjp.pow(2).sum(1)
    per_sample = total / (samples * fz.shape[1])
    return per_sample.mean() if reduction == "mean" else per_sample


def spectral_radius(
    f: Callable[[Any], Any],
    z: Any,
    *,
    iters: int = 30,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Power-iteration estimate of the spectral radius of J = df/dz at ``z``, per sample.

    A radius near or above 1 explains slow or failing forward solves. The iteration runs on J^T
    (same eigenvalues) with vector-Jacobian products through one recorded map evaluation, and the
    estimate is the geometric mean of the growth factors ||J^T v_k|| over the second half of the
    iterations. When the largest |eigenvalue| is a single real one, separated from the rest, each
    factor converges to it; when it is a complex pair (the usual case for a real non-symmetric
    Jacobian) the factors oscillate around it forever, and only their mean converges (error of
    order 1 / iters). For non-normal Jacobians it is an estimate.

    Args:
        f: the map.
        z: the state (usually the equilibrium); detached.
        iters: power iterations >= 1.
        generator: random generator for the start vector (a CPU one also serves CUDA data).

    Returns:
        (B,) detached estimates.

    Example:
        >>> rho = eq.spectral_radius(f, sol.value, iters=50)
    """
    check_int("iters", iters, minimum=1)
    check_generator(generator)
    spec = StateSpec.of(z, "z")
    zr = spec.flatten(z).detach().requires_grad_()
    with torch.enable_grad():
        fz = spec.flat_map(f)(zr)
    if not fz.requires_grad:  # the map does not depend on z (nor on anything else): J = 0
        return zr.new_zeros(zr.shape[0])
    v = draw(zr.shape, normal=True, generator=generator, dtype=zr.dtype, device=zr.device)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    tiny = torch.finfo(zr.dtype).tiny
    log_sum = torch.zeros(zr.shape[0], dtype=zr.dtype, device=zr.device)
    zero = torch.zeros(zr.shape[0], dtype=torch.bool, device=zr.device)
    first = iters // 2  # the first half lets the start vector's other components die out
    for k in range(iters):
        (w,) = torch.autograd.grad(fz, zr, v, retain_graph=True, allow_unused=True)
        if w is None:  # the map does not depend on z: J = 0
            return zr.new_zeros(zr.shape[0])
        growth = torch.linalg.vector_norm(w, dim=1)
        if k >= first:
            log_sum += growth.clamp_min(tiny).log()
            zero |= growth == 0  # v reached the null space: J^T is nilpotent on it, rho 0
        v = w / growth.clamp_min(tiny).unsqueeze(1)
    rho = torch.exp(log_sum / (iters - first))
    return torch.where(zero, torch.zeros_like(rho), rho).detach()
