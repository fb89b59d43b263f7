"""Matrix decompositions solved by a few iterations: the "ham" of the Hamburger.

Each function factorises a batch of matrices X ∈ R^{d×n} (d features, n positions) as X ≈ D Cᵀ with
bases D ∈ R^{d×r} and coefficients C ∈ R^{n×r}, running ``steps`` alternating updates of C and D and
one final update of C. Three gradients (``grad=``), named like the core's backward methods:

* ``"one_step"`` (the paper's): the earlier updates run in place under ``torch.no_grad`` and only
  the final C update is differentiated, with D and the previous C held constant (memory
  independent of ``steps``). No gradient reaches x through the bases.
* ``"jfb"`` (Jacobian-free, like :class:`equilibria.JFB`): the first ``steps - 1`` updates run
  without gradient and the last full update of both factors (C, then D) and the final C update are
  differentiated from that detached iterate, so the gradient also flows through the bases; memory
  is still independent of ``steps``.
* ``"phantom"`` (like :class:`equilibria.Phantom` with ``damping=1``): the last ``grad_steps``
  full updates and the final C update are differentiated from the detached iterate before them;
  memory grows with ``grad_steps``, not with ``steps``. ``"jfb"`` is ``"phantom"`` with
  ``grad_steps=1``.
* ``"unrolled"`` (like :class:`equilibria.Unrolled`; ``"bptt"`` is an alias): autograd records
  every update, memory grows with ``steps``.

NMF's "detached" iterate can keep its dependence on the initialisation (``grad_init=True``). The
multiplicative updates make C_k = C_0 ⊙ R_k with R_k the product of the update ratios, so the
dependence of the initial C_0 = softmax(inv_t · XᵀD_0) on x survives every update; BPTT keeps
it. With ``grad_init`` the iterate the recorded updates start from is C_0 ⊙ sg(R) (its value
unchanged; sg: stop-gradient), i.e. the ratios of the no-grad updates are held constant, as the
paper's one-step gradient holds D constant. It costs one (B, n, r) product, and memory stays
independent of ``steps``.

Reference: Z. Geng, M.-H. Guo, H. Chen, X. Li, K. Wei, Z. Lin, "Is Attention Better Than Matrix
Decomposition?", ICLR 2021, §2.2 (NMF, VQ, CD) and §2.3 (one-step gradient); S. W. Fung et al.,
"JFB: Jacobian-Free Backpropagation for Implicit Networks", AAAI 2022.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .._random import check_generator, draw
from .._validate import check_bool, check_choice, check_float, check_int

__all__ = [
    "DECOMPOSITIONS",
    "Decomposition",
    "GradMode",
    "cd",
    "moving_average_bases",
    "nmf",
    "random_bases",
    "vq",
]

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
# NMF: multiplicative updates (Lee & Seung) on X ≈ D Cᵀ with X, D, C ≥ 0.


def _nmf_updates_(x: Tensor, d: Tensor, ct: Tensor, dtx: Tensor, steps: int, eps: float) -> None:
    """Runs ``steps`` (C, D) multiplicative updates in place; call under ``torch.no_grad``.

    The coefficients are kept transposed, Cᵀ (B, r, n): on CPU the products DᵀX and X(Cᵀ)ᵀ are
    faster than XᵀD (a transposed-operand GEMM), and every update stays contiguous.

    Args:
        x: (B, d, n), non-negative; may have a lower precision than d and ct, in which case the
            matrix products with an n-sized dimension (DᵀX, XC, and the r×r-by-n products DᵀD·Cᵀ
            and CᵀC) run in x.dtype and the elementwise updates in d.dtype.
        d: (B, d, r) bases, updated in place.
        ct: (B, r, n) transposed coefficients, updated in place.
        dtx: (B, r, n) in x.dtype, holding DᵀX for the current D; used as workspace.
        steps: number of (C, D) updates.
        eps: added to denominators.
    """
    low = x.dtype != d.dtype
    den = torch.empty_like(ct if not low else dtx)  # (B, r, n)
    for step in range(steps):
        if step:
            torch.bmm((d.to(x.dtype) if low else d).mT, x, out=dtx)
        # C ← C ⊙ XᵀD ⊘ (C DᵀD + ε), transposed: Cᵀ ← Cᵀ ⊙ DᵀX ⊘ (DᵀD Cᵀ + ε)
        dtd = torch.bmm(d.mT, d)
        torch.bmm(dtd.to(x.dtype), ct.to(x.dtype), out=den) if low else torch.bmm(dtd, ct, out=den)
        ct.mul_(dtx).div_(den.add_(eps))
        # D ← D ⊙ XC ⊘ (D CᵀC + ε); the denominator is (B, d, r), cheap next to XC
        cs = ct.to(x.dtype) if low else ct
        den_d = torch.bmm(d, torch.bmm(cs, cs.mT).to(d.dtype)).add_(eps)
        d.mul_(torch.bmm(x, cs.mT)).div_(den_d)


def _nmf_coef_update(x: Tensor, d: Tensor, c: Tensor, eps: float) -> Tensor:
    """One differentiable C update: C ⊙ XᵀD ⊘ (C DᵀD + ε), shapes as in :func:`nmf`."""
    return c * torch.bmm(x.mT, d) / (torch.bmm(c, torch.bmm(d.mT, d)) + eps)


def _nmf_bases_update(x: Tensor, d: Tensor, c: Tensor, eps: float) -> Tensor:
    """One differentiable D update: D ⊙ XC ⊘ (D CᵀC + ε)."""
    return d * torch.bmm(x, c) / (torch.bmm(d, torch.bmm(c.mT, c)) + eps)


def nmf(
    x: Tensor,
    rank: int | None = None,
    *,
    steps: int = 6,
    bases: Tensor | None = None,
    inv_t: float = 1.0,
    grad: GradMode = "one_step",
    eps: float = 1e-6,
    generator: torch.Generator | None = None,
    iter_dtype: torch.dtype | None = None,
    grad_steps: int = 1,
    grad_init: bool = False,
) -> Decomposition:
    """Non-negative matrix factorisation X ≈ D Cᵀ by multiplicative updates.

    Initialises C = softmax(inv_t · XᵀD) over the r bases, runs ``steps`` updates
    C ← C ⊙ XᵀD ⊘ (C DᵀD + ε), D ← D ⊙ XC ⊘ (D CᵀC + ε), then one more C update. Each update does
    not increase ‖X − DCᵀ‖_F (Lee & Seung, 2001), up to ε. Cost per step O(ndr + (n + d)r²).

    Args:
        x: non-negative input, shape (B, d, n).
        rank: number of bases r, 1 ≤ r ≤ min(d, n); may be omitted when ``bases`` is given.
        steps: number of (C, D) updates before the final C update.
        bases: initial bases, shape (d, r) or (B, d, r), non-negative; random uniform with unit
            columns, one draw per sample, when omitted.
        inv_t: inverse temperature of the initial softmax.
        grad: ``"one_step"`` runs the ``steps`` updates without autograd and differentiates only
            the final C update, with D and the previous C held constant (memory independent of
            ``steps``); ``"jfb"`` differentiates the last (C, D) update and the final C update
            from the detached iterate before them (memory independent of ``steps``, gradient
            through the bases too); ``"phantom"`` the last ``grad_steps`` (C, D) updates and the
            final C update; ``"unrolled"`` (alias ``"bptt"``) differentiates through every
            update.
        eps: added to every denominator.
        generator: random generator for the initial bases (a CPU one also serves CUDA data).
        iter_dtype: dtype of the big matrix products of the no-grad iterations of
            ``grad="one_step"``, ``"jfb"`` or ``"phantom"`` (``None``: x.dtype).
            ``torch.bfloat16`` halves their cost on CPUs with AVX512-BF16 or AMX and on recent
            GPUs; the iterates and the differentiated steps stay in x.dtype.
        grad_steps: recorded (C, D) updates of ``grad="phantom"``, ≥ 1 (``"jfb"``: 1); more
            than ``steps`` records them all (BPTT but for the initialisation, see ``grad_init``).
        grad_init: with ``"jfb"`` or ``"phantom"``, let the iterate the recorded updates start
            from keep the gradient of the softmax initialisation, the no-grad updates' ratios held
            constant (see the module docstring); with ``grad_steps >= steps`` this is BPTT's
            gradient in x (given ``bases`` get none from ``"jfb"`` or ``"phantom"``).

    Returns:
        :class:`Decomposition` with bases (B, d, r) and coef (B, n, r).

    Example:
        >>> x = torch.rand(2, 64, 100)
        >>> dec = nmf(x, rank=8, steps=10)
        >>> dec.reconstruct().shape
        torch.Size([2, 64, 100])

    Reference: Geng et al., "Is Attention Better Than Matrix Decomposition?", ICLR 2021, §2.2.
    """
    p = _problem("nmf", x, rank, steps, bases, inv_t, grad, eps, generator, iter_dtype,
                 grad_steps, grad_init)  # fmt: skip
    x, bases = p.x, p.bases
    if bool((x < 0).any()):
        raise ValueError(
            f"nmf: x must be non-negative (apply a ReLU first, as the Hamburger's lower bread "
            f"does); its minimum is {x.min().item():.4g}"
        )
    if bases is not None and bool((bases < 0).any()):
        raise ValueError("nmf: initial bases must be non-negative")
    with _keep_dtype(x):
        return _nmf(p)


def _nmf(p: _Problem) -> Decomposition:
    """NMF without input validation; see :func:`nmf`."""
    x, rank, steps, bases, inv_t, grad, eps, generator, *_ = p
    if _float16_recorded(p):
        # differentiating the divisions by C DᵀD + ε overflows float16 (1/den² with den near
        # ε after the ReLU's zeros)
        return _in_float32(p, _nmf)
    if grad == "unrolled":
        d = _initial_bases(x, rank, bases, True, generator)
        c = torch.softmax(inv_t * torch.bmm(x.mT, d), dim=-1)
        for _ in range(steps):
            c = _nmf_coef_update(x, d, c, eps)
            d = _nmf_bases_update(x, d, c, eps)
        return Decomposition(d, _nmf_coef_update(x, d, c, eps))
    if grad in ("jfb", "phantom"):
        recorded = min(p.grad_steps, steps)
        # the detached (C, D) iterate; with grad_init, C keeps the initialisation's gradient
        d, c = _nmf_iterate(p._replace(steps=steps - recorded))
        for _ in range(recorded):  # the last full updates, recorded: through the bases as well
            c = _nmf_coef_update(x, d, c, eps)
            d = _nmf_bases_update(x, d, c, eps)
        return Decomposition(d, _nmf_coef_update(x, d, c, eps))
    d, weight = _nmf_solve(p)
    # The only product autograd records. It is stored so that its gradient w.r.t. x comes out in
    # x's own layout; a mismatch makes the lower bread's ReLU backward an order of magnitude slower.
    product = _x_transpose_times(x, d)  # XᵀD, (B, n, r)
    coef = product.mul_(weight) if _no_graph(x) else product * weight
    return Decomposition(d, coef)


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


def _nmf_iterate(p: _Problem) -> tuple[Tensor, Tensor]:
    """D (B, d, r) and C (B, n, r) after ``p.steps`` no-grad (C, D) updates from the softmax
    initialisation, in x's dtype (the big products in ``p.iter_dtype`` when given).

    With ``p.grad_init`` (and x recorded by autograd) C carries the gradient of the initial
    C_0 = softmax(inv_t · XᵀD_0) through the updates, whose ratios R = C / C_0 are held constant:
    C + (C_0 - sg(C_0)) ⊙ sg(R), the value of C exactly, the gradient R ⊙ dC_0.
    """
    x, rank, steps, bases, inv_t, _, eps, generator, iter_dtype, _, grad_init = p
    grad_init = grad_init and not _no_graph(x)  # checked before no_grad turns recording off
    with torch.no_grad():
        xd = x.detach()
        d = _initial_bases(xd, rank, bases, True, generator)
        d0 = d.clone() if grad_init else None
        xs = xd if iter_dtype is None else xd.to(iter_dtype)  # operand of the big products
        dtx = torch.bmm(d.to(xs.dtype).mT, xs)  # DᵀX, (B, r, n)
        ct = torch.softmax(dtx if inv_t == 1.0 else dtx * inv_t, dim=1, dtype=x.dtype)
        c0 = ct.clone() if d0 is not None else None
        _nmf_updates_(xs, d, ct, dtx, steps, eps)
    if d0 is None or c0 is None:
        return d, ct.mT
    # the initialisation recorded: softmax over the r bases of inv_t · XᵀD_0, (B, n, r)
    init = torch.softmax(inv_t * _x_transpose_times(x, d0), dim=-1)
    with torch.no_grad():  # R = C / C_0; a softmax that underflowed to 0 has kept C at 0
        ratio = torch.where(c0 > 0, ct / c0, 0.0).mT
    return d, ct.mT + (init - init.detach()) * ratio


def _nmf_solve(p: _Problem) -> tuple[Tensor, Tensor]:
    """The no-grad part of one-step NMF.

    Returns D (B, d, r) and W (B, n, r) such that the final coefficients are C = XᵀD ⊙ W, i.e.
    C ⊙ XᵀD ⊘ (C DᵀD + ε) with the last D and C held constant. W is stored like
    ``_x_transpose_times(x, D)``.
    """
    d, c = _nmf_iterate(p)
    with torch.no_grad():
        ct = c.mT  # (B, r, n), the contiguous iterate
        weight = ct.div_(torch.bmm(torch.bmm(d.mT, d), ct).add_(p.eps)).mT  # C ⊘ (C DᵀD + ε)
        if _tokens_major(p.x):
            weight = weight.contiguous()  # stored (B, n, r), like the product
    return d, weight


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


# ---------------------------------------------------------------------------------------------
# VQ (soft k-means with cosine similarity) and CD (concept decomposition).


def _cluster_updates(
    x: Tensor, d: Tensor, steps: int, inv_t: float, eps: float, unit_bases: bool
) -> Tensor:
    """``steps`` soft k-means updates: C = colnorm(softmax(inv_t·cos(X, D))), D = XC.

    x may have a lower precision than d: the products XᵀD and XC then run in x.dtype, the rest in
    d.dtype. Returns the new bases (B, d, r) in d.dtype.
    """
    low = x.dtype != d.dtype
    # 1 / ‖x_i‖ scaled by inv_t, (B, 1, n); the assignments are kept transposed, Cᵀ (B, r, n)
    scale = inv_t / (torch.linalg.vector_norm(x, dim=1, dtype=d.dtype).unsqueeze(1) + eps)
    for _ in range(steps):
        dn = d / d.norm(dim=1, keepdim=True).clamp_min(eps)  # (B, d, r)
        logits = torch.bmm((dn.to(x.dtype) if low else dn).mT, x) * scale  # inv_t · cos
        ct = torch.softmax(logits, dim=1)  # over the r bases
        ct = ct / (ct.sum(dim=2, keepdim=True) + eps)  # each basis: weighted mean of positions
        d = torch.bmm(x, (ct.to(x.dtype) if low else ct).mT).to(d.dtype)  # (B, d, r)
        if unit_bases:
            d = _normalize_columns(d, eps)
    return d


def _cosine_coef(x: Tensor, d: Tensor, inv_t: float, eps: float) -> Tensor:
    """softmax over r of inv_t · cos(x_i, d_j), shape (B, n, r); differentiable in x and d."""
    dn = d / d.norm(dim=1, keepdim=True).clamp_min(eps)
    scale = inv_t / (x.norm(dim=1).unsqueeze(-1) + eps)  # (B, n, 1)
    return torch.softmax(_x_transpose_times(x, dn) * scale, dim=-1)


def _run_clusters(p: _Problem, unit_bases: bool) -> Tensor:
    """Returns the bases after ``steps`` cluster updates: every update recorded for
    ``grad="unrolled"``, the last one for ``"jfb"`` (from the detached iterate), none for
    ``"one_step"``."""
    x, rank, steps, bases, inv_t, grad, eps, generator, iter_dtype, _, _ = p
    if grad == "unrolled":
        d = _initial_bases(x, rank, bases, False, generator)
        return _cluster_updates(x, d, steps, inv_t, eps, unit_bases)
    recorded = min(p.grad_steps, steps) if grad in ("jfb", "phantom") else 0
    with torch.no_grad():
        xd = x.detach()
        d = _initial_bases(xd, rank, bases, False, generator)
        xs = xd if iter_dtype is None else xd.to(iter_dtype)
        d = _cluster_updates(xs, d, steps - recorded, inv_t, eps, unit_bases)
    return _cluster_updates(x, d, recorded, inv_t, eps, unit_bases)


def vq(
    x: Tensor,
    rank: int | None = None,
    *,
    steps: int = 6,
    bases: Tensor | None = None,
    inv_t: float = 100.0,
    grad: GradMode = "one_step",
    eps: float = 1e-6,
    generator: torch.Generator | None = None,
    iter_dtype: torch.dtype | None = None,
    grad_steps: int = 1,
) -> Decomposition:
    """Vector quantisation by soft k-means with cosine similarity.

    Each step assigns C = softmax(inv_t · cos(X, D)) over the r bases, normalises the columns of
    C over the n positions and sets D = XC (each basis becomes the weighted mean of the positions
    assigned to it). The final C is the softmax assignment, so X ≈ DCᵀ replaces each position by
    its soft cluster centre. As inv_t → ∞ this is Lloyd's k-means with cosine assignment.

    Args:
        x: input, shape (B, d, n).
        rank: number of bases (clusters) r, 1 ≤ r ≤ min(d, n); may be omitted if ``bases`` given.
        steps: number of (C, D) updates before the final C.
        bases: initial bases, (d, r) or (B, d, r); random normal with unit columns when omitted.
        inv_t: inverse temperature of the assignment softmax.
        grad: ``"one_step"`` (differentiate only the final assignment, D held constant),
            ``"jfb"`` (the last (C, D) update and the final assignment, from the detached
            iterate before them), ``"phantom"`` (the last ``grad_steps`` updates) or
            ``"unrolled"`` (alias ``"bptt"``: every step).
        eps: added to norms and column sums.
        generator: random generator for the initial bases (a CPU one also serves CUDA data).
        iter_dtype: dtype of the big matrix products of the no-grad iterations of
            ``grad="one_step"``, ``"jfb"`` or ``"phantom"`` (``None``: x.dtype).
            ``torch.bfloat16`` halves their cost on CPUs with AVX512-BF16 or AMX and on recent
            GPUs; the iterates and the differentiated steps stay in x.dtype.
        grad_steps: recorded (C, D) updates of ``grad="phantom"``, ≥ 1 (``"jfb"``: 1).

    Returns:
        :class:`Decomposition` with bases (B, d, r) and coef (B, n, r) whose rows sum to one.

    Reference: Geng et al., "Is Attention Better Than Matrix Decomposition?", ICLR 2021, §2.2.
    """
    p = _problem("vq", x, rank, steps, bases, inv_t, grad, eps, generator, iter_dtype,
                 grad_steps)  # fmt: skip
    with _keep_dtype(x):
        return _vq(p)


def _vq(p: _Problem) -> Decomposition:
    """VQ without input validation; see :func:`vq`."""
    if _float16_recorded(p):  # the column sums' and softmax's derivatives overflow float16
        return _in_float32(p, _vq)
    d = _run_clusters(p, unit_bases=False)
    return Decomposition(d, _cosine_coef(p.x, d, p.inv_t, p.eps))


def cd(
    x: Tensor,
    rank: int | None = None,
    *,
    steps: int = 6,
    bases: Tensor | None = None,
    inv_t: float = 100.0,
    beta: float = 0.1,
    grad: GradMode = "one_step",
    eps: float = 1e-6,
    generator: torch.Generator | None = None,
    iter_dtype: torch.dtype | None = None,
    grad_steps: int = 1,
) -> Decomposition:
    """Concept decomposition: spherical soft k-means bases, ridge-regression coefficients.

    The steps are those of :func:`vq` with D rescaled to unit-norm columns after each update; the
    final coefficients solve min_C ‖X − DCᵀ‖² + β‖C‖², i.e. C = XᵀD (DᵀD + βI)⁻¹. Meant to be
    used with online (moving-average) bases, see :func:`moving_average_bases`.

    Args:
        x: input, shape (B, d, n).
        rank: number of bases r, 1 ≤ r ≤ min(d, n); may be omitted if ``bases`` is given.
        steps: number of (C, D) updates before the ridge solve.
        bases: initial bases, (d, r) or (B, d, r); random normal with unit columns when omitted.
            With ``steps=0`` they are used as given (not normalised).
        inv_t: inverse temperature of the assignment softmax.
        beta: ridge weight β > 0.
        grad: ``"one_step"`` (differentiate only the ridge solve, D held constant), ``"jfb"``
            (the last (C, D) update and the ridge solve, from the detached iterate before them),
            ``"phantom"`` (the last ``grad_steps`` updates) or ``"unrolled"`` (alias ``"bptt"``:
            every step).
        eps: added to norms and column sums.
        generator: random generator for the initial bases (a CPU one also serves CUDA data).
        iter_dtype: dtype of the big matrix products of the no-grad iterations of
            ``grad="one_step"``, ``"jfb"`` or ``"phantom"`` (``None``: x.dtype).
            ``torch.bfloat16`` halves their cost on CPUs with AVX512-BF16 or AMX and on recent
            GPUs; the iterates and the differentiated steps stay in x.dtype.
        grad_steps: recorded (C, D) updates of ``grad="phantom"``, ≥ 1 (``"jfb"``: 1).

    Returns:
        :class:`Decomposition` with bases (B, d, r) and coef (B, n, r).

    Reference: Geng et al., "Is Attention Better Than Matrix Decomposition?", ICLR 2021, §2.2;
    Dhillon & Modha, "Concept decompositions for large sparse text data", 2001.
    """
    p = _problem("cd", x, rank, steps, bases, inv_t, grad, eps, generator, iter_dtype,
                 grad_steps)  # fmt: skip
    beta = check_float("beta", beta, low=0.0)
    with _keep_dtype(x):
        return _cd(p, beta)


def _cd(p: _Problem, beta: float) -> Decomposition:
    """CD without input validation; see :func:`cd`."""
    if _float16_recorded(p):  # the column sums' and softmax's derivatives overflow float16
        return _in_float32(p, lambda q: _cd(q, beta))
    if p.grad != "one_step":
        d = _run_clusters(p, unit_bases=True)
        return Decomposition(d, _x_transpose_times(p.x, _ridge_projector(d, beta)))
    d, proj = _cd_solve(p, beta)
    return Decomposition(d, _x_transpose_times(p.x, proj))


def _cd_solve(p: _Problem, beta: float) -> tuple[Tensor, Tensor]:
    """The no-grad part of one-step CD: D (B, d, r) and P = D (DᵀD + βI)⁻¹, so that C = XᵀP."""
    d = _run_clusters(p._replace(grad="one_step"), unit_bases=True)
    with torch.no_grad():
        return d, _ridge_projector(d, beta)


def _ridge_projector(d: Tensor, beta: float) -> Tensor:
    """P = D (DᵀD + βI)⁻¹, shape (B, d, r): the ridge coefficients are C = XᵀP (a small solve)."""
    rank = d.shape[-1]
    # linalg.solve has no half-precision kernels (and r x r Gram matrices lose too much in them):
    # solve in float32 and cast back
    work = d.float() if d.dtype.itemsize < 4 else d
    gram = torch.bmm(work.mT, work) + beta * torch.eye(rank, dtype=work.dtype, device=d.device)
    return torch.linalg.solve(gram, work.mT).mT.to(d.dtype)  # gram is symmetric


DECOMPOSITIONS: dict[str, Callable[..., Decomposition]] = {"nmf": nmf, "vq": vq, "cd": cd}
"""The decompositions by name, as accepted by ``Hamburger(ham=...)``."""
