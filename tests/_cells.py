"""Shared test cells and independent float64 gradient references.

The references never call the library: z* comes from a long hand-written Picard loop, the Jacobian
of the whole batch map at z* from ``torch.autograd.functional.jacobian`` (block diagonal for a
per-sample map), and the gradients from dense linear algebra or autograd through explicit loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from _problems import F64, gen
from torch import Tensor, nn


class TanhCell(nn.Module):
    """f(z, x) = tanh(W z + inj(x)) with ||W||_2 = ``norm``: a contraction in z for norm < 1.

    W is ``norm`` times a seeded Gaussian matrix over its spectral norm; ``inj`` is an
    ``nn.Linear(dx, d)`` whose weight and bias are drawn (in that order) from the same generator.
    """

    def __init__(self, d=5, dx=3, dtype=F64, seed=0, norm=0.7):
        super().__init__()
        g = gen(seed)
        w = torch.randn(d, d, generator=g, dtype=dtype)
        self.W = nn.Parameter(norm * w / torch.linalg.matrix_norm(w, ord=2))
        self.inj = nn.Linear(dx, d, dtype=dtype)
        with torch.no_grad():
            self.inj.weight.copy_(torch.randn(d, dx, generator=g, dtype=dtype))
            self.inj.bias.copy_(torch.randn(d, generator=g, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + self.inj(x))


def picard(f: Callable[[Tensor], Tensor], z0: Tensor, iters: int = 300) -> Tensor:
    """z* by ``iters`` plain fixed-point steps, without autograd."""
    with torch.no_grad():
        z = z0
        for _ in range(iters):
            z = f(z)
    return z


def batch_jacobian(f: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """The dense (N, N) Jacobian of the whole map at z, N = z.numel() (row-major flattening)."""
    n = z.numel()
    jac = torch.autograd.functional.jacobian(lambda v: f(v.reshape(z.shape)).reshape(-1), z)
    return jac.reshape(n, n)


def dense_implicit(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    params: Sequence[Tensor],
    loss_fn: Callable[[Tensor], Tensor],
    iters: int = 300,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Dense z* of ``f`` and the implicit-function-theorem gradients of ``loss_fn(z*)``.

    u = (I - J^T)^{-1} dL/dz by ``torch.linalg.solve`` with the dense Jacobian J at z*, then
    (df/dparams)^T u by one autograd call.
    """
    z = picard(f, z0, iters)
    zz = z.clone().requires_grad_()
    gbar = torch.autograd.grad(loss_fn(zz), zz)[0].reshape(-1)
    jac = batch_jacobian(f, z)
    eye = torch.eye(jac.shape[0], dtype=jac.dtype)
    u = torch.linalg.solve(eye - jac.T, gbar).reshape(z.shape)
    return z, torch.autograd.grad(f(z), params, u)


def phantom_reference(f, z_star, params, loss_fn, steps, damping):
    """Autograd through ``steps`` explicit damped steps h <- (1 - a) h + a f(h) from z*."""
    h = z_star.detach()
    for _ in range(steps):
        h = (1 - damping) * h + damping * f(h)
    return torch.autograd.grad(loss_fn(h), params)


def neumann_reference(f, z_star, params, loss_fn, steps, damping):
    """w <- g + (1 - a) w + a J^T w for ``steps - 1`` steps (dense J), then a (df/dparams)^T w."""
    z = z_star.detach()
    zz = z.clone().requires_grad_()
    g = torch.autograd.grad(loss_fn(zz), zz)[0].reshape(-1)
    jac = batch_jacobian(f, z)
    w = g
    for _ in range(steps - 1):
        w = g + (1 - damping) * w + damping * (jac.T @ w)
    return torch.autograd.grad(f(z), params, damping * w.reshape(z.shape))


def backward_reference(f, z0, params, loss_fn, backward, iters=300):
    """The gradient each backward method computes, from a dense z*: exact (implicit, and unrolled
    through a converged solve) or the phantom/Neumann/JFB formula on explicit loops."""
    import equilibria as eq

    z_star = picard(f, z0, iters)
    name = backward if isinstance(backward, str) else backward.name
    if name in ("implicit", "unrolled"):
        return dense_implicit(f, z0, params, loss_fn, iters)[1]
    if name == "jfb":
        return phantom_reference(f, z_star, params, loss_fn, 1, 1.0)
    obj = (
        backward
        if not isinstance(backward, str)
        else {"phantom": eq.Phantom, "neumann": eq.Neumann}[name]()
    )
    fn = phantom_reference if name == "phantom" else neumann_reference
    return fn(f, z_star, params, loss_fn, obj.steps, obj.damping)
