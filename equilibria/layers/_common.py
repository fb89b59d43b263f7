"""Shared setup of the decompositions (:mod:`._nmf`, :mod:`._clusters`): the factors' type, the
validated problem, the gradient modes, initial and online bases, and the dtype and layout helpers
every solver uses. See :mod:`._decompositions` for the gradient modes.

Reference: Z. Geng, M.-H. Guo, H. Chen, X. Li, K. Wei, Z. Lin, "Is Attention Better Than Matrix
Decomposition?", ICLR 2021, §2.2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .._random import check_generator, draw
from .._validate import check_bool, check_choice, check_float, check_int

GradMode = Literal["one_step", "jfb", "phantom", "unrolled", "bptt"]
_GRAD_MODES = ("one_step", "jfb", "phantom", "unrolled", "bptt")
_GRAD_ALIASES = {"bptt": "unrolled"}  # the name before the core's vocabulary; kept, documented


def _grad_mode(grad: object) -> str:
    """The canonical name of a ``grad=`` value ("bptt" is "unrolled"); others raise ValueError."""
    check_choice("grad", grad, _GRAD_MODES)
    return _GRAD_ALIASES.get(grad, grad)  # type: ignore[arg-type, return-value]


class Decomposition(NamedTuple):
    """Factors of X ≈ D Cᵀ returned by :func:`nmf`, :func:`vq` and :func:`cd`.

    Attributes:
        bases: D, shape (B, d, r). Detached from the graph when ``grad="one_step"``; with
            ``"jfb"`` it carries the gradient of the last update only.
        coef: C, shape (B, n, r), from the final update (carries the gradient).
    """

    bases: Tensor
    coef: Tensor

    def reconstruct(self) -> Tensor:
        """Returns the low-rank reconstruction D Cᵀ, shape (B, d, n)."""
        return torch.bmm(self.bases, self.coef.mT)


# ---------------------------------------------------------------------------------------------
# Validation and initialisation helpers.


def _check_finite(name: str, t: Tensor) -> None:
    """Raises ValueError when t holds NaN or ±Inf (one host sync; details only on failure).

    A NaN or ±Inf anywhere makes the sum of t non-finite, so a finite sum proves every value finite
    (50x cheaper than ``isfinite(t).all()`` on the CPU); only a non-finite sum, which finite values
    can also give by overflowing, is checked value by value.
    """
    wide = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    if bool(torch.isfinite(t.detach().sum(dtype=wide))):
        return
    if not bool(torch.isfinite(t).all()):
        bad = ~torch.isfinite(t)
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} must be finite (no NaN or Inf), got {int(bad.sum())} non-finite value(s) of "
            f"{t.numel()}, the first {t[first].item()} at index {first}"
        )


def check_momentum(momentum: object) -> float:
    """The moving-average momentum of online bases, in [0, 1)."""
    return check_float("momentum", momentum, low=0.0, high=1.0, low_open=False, high_open=True)


def _check_float_dtype(name: str, dtype: object) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{name} must be None or a floating torch.dtype, got {dtype!r}")


def _check_iter_dtype(iter_dtype: object, x: Tensor, grad: str) -> torch.dtype | None:
    """None (work in x.dtype) or a floating dtype for the no-grad iterations of ``one_step``,
    ``jfb`` and ``phantom``."""
    if iter_dtype is None or iter_dtype == x.dtype:
        return None
    _check_float_dtype("iter_dtype", iter_dtype)
    if _grad_mode(grad) == "unrolled":
        raise ValueError(
            f"iter_dtype={iter_dtype} applies to the no-grad iterations of grad='one_step', "
            f"'jfb' or 'phantom', got grad={grad!r}"
        )
    return iter_dtype


class _Problem(NamedTuple):
    """Validated arguments shared by :func:`nmf`, :func:`vq`, :func:`cd` and the Hamburger."""

    x: Tensor
    rank: int
    steps: int
    bases: Tensor | None
    inv_t: float
    grad: GradMode
    eps: float
    generator: torch.Generator | None = None
    iter_dtype: torch.dtype | None = None
    grad_steps: int = 1  # recorded full updates of "jfb" (1) and "phantom"
    grad_init: bool = False  # NMF: keep the initialisation's gradient through the iterate


def _grad_options(grad: str, grad_steps: object, grad_init: object) -> tuple[int, bool]:
    """Validates ``grad_steps`` and ``grad_init`` for a ``grad`` already checked by
    :func:`_grad_mode`, as given so that the errors name it (``"bptt"`` is ``"unrolled"`` here).

    Returns the number of recorded full updates (1 for ``"jfb"``, ``grad_steps`` for
    ``"phantom"``; unused otherwise) and ``grad_init``.
    """
    check_int("grad_steps", grad_steps, minimum=1)
    check_bool("grad_init", grad_init)
    if grad != "phantom" and grad_steps != 1:
        raise ValueError(
            f"grad_steps={grad_steps} applies to grad='phantom' ('jfb' records exactly one full "
            f"update), got grad={grad!r}"
        )
    if grad_init and grad not in ("jfb", "phantom"):
        raise ValueError(
            f"grad_init=True applies to grad='jfb' or 'phantom' (grad='unrolled' keeps that "
            f"gradient anyway, 'one_step' none), got grad={grad!r}"
        )
    return grad_steps, grad_init  # type: ignore[return-value]


def _problem(
    fn: str,
    x: object,
    rank: object,
    steps: object,
    bases: object,
    inv_t: object,
    grad: object,
    eps: object,
    generator: object,
    iter_dtype: object,
    grad_steps: object = 1,
    grad_init: object = False,
) -> _Problem:
    """Validates the arguments every decomposition takes."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor of shape (B, d, n), got {type(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must have a floating dtype, got {x.dtype}")
    if x.ndim != 3 or x.numel() == 0:
        raise ValueError(
            f"{fn}: x must have shape (B, d, n) with no empty dimension, got {tuple(x.shape)}"
        )
    _check_finite(f"{fn}: x", x)
    check_int("steps", steps, minimum=0)
    mode = _grad_mode(grad)
    grad_steps, grad_init = _grad_options(grad, grad_steps, grad_init)  # names the grad as given
    eps = check_float("eps", eps, low=0.0)
    inv_t = check_float("inv_t", inv_t, low=0.0)
    check_generator(generator)
    batch, dim, n = x.shape
    if rank is not None:  # 1 <= r <= min(d, n)
        check_int(f"{fn}: rank", rank, minimum=1, maximum=min(dim, n))
    if bases is not None:
        if not isinstance(bases, Tensor):
            raise TypeError(f"{fn}: bases must be a torch.Tensor or None, got {type(bases)}")
        if bases.ndim not in (2, 3) or bases.shape[-2] != dim:
            raise ValueError(
                f"{fn}: bases must have shape (d, r) or (B, d, r) with d={dim}, "
                f"got {tuple(bases.shape)}"
            )
        if bases.ndim == 3 and bases.shape[0] not in (1, batch):
            raise ValueError(
                f"{fn}: bases has batch size {bases.shape[0]}, x has {batch}; they must match"
            )
        if bases.dtype != x.dtype or bases.device != x.device:
            raise ValueError(
                f"{fn}: bases ({bases.dtype}, {bases.device}) must match x ({x.dtype}, {x.device})"
            )
        _check_finite(f"{fn}: bases", bases)
        if rank is not None and rank != bases.shape[-1]:
            raise ValueError(f"{fn}: rank={rank} disagrees with bases.shape[-1]={bases.shape[-1]}")
        rank = bases.shape[-1]
    if rank is None:
        raise ValueError(f"{fn}: give rank or initial bases")
    limit = min(dim, n)
    if not 1 <= rank <= limit:
        raise ValueError(
            f"{fn}: rank must be in [1, min(d, n)] = [1, {limit}] for x of shape "
            f"{tuple(x.shape)}, got {rank}"
        )
    iter_dtype = _check_iter_dtype(iter_dtype, x, grad)  # names the grad as given
    return _Problem(x, rank, steps, bases, inv_t, mode, eps, generator, iter_dtype, grad_steps,  # type: ignore[arg-type]
                    grad_init)  # fmt: skip


