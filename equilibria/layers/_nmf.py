"""NMF, the Hamburger's default "ham": multiplicative updates (Lee & Seung) on X ≈ D Cᵀ with
X, D, C ≥ 0, and the no-grad solve of its one-step gradient. See :mod:`._decompositions` for the
gradient modes and ``grad_init``.

Reference: Geng et al., "Is Attention Better Than Matrix Decomposition?", ICLR 2021, §2.2; D. D.
Lee and H. S. Seung, "Algorithms for Non-negative Matrix Factorization", NeurIPS 2001.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (
    Decomposition,
    GradMode,
    _float16_recorded,
    _in_float32,
    _initial_bases,
    _keep_dtype,
    _no_graph,
    _Problem,
    _problem,
    _tokens_major,
    _x_transpose_times,
)

__all__ = ["nmf"]


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
