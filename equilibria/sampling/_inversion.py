"""Inversion: find the noise ``x_T`` whose DDIM sample matches a target ``x_0``.

Minimise ℓ(x_T) = Σ_n ‖Φ(x_T)_n − x*_n‖² / D (Φ: the deterministic sampler, D: pixels per sample)
with Adam, starting from the DDIM encoding of the target (the sampler run backwards). Three ways
to get ∇ℓ (Pokle, Geng & Kolter 2022, "Deep Equilibrium Approaches to Diffusion Models"):

* ``"implicit"``: the forward is the joint fixed point, solved without gradients by any sampling
  solver (warm-started from the previous iterate's trajectory); the gradient solves the adjoint of
  the lower-triangular system exactly by a backward sweep, λ_T = ∂ℓ/∂x_0, λ_k = J_kᵀ λ_{k+1} with
  J_k = ∂step_k/∂x at the solved state X_k, recomputing one step's graph at a time: the memory of
  the backward is one model call's activations, flat in T. On the sequential trajectory it is the
  exact gradient (equal to backpropagation through the chain).
* ``"phantom"``: the same forward, then one damped differentiable step of the joint map in its
  cumulative form from the detached solution, X̃_T = (1−τ) X*_T + τ (P x_T + Σ_j Q_j h_j(X*_j)),
  where step_k(x) = A_k x + h_k(x) splits each DDIM step into its linear part and the model's
  term, P = Π_k A_k and Q_j = Π_{k>j} A_k (DDIM telescoped as in Pokle et al.). Only the first
  row X_0 = x_T is not detached, so the gradient is τ (P g + J_{h_0}(x_T)ᵀ Q_0 g): one VJP of one
  model call per iteration (it treats the later model terms as constants). τ only scales the
  gradient (Adam is invariant to that); it is kept as the method's parameter.
* ``"bptt"`` (the baseline): backpropagation through the sequential sampler; its memory holds
  every step's activations, linear in T.

Reference: Song, Meng & Ermon 2021 (DDIM encoding); Pokle, Geng & Kolter, NeurIPS 2022.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .._errors import NonFiniteError
from .._validate import check_bool, check_choice, check_float, check_int
from ._sample import SamplingSolution, _resolve_solver, sample
from ._schedule import DDIM, Schedule

__all__ = ["InversionResult", "invert"]

Gradient = Literal["implicit", "phantom", "bptt"]
_GRADIENTS = ("implicit", "phantom", "bptt")
Model = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class InversionResult:
    """What :func:`invert` returns besides ``x_T``.

    Attributes:
        x_T: (N, *shape) the optimised noise (detached).
        sample: (N, *shape) its sample by the sequential loop (exact).
        error: (N,) float64, per-sample mean squared error of ``sample`` to the target.
        losses: (steps,) float64, the mean over samples of the per-sample MSE of each iteration's
            forward sample (before its update).
        steps: Adam iterations taken.
        rounds: forward rounds over all iterations (the solver's batched model calls; T per
            iteration for ``"bptt"``), not counting the encoding and the final sample.
        nfe: model evaluations of single samples (forward and backward) over all iterations.
        cpu_s: process CPU time of the iterations (``time.process_time``).
        gradient: the method.
        converged: (N,) bool on the CPU, whether every iteration's forward solve accepted every
            step of the sample (:attr:`SamplingSolution.converged`; a forward that ran out of
            ``max_rounds`` is reported here, not raised, and its gradient was taken on the
            unconverged trajectory). True for ``"bptt"`` (the sequential loop) and when no
            iteration ran.
        unconverged: iterations whose forward solve left some sample unconverged.
        residuals: (N, T) float64 on the CPU, the last iteration's forward solve's per-step
            residuals (:attr:`SamplingSolution.residuals`: NaN for steps not accepted; zeros for
            ``"bptt"``, whose forward is exact); None when no iteration ran.
    """

    x_T: Tensor
    sample: Tensor
    error: Tensor
    losses: Tensor
    steps: int
    rounds: int
    nfe: int
    cpu_s: float
    gradient: str
    converged: Tensor
    unconverged: int
    residuals: Tensor | None


def _at_ap(sched: Schedule) -> tuple[Tensor, Tensor]:
    """(T,) ᾱ at each step's timestep and (T,) ᾱ after it (float64)."""
    a = sched.alphas_cumprod  # type: ignore[attr-defined]
    at = a[sched.timesteps]
    final = torch.tensor([float(sched.final_alpha_cumprod)], dtype=torch.float64)  # type: ignore[attr-defined]
    return at, torch.cat([a[sched.timesteps[1:]], final])


