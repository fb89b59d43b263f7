"""Problem generators with known answers, shared by the test tables.

Every problem is float64 unless asked otherwise and built from an explicit ``torch.Generator`` so
that a table row does not depend on the order in which tests run.

* :class:`Affine`: f(z) = z A^T + b per sample, with a prescribed spectral radius of A; the exact
  fixed point is ``torch.linalg.solve(I - A, b)``.
* :class:`BatchAffine`: the same with one matrix per sample (easy and hard samples in one batch).
* :class:`Tanh`: f(z) = tanh(z W^T + x) with ||W||_2 < 1 (a contraction in the 2-norm); the
  reference is a long hand-written Picard loop, independent of the library.
* :class:`TreeAffine`: an affine map on a tuple or dict state made of two coupled tensors of
  different shapes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import equilibria as eq
from equilibria._backward import BACKWARDS
from equilibria._solvers import SOLVERS

F64 = torch.float64
# where the suite runs (tests/conftest.py): EQUILIBRIA_TEST_DEVICE=cuda runs it on a GPU
DEVICE = torch.device(os.environ.get("EQUILIBRIA_TEST_DEVICE") or "cpu")

# Every registered solver with its default settings, plus variants that take other code paths.
SOLVER_NAMES = tuple(SOLVERS)
SOLVER_CONFIGS: dict[str, eq.Solver] = {name: cls() for name, cls in SOLVERS.items()}
SOLVER_CONFIGS.update(
    {
        "picard-damped": eq.Picard(damping=0.6),
        "anderson-m1": eq.Anderson(m=1),
        "anderson-beta": eq.Anderson(m=4, beta=0.7, lam=0.0),
        "broyden-ls": eq.Broyden(memory=6, line_search=True),
        "broyden-m3": eq.Broyden(memory=3),
    }
)
BACKWARD_NAMES = tuple(BACKWARDS)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthogonal(d: int, g: torch.Generator, dtype: torch.dtype = F64) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))
    return q * torch.sign(torch.diagonal(r))


def eigenvalues(d: int, radius: float, g: torch.Generator, dtype: torch.dtype = F64) -> Tensor:
    """d real eigenvalues in [-radius, radius], one of them exactly ``radius`` in modulus."""
    eigs = (2 * torch.rand(d, generator=g, dtype=dtype) - 1) * radius
    eigs[0] = radius if d == 1 or bool(torch.rand(1, generator=g) < 0.5) else -radius
    return eigs


def matrix(
    d: int, radius: float, g: torch.Generator, *, symmetric: bool = True, dtype: torch.dtype = F64
) -> Tensor:
    """A (d, d) matrix with spectral radius ``radius``.

    Symmetric: Q diag(eigs) Q^T, so ||A||_2 = radius. Otherwise Q diag(eigs) Q^{-1} with a well
    conditioned (not orthogonal) Q: ||A||_2 may exceed the radius (transient growth).
    """
    eigs = eigenvalues(d, radius, g, dtype)
    if symmetric:
        q = orthogonal(d, g, dtype)
        return (q * eigs) @ q.T
    q = torch.eye(d, dtype=dtype) + 0.3 * torch.randn(d, d, generator=g, dtype=dtype) / d**0.5
    return torch.linalg.solve(q.T, (q * eigs).T).T  # Q diag(eigs) Q^{-1}


def spectral_radius(a: Tensor) -> float:
    return float(torch.linalg.eigvals(a).abs().max())


@dataclass
class Affine:
    """f(z) = z A^T + b for a batch z (B, D)."""

    A: Tensor  # (D, D)
    b: Tensor  # (B, D)

    @staticmethod
    def make(
        batch: int = 4,
        d: int = 6,
        radius: float = 0.9,
        *,
        seed: int = 0,
        symmetric: bool = True,
        dtype: torch.dtype = F64,
    ) -> Affine:
        g = gen(seed)
        a = matrix(d, radius, g, symmetric=symmetric, dtype=dtype)
        b = torch.randn(batch, d, generator=g, dtype=dtype) + 1.0
        return Affine(a, b)

    def f(self, z: Tensor) -> Tensor:
        return z @ self.A.T + self.b

    def z0(self) -> Tensor:
        return torch.zeros_like(self.b)

    def solution(self) -> Tensor:
        eye = torch.eye(self.A.shape[0], dtype=self.A.dtype)
        return torch.linalg.solve(eye - self.A, self.b.T).T

    def inverse_norm(self) -> float:
        """||(I - A)^{-1}||_2: turns a residual bound into an error bound."""
        eye = torch.eye(self.A.shape[0], dtype=self.A.dtype)
        return float(torch.linalg.matrix_norm(torch.linalg.inv(eye - self.A), ord=2))


@dataclass
class BatchAffine:
    """f(z)_b = A_b z_b + c_b with one matrix per sample."""

    A: Tensor  # (B, D, D)
    c: Tensor  # (B, D)

    @staticmethod
    def make(radii: list[float], d: int = 5, *, seed: int = 0) -> BatchAffine:
        g = gen(seed)
        a = torch.stack([matrix(d, r, g) for r in radii])
        c = torch.randn(len(radii), d, generator=g, dtype=F64) + 1.0
        return BatchAffine(a, c)

    def f(self, z: Tensor) -> Tensor:
        return torch.einsum("bij,bj->bi", self.A, z) + self.c

    def z0(self) -> Tensor:
        return torch.zeros_like(self.c)

    def solution(self) -> Tensor:
        eye = torch.eye(self.A.shape[1], dtype=self.A.dtype)
        return torch.linalg.solve(eye - self.A, self.c)


@dataclass
class Tanh:
    """f(z) = tanh(z W^T + x) with ||W||_2 = ``norm`` < 1: a contraction with Lipschitz constant
    at most ``norm``."""

    W: Tensor  # (D, D)
    x: Tensor  # (B, D)
    norm: float

    @staticmethod
    def make(
        batch: int = 4,
        d: int = 6,
        norm: float = 0.8,
        *,
        seed: int = 0,
        dtype: torch.dtype = F64,
        scale_x: float = 1.0,
    ) -> Tanh:
        g = gen(seed)
        w = torch.randn(d, d, generator=g, dtype=dtype)
        w = norm * w / torch.linalg.matrix_norm(w, ord=2)
        x = scale_x * torch.randn(batch, d, generator=g, dtype=dtype)
        return Tanh(w, x, norm)

    def f(self, z: Tensor) -> Tensor:
        return torch.tanh(z @ self.W.T + self.x)

    def z0(self) -> Tensor:
        return torch.zeros_like(self.x)

    def solution(self, iters: int | None = None) -> Tensor:
        """Hand-written Picard loop, run until the contraction bound is below 1e-15."""
        if iters is None:
            iters = int(40 / -torch.log10(torch.tensor(self.norm)).item()) + 20
        z = self.z0()
        with torch.no_grad():
            for _ in range(iters):
                z = self.f(z)
        return z


@dataclass
class TreeAffine:
    """An affine map on a state of two coupled tensors: ``a`` (B, 3) and ``c`` (B, 2, 2).

    The blocks are coupled by one dense (7, 7) matrix with the given spectral radius.
    """

    inner: Affine
    kind: str  # "tuple" or "dict"

    @staticmethod
    def make(kind: str, batch: int = 3, radius: float = 0.9, *, seed: int = 0) -> TreeAffine:
        return TreeAffine(Affine.make(batch, 7, radius, seed=seed, symmetric=False), kind)

    def split(self, flat: Tensor) -> Any:
        a, c = flat[:, :3], flat[:, 3:].reshape(-1, 2, 2)
        return (a, c) if self.kind == "tuple" else {"a": a, "c": c}

    def join(self, z: Any) -> Tensor:
        a, c = z if self.kind == "tuple" else (z["a"], z["c"])
        return torch.cat([a, c.reshape(c.shape[0], -1)], dim=1)

    def f(self, z: Any) -> Any:
        return self.split(self.inner.f(self.join(z)))

    def z0(self) -> Any:
        return self.split(self.inner.z0())

    def solution(self) -> Any:
        return self.split(self.inner.solution())


def rel_residual(f: Any, z: Tensor) -> Tensor:
    """(B,) ||f(z) - z|| / ||f(z)||, recomputed outside the library."""
    fz = f(z)
    num = torch.linalg.vector_norm((fz - z).reshape(z.shape[0], -1), dim=1)
    den = torch.linalg.vector_norm(fz.reshape(z.shape[0], -1), dim=1)
    return num / (den + torch.finfo(z.dtype).tiny)


def abs_residual(f: Any, z: Tensor) -> Tensor:
    """(B,) ||f(z) - z||, recomputed outside the library."""
    return torch.linalg.vector_norm((f(z) - z).reshape(z.shape[0], -1), dim=1)


def residual(f: Any, z: Tensor, stop: str) -> Tensor:
    return rel_residual(f, z) if stop == "rel" else abs_residual(f, z)


def rel_err(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def assert_grads_close(got: Any, want: Any, rtol: float) -> None:
    """Every gradient in ``got`` exists and is within ``rtol`` (relative 2-norm) of ``want``."""
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a is not None, f"no gradient for leaf {i}"
        assert rel_err(a, b) < rtol, (i, rel_err(a, b))


def assert_error_bound(value: Tensor, reference: Tensor, bound: Tensor, atol: float) -> None:
    """Per sample ||value - reference|| <= bound (up to a relative 1e-6 and ``atol``): the a
    posteriori error bound of a solve, e.g. ||(I - A)^-1|| ||f(z) - z|| for an affine map or
    ||f(z) - z|| / (1 - L) for a contraction with Lipschitz constant L."""
    err = torch.linalg.vector_norm((value - reference).reshape(value.shape[0], -1), dim=1)
    assert err.shape == bound.shape, (err.shape, bound.shape)
    assert bool((err <= bound * (1 + 1e-6) + atol).all()), (err, bound)


def budget(solver: eq.Solver, radius: float) -> int:
    """An iteration budget that is plenty for every solver at a relative tol of 1e-10."""
    if isinstance(solver, eq.Picard) or (isinstance(solver, eq.Anderson) and solver.m == 1):
        return int(30 / -torch.log10(torch.tensor(radius)).item() / solver_damping(solver)) + 200
    return 300


def solver_damping(solver: eq.Solver) -> float:
    if isinstance(solver, eq.Picard):
        return solver.damping
    if isinstance(solver, eq.Anderson):
        return solver.beta
    return 1.0


@dataclass
class AffineParams:
    """f(z) = z W^T + x U^T + c with parameters W (D, D), U (D, Dx), c (D,) and input x (B, Dx),
    all leaves that require gradients. The equilibrium is z* = (I - W)^{-1} (U x + c) per sample,
    differentiable in closed form through ``torch.linalg.solve``."""

    W: Tensor
    U: Tensor
    c: Tensor
    x: Tensor

    @staticmethod
    def make(
        batch: int = 4,
        d: int = 5,
        dx: int = 3,
        radius: float = 0.9,
        *,
        seed: int = 0,
        symmetric: bool = False,
    ) -> AffineParams:
        g = gen(seed)
        w = matrix(d, radius, g, symmetric=symmetric)
        u = torch.randn(d, dx, generator=g, dtype=F64)
        c = torch.randn(d, generator=g, dtype=F64)
        x = torch.randn(batch, dx, generator=g, dtype=F64)
        return AffineParams(*(t.requires_grad_() for t in (w, u, c, x)))

    @property
    def leaves(self) -> tuple[Tensor, ...]:
        return (self.W, self.U, self.c, self.x)

    def f(self, z: Tensor) -> Tensor:
        return z @ self.W.T + self.x @ self.U.T + self.c

    def z0(self) -> Tensor:
        return torch.zeros(self.x.shape[0], self.W.shape[0], dtype=F64)

    def dense(self) -> Tensor:
        """The exact equilibrium, differentiable in every leaf."""
        eye = torch.eye(self.W.shape[0], dtype=F64)
        return torch.linalg.solve(eye - self.W, (self.x @ self.U.T + self.c).T).T

    def grads(self, out: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(out, self.leaves)


def loss(z: Tensor) -> Tensor:
    """A fixed nonlinear scalar loss: its upstream gradient depends on z."""
    g = gen(123)
    target = torch.randn(z.shape, generator=g, dtype=z.dtype).to(z.device)
    weight = torch.randn(z.shape, generator=g, dtype=z.dtype).to(z.device)
    return 0.5 * ((z - target) ** 2).sum() + (weight * z).sum()


def has_node(fn: Any, cls: type, depth: int = 4) -> bool:
    """Whether the autograd graph below ``fn`` has a node of type ``cls`` within ``depth`` edges
    (the public state is a view of the Function's output)."""
    if fn is None or depth < 0:
        return False
    if isinstance(fn, cls):
        return True
    return any(has_node(nxt, cls, depth - 1) for nxt, _ in fn.next_functions)