def _normalize_columns(d: Tensor, eps: float = 1e-12) -> Tensor:
    """Scales each column of d (..., dim, r) to unit L2 norm."""
    return d / d.norm(dim=-2, keepdim=True).clamp_min(eps)


def random_bases(
    batch: int,
    dim: int,
    rank: int,
    *,
    nonnegative: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Draws random initial bases with unit-norm columns, one set per sample.

    Args:
        batch: number of samples B.
        dim: feature dimension d.
        rank: number of bases r.
        nonnegative: uniform on [0, 1) (for NMF) instead of standard normal (for VQ and CD).
        generator: optional random generator, for reproducible draws; a generator on another
            device (a CPU one for CUDA bases) draws where it lives and the result is moved.
        device: device of the result.
        dtype: dtype of the result.

    Returns:
        Bases of shape (B, d, r) whose columns have unit L2 norm.
    """
    check_int("batch", batch, minimum=1)
    check_int("dim", dim, minimum=1)
    check_int("rank", rank, minimum=1)
    _check_float_dtype("dtype", dtype)
    check_generator(generator)
    shape = (batch, dim, rank)
    d = draw(shape, normal=not nonnegative, generator=generator, device=device, dtype=dtype)
    return _normalize_columns(d)


def moving_average_bases(buffer: Tensor, bases: Tensor, *, momentum: float) -> Tensor:
    """Online bases: exponential moving average of the solved bases over the batch.

    ``new = normalize_columns(momentum * buffer + (1 - momentum) * mean_b(bases))``. The Hamburger
    calls this after each training forward pass when ``init="online"`` and uses the buffer as the
    initial bases of the next call (in training and in evaluation), so the decomposition starts
    close to the bases seen in recent batches instead of from noise.

    Args:
        buffer: current bases, shape (d, r).
        bases: bases solved for a batch, shape (B, d, r).
        momentum: weight kept on the old buffer, in [0, 1).

    Returns:
        The updated bases, shape (d, r), unit-norm columns, no gradient.
    """
    momentum = check_momentum(momentum)
    for name, t in (("buffer", buffer), ("bases", bases)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__} {t!r}")
    if buffer.ndim != 2 or bases.ndim != 3 or bases.shape[1:] != buffer.shape:
        raise ValueError(
            f"buffer must have shape (d, r) and bases (B, d, r) with the same (d, r), got "
            f"{tuple(buffer.shape)} and {tuple(bases.shape)}"
        )
    if bases.device != buffer.device:
        raise ValueError(
            f"bases must be on the buffer's device {buffer.device}, got bases on {bases.device}"
        )
    with torch.no_grad():
        mixed = torch.lerp(bases.mean(0).to(buffer.dtype), buffer, momentum)
        return _normalize_columns(mixed)


def _initial_bases(
    x: Tensor, rank: int, bases: Tensor | None, nonnegative: bool, generator: torch.Generator | None
) -> Tensor:
    """Returns (B, d, r) initial bases: a fresh copy of the given ones (which keeps their graph
    when recorded) or a random draw."""
    batch, dim, _ = x.shape
    if bases is None:
        return random_bases(
            batch, dim, rank, nonnegative=nonnegative, generator=generator, device=x.device,
            dtype=x.dtype,
        )  # fmt: skip
    return bases.expand(batch, dim, rank).clone()


# ---------------------------------------------------------------------------------------------
# Dtype and layout helpers shared by the solvers.


def _keep_dtype(x: Tensor) -> contextlib.AbstractContextManager[object]:
    """Autocast off for the functional forms where it would run x's products in another dtype.

    Under autocast a float32 x had its products in float16 or bfloat16 against float32 iterates:
    one-step NMF failed in place (``bmm(..., out=)`` of mixed dtypes), and CD (and bfloat16 BPTT
    NMF) returned float16/bfloat16 coefficients with float32 bases, on which ``reconstruct()``
    failed. The factors now come back in x's dtype, as without autocast; the functional forms'
    lower precision is ``iter_dtype``. The Hamburger, whose lower bread already gives autocast's
    dtype, calls the solvers directly and is unaffected.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) != x.dtype:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _float16_recorded(p: _Problem) -> bool:
    """Whether updates would be recorded by autograd in float16 (input or autocast dtype)."""
    device_type = p.x.device.type
    float16_autocast = (
        torch.is_autocast_enabled(device_type)
        and torch.get_autocast_dtype(device_type) == torch.float16
    )
    return p.grad != "one_step" and (p.x.dtype == torch.float16 or float16_autocast)