def _linear_parts(sched: DDIM) -> Tensor:
    """(T,) A_k, the coefficient of x in step_k(x) = A_k x + h_k(x) (η = 0, float64)."""
    at, ap = _at_ap(sched)
    sa, sb, sp, direction = at.sqrt(), (1 - at).sqrt(), ap.sqrt(), (1 - ap).sqrt()
    if sched.prediction_type == "epsilon":  # x0 = (x - sb e)/sa, eps = e
        return sp / sa
    if sched.prediction_type == "v_prediction":  # x0 = sa x - sb v, eps = sa v + sb x
        return sp * sa + direction * sb
    return direction / sb  # "sample": x0 = out, eps = (x - sa x0)/sb


def _t(sched: Schedule, k: int, x: Tensor) -> Tensor:
    return sched.timesteps[k].to(x.device).expand(x.shape[0])


def encode(model: Model, x0: Tensor, sched: DDIM) -> Tensor:
    """DDIM encoding: the deterministic sampler run backwards from ``x0`` (Song et al. 2021),
    using the model at step k's timestep on the state after step k; the inverse of the sampler
    up to how much ε changes over one step."""
    at, ap = _at_ap(sched)
    x = x0
    with torch.no_grad():
        for k in reversed(range(len(sched))):
            out = model(x, _t(sched, k, x)).to(x.dtype)
            a_t, a_p = float(at[k]), float(ap[k])
            if sched.prediction_type == "epsilon":
                eps = out
            elif sched.prediction_type == "v_prediction":
                eps = a_t**0.5 * out + (1 - a_t) ** 0.5 * x
            else:
                eps = (x - a_t**0.5 * out) / (1 - a_t) ** 0.5
            pred_x0 = (x - (1 - a_p) ** 0.5 * eps) / a_p**0.5
            x = a_t**0.5 * pred_x0 + (1 - a_t) ** 0.5 * eps
    if not torch.isfinite(x).all():
        raise NonFiniteError("the DDIM encoding of the target is non-finite")
    return x


def _shape_or_type(x: Any) -> str:
    """For errors: a tensor's shape and dtype, anything else's type name."""
    return f"shape {tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__


def _loss_grad(x0: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) per-sample MSE and ∂(Σ_n MSE_n)/∂x0."""
    d = x0 - target
    per = d.flatten(1).square().mean(1)
    return per, 2 * d / d[0].numel()


def implicit_sweep(model: Model, sched: Schedule, trajectory: Tensor, grad: Tensor) -> Tensor:
    """Solve the adjoint of the joint triangular system by a backward sweep: returns
    ∂ℓ/∂x_T = J_0ᵀ ⋯ J_{T−1}ᵀ ``grad``, recomputing each step's graph from ``trajectory[k]``
    (T+1, N, *shape) alone, so memory does not grow with T."""
    lam = grad
    for k in reversed(range(len(sched))):
        with torch.enable_grad():
            xk = trajectory[k].detach().requires_grad_(True)
            out = sched.step(xk, model(xk, _t(sched, k, xk)).to(xk.dtype), k)
            (lam,) = torch.autograd.grad(out, xk, lam)
    if not torch.isfinite(lam).all():
        raise NonFiniteError("the implicit gradient (adjoint sweep) is non-finite")
    return lam


def phantom_gradient(
    model: Model, sched: DDIM, x_T: Tensor, grad: Tensor, damping: float = 0.1
) -> Tensor:
    """τ (P g + J_{h_0}(x_T)ᵀ Q_0 g): the gradient of one damped step of the cumulative joint map
    from the detached solution (see the module docstring)."""
    A = _linear_parts(sched)  # (T,)
    P, Q0 = float(A.prod()), float(A[1:].prod())
    with torch.enable_grad():
        x = x_T.detach().requires_grad_(True)
        h0 = sched.step(x, model(x, _t(sched, 0, x)).to(x.dtype), 0) - float(A[0]) * x
        (vjp,) = torch.autograd.grad(h0, x, Q0 * grad)
    out = damping * (P * grad + vjp)
    if not torch.isfinite(out).all():
        raise NonFiniteError("the phantom gradient is non-finite")
    return out


def bptt(
    model: Model, sched: Schedule, x_T: Tensor, target: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The baseline: (x0, per-sample MSE, ∂ℓ/∂x_T) by backpropagation through the sequential
    loop (every step's activations are kept: memory linear in T)."""
    with torch.enable_grad():
        x_var = x_T.detach().requires_grad_(True)
        x = x_var
        for k in range(len(sched)):
            x = sched.step(x, model(x, _t(sched, k, x)).to(x.dtype), k)
        per, _ = _loss_grad(x.detach(), target)
        loss = (x - target).flatten(1).square().mean(1).sum()
        (grad,) = torch.autograd.grad(loss, x_var)
    if not torch.isfinite(grad).all():
        raise NonFiniteError("the BPTT gradient is non-finite")
    return x.detach(), per, grad


