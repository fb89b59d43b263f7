"""VQ (soft k-means with cosine similarity) and CD (concept decomposition): the cluster
decompositions of the Hamburger. See :mod:`._decompositions` for the gradient modes.

Reference: Geng et al., "Is Attention Better Than Matrix Decomposition?", ICLR 2021, §2.2;
Dhillon & Modha, "Concept decompositions for large sparse text data", 2001.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validate import check_float
from ._common import (
    Decomposition,
    GradMode,
    _float16_recorded,
    _in_float32,
    _initial_bases,
    _keep_dtype,
    _normalize_columns,
    _Problem,
    _problem,
    _x_transpose_times,
)

__all__ = ["cd", "vq"]


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