def _in_float32(p: _Problem, solve: Callable[[_Problem], Decomposition]) -> Decomposition:
    """Runs ``solve`` on a float32 copy of the problem with autocast off (or its products would
    be float16 again) and hands back the factors in x's dtype.

    The recorded updates of every decomposition divide by quantities that can be small (NMF's
    C DᵀD + ε, VQ/CD's column sums of the assignments + ε, and their softmax at inv_t = 100):
    their derivatives, of order 1/den², overflow float16's range (65504) and the gradient of x
    came out non-finite. bfloat16 has float32's range and is kept.
    """
    x, bases = p.x, p.bases
    with torch.autocast(x.device.type, enabled=False):
        up = solve(p._replace(x=x.float(), bases=None if bases is None else bases.float()))
    return Decomposition(up.bases.to(x.dtype), up.coef.to(x.dtype))


def _tokens_major(x: Tensor) -> bool:
    """True when x (B, d, n) is a transposed view of a contiguous (B, n, d) tensor."""
    return x.stride(-2) == 1 and x.stride(-1) != 1


def _x_transpose_times(x: Tensor, p: Tensor) -> Tensor:
    """XᵀP, shape (B, n, r), stored (B, n, r)-contiguous for tokens-major x, else (B, r, n)."""
    if _tokens_major(x):
        return torch.bmm(x.mT, p)
    return torch.bmm(p.mT, x).mT


def _no_graph(x: Tensor) -> bool:
    """True when no autograd graph is recorded for operations on x."""
    return not (torch.is_grad_enabled() and x.requires_grad)