def invert(
    model: Model,
    x0_target: Tensor,
    sched: DDIM,
    *,
    gradient: Gradient = "implicit",
    steps: int = 50,
    lr: float = 0.05,
    init: Tensor | None = None,
    solver: Any = "default",
    tol: float = 1e-3,
    max_rounds: int | None = None,
    window: int | None = None,
    chunk: int | None = None,
    warm_start: bool = True,
    damping: float = 0.1,
    callback: Callable[[int, Tensor, Tensor], bool | None] | None = None,
) -> tuple[Tensor, InversionResult]:
    """Find ``x_T`` whose DDIM sample matches ``x0_target``, by Adam through the equilibrium.

    Args:
        model: ``model(x, t)`` as for :func:`~equilibria.sampling.sample`.
        x0_target: (N, *shape) the images to reconstruct.
        sched: a deterministic :class:`~equilibria.sampling.DDIM` (``eta == 0``).
        gradient: ``"implicit"`` (adjoint sweep, exact on the solved trajectory, flat memory),
            ``"phantom"`` (one damped step, one VJP per iteration) or ``"bptt"`` (the baseline:
            backprop through the sequential loop, memory linear in T).
        steps: Adam iterations (≥ 0).
        lr: Adam's learning rate (> 0).
        init: (N, *shape) the starting ``x_T``, floating point and finite, converted to
            ``x0_target``'s device and dtype (as :func:`sample` converts ``init`` and ``noise`` to
            ``x_T``'s); None: the DDIM encoding of the target.
        solver: the forward solve's solver (see :func:`sample`; as are the next four); not
            used by ``"bptt"``.
        tol: the forward solve's tolerance.
        max_rounds: the forward solve's round budget.
        window: the forward solve's active window.
        chunk: the forward solve's rows per model call.
        warm_start: start each forward solve from the previous iterate's trajectory.
        damping: τ of the phantom step, in (0, 1]. ``"phantom"`` is refused where it is
            identically zero: a step after the first whose output depends on its input only
            through the model (``prediction_type="sample"`` with ``final_alpha_cumprod=1``).
        callback: called as ``callback(step, x_T, per_sample_mse)`` after each iteration's
            forward (before the update); returning True stops (e.g. a time budget).

    Raises:
        NonFiniteError: if ``x0_target`` or ``init`` holds NaN or infinity, or the encoding, a
            forward solve or a gradient becomes non-finite. A forward solve that runs out of
            ``max_rounds`` is not an error: :attr:`InversionResult.converged` reports it.

    Returns:
        ``(x_T, result)``: the optimised noise and an :class:`InversionResult`.

    Example:
        >>> x_T, res = sampling.invert(model, images, sched, gradient="implicit", steps=100)
        >>> res.error  # per-sample MSE of the sequential sample of x_T
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
    gradient = check_choice("gradient", gradient, _GRADIENTS)  # type: ignore[assignment]
    if not isinstance(sched, DDIM):
        raise TypeError(f"sched must be a sampling.DDIM, got {type(sched).__name__}")
    if sched.eta != 0:
        raise ValueError(
            f"invert needs a deterministic sampler (sched.eta == 0), got eta={sched.eta}"
        )
    if (
        not isinstance(x0_target, Tensor)
        or not x0_target.is_floating_point()
        or x0_target.ndim < 2
        or x0_target.numel() == 0
    ):
        raise ValueError(
            "x0_target must be a floating-point tensor (N, *sample_shape), non-empty, got "
            + _shape_or_type(x0_target)
        )
    if not torch.isfinite(x0_target).all():
        raise NonFiniteError("x0_target contains NaN or infinity")
    steps = check_int("steps", steps, minimum=0)
    lr = check_float("lr", lr, low=0.0)
    damping = check_float("damping", damping, low=0.0, high=1.0)
    warm_start = check_bool("warm_start", warm_start)
    # the forward solve's options, checked here too: with steps=0 no forward solve runs
    tol = check_float("tol", tol, low=0.0)
    for option, value in (("max_rounds", max_rounds), ("window", window), ("chunk", chunk)):
        if value is not None:
            check_int(option, value, minimum=1)
    if gradient != "bptt":
        _resolve_solver(solver, {})
    if gradient == "phantom":
        A = _linear_parts(sched)
        if zero := [k for k in range(1, len(sched)) if float(A[k]) == 0.0]:
            raise ValueError(
                f"gradient='phantom' is identically zero for this schedule: step {zero[0]}'s "
                "output depends on its input only through the model (its linear part is 0: "
                f"prediction_type={sched.prediction_type!r} with final_alpha_cumprod="
                f"{sched.final_alpha_cumprod}), and the phantom step treats the later model "
                "terms as constants; use gradient='implicit' or 'bptt', or final_alpha_cumprod < 1"
            )
    if callback is not None and not callable(callback):
        raise TypeError(
            "callback must be None or callable as callback(step, x_T, per_sample_mse), got "
            f"{type(callback).__name__}"
        )
    target = x0_target.detach()
    if init is None:
        x_T = encode(model, target, sched)
    else:
        if (
            not isinstance(init, Tensor)
            or not init.is_floating_point()
            or init.shape != target.shape
        ):
            raise ValueError(
                f"init must be a floating-point tensor shaped like x0_target "
                f"{tuple(target.shape)}, got {_shape_or_type(init)}"
            )
        if not torch.isfinite(init).all():
            raise NonFiniteError("init contains NaN or infinity")
        # on x0_target's device and dtype, as sample() moves init and noise to x_T's
        x_T = init.detach().to(target.device, target.dtype).clone()
    param = torch.nn.Parameter(x_T)
    opt = torch.optim.Adam([param], lr=lr)
    losses: list[float] = []
    rounds = nfe = unconverged = 0
    T, N = len(sched), target.shape[0]
    trajectory: Tensor | None = None
    converged = torch.ones(N, dtype=torch.bool, device="cpu")  # as SamplingSolution's
    residuals: Tensor | None = None
    tic = time.process_time()
    done = 0
    for step in range(steps):
        x_T = param.detach()
        if gradient == "bptt":
            _, per, grad = bptt(model, sched, x_T, target)
            rounds += T
            nfe += 2 * T * N
            residuals = torch.zeros(N, T, dtype=torch.float64, device="cpu")  # exact loop
        else:
            sol: SamplingSolution
            x0, sol = sample(model, x_T, sched, solver=solver, tol=tol, max_rounds=max_rounds,
                             window=window, chunk=chunk,
                             init=trajectory if warm_start else None)  # fmt: skip
            trajectory = sol.trajectory
            rounds += sol.rounds
            nfe += sol.nfe
            converged &= sol.converged
            unconverged += int(not bool(sol.converged.all()))
            residuals = sol.residuals
            per, g0 = _loss_grad(x0, target)
            if gradient == "implicit":
                grad = implicit_sweep(model, sched, sol.trajectory, g0)
                nfe += T * N
            else:
                grad = phantom_gradient(model, sched, x_T, g0, damping)
                nfe += N
        losses.append(float(per.mean()))
        done = step + 1
        if callback is not None and callback(step, x_T.clone(), per):  # x_T: Adam's storage
            break
        param.grad = grad.to(param.dtype)
        opt.step()
    cpu_s = time.process_time() - tic
    x_T = param.detach()
    x0, _ = sample(model, x_T, sched, solver="sequential")
    error, _ = _loss_grad(x0, target)
    result = InversionResult(
        x_T=x_T, sample=x0, error=error.double(), losses=torch.tensor(losses, dtype=torch.float64),
        steps=done, rounds=rounds, nfe=nfe, cpu_s=cpu_s, gradient=gradient, converged=converged,
        unconverged=unconverged, residuals=residuals,
    )  # fmt: skip
    return x_T, result
