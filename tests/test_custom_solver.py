"""A solver written outside the library: the public ``Solver``/``Step`` interface and the registry.

The test solver is the example of ``Solver``'s docstring: Picard with a per-sample damping that
halves whenever a step increases that sample's residual (a state of batched tensors, so that
compaction's ``select`` is exercised too). Registered by name, it must work wherever a solver is
taken: ``eq.solve``, ``eq.fixed_point``, ``eq.DEQ`` and the adjoint solve of ``eq.Implicit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from _problems import F64, AffineParams, Tanh, assert_grads_close, loss

import equilibria as eq
from equilibria._solvers import SOLVERS, Solver, Step, _base, register_solver


@dataclass(frozen=True)
class Halving(Solver):
    """Picard whose per-sample damping halves when a step increases that sample's residual."""

    damping: float = 1.0
    name: ClassVar[str] = "halving"

    def init(self, x, fx, g):
        return torch.full((x.shape[0], 1), self.damping, dtype=x.dtype, device=x.device)

    def step(self, fn, x, fx, g, tau):
        x_new = x + tau * g
        fx_new = fn(x_new)
        g_new = fx_new - x_new
        worse = g_new.norm(dim=1, keepdim=True) > g.norm(dim=1, keepdim=True)
        return Step(x_new, fx_new, g_new, torch.where(worse, tau / 2, tau), 1)


@pytest.fixture
def registry(monkeypatch):
    """The solver registry, restored after the test (registrations do not leak into others)."""
    monkeypatch.setattr(SOLVERS, "_classes", dict(SOLVERS._classes))
    return SOLVERS


def test_step_is_the_public_type():
    assert Step is _base.Step
    assert Step._fields == ("x", "fx", "g", "state", "nfev", "gsq")


def test_registered_solver_resolves_by_name_in_solve(registry):
    assert register_solver(Halving) is Halving
    assert "halving" in registry and registry["halving"] is Halving
    p = Tanh.make(batch=4, d=6, norm=0.9, seed=2)
    by_name = eq.solve(p.f, p.z0(), solver="halving", tol=1e-10, max_iter=500)
    by_object = eq.solve(p.f, p.z0(), solver=Halving(), tol=1e-10, max_iter=500)
    assert by_name.status is eq.Status.CONVERGED
    assert by_name.solver == "halving"
    assert by_name.nstep == by_object.nstep
    assert torch.equal(by_name.value, by_object.value)
    torch.testing.assert_close(by_name.value, p.solution(), rtol=0, atol=1e-9)


def test_custom_solver_state_follows_compaction(registry):
    # the default select keeps the rows of a batched tensor state: the compacting solve must
    # give every sample the iterates of the full one
    register_solver(Halving)
    p = Tanh.make(batch=5, d=6, norm=0.9, seed=4, scale_x=3.0)

    def f(z, index=None):
        x = p.x if index is None else p.x[index]
        return torch.tanh(z @ p.W.T + x)

    full = eq.solve(f, p.z0(), solver="halving", tol=1e-9, max_iter=500)
    compact = eq.solve(f, p.z0(), solver="halving", tol=1e-9, max_iter=500, compact=True)
    assert compact.status is full.status is eq.Status.CONVERGED
    assert compact.evaluations < full.evaluations
    # each sample keeps its first iterate below tol: the one the full solve had at that step
    first = (full.residuals < 1e-9).double().argmax(0)  # (B,) first iteration below tol
    want = full.residuals[first, torch.arange(5)]
    torch.testing.assert_close(compact.residual, want, rtol=1e-5, atol=0)
    assert len(set(first.tolist())) > 1  # the samples did stop at different iterations


def test_custom_solver_by_name_in_fixed_point_and_as_the_adjoint_solver(registry):
    register_solver(Halving)
    p = AffineParams.make(batch=3, d=5, radius=0.8, seed=1)
    want = p.grads(loss(p.dense()))
    backward = eq.Implicit(solver="halving", tol=1e-12, max_iter=500)
    z, sol = eq.fixed_point(p.f, p.z0(), solver="halving", backward=backward, tol=1e-12,
                            max_iter=500)  # fmt: skip
    assert sol.solver == "halving"
    assert sol.status is eq.Status.CONVERGED
    got = p.grads(loss(z))
    assert sol.backward.solution is not None and sol.backward.solution.solver == "halving"
    assert bool(sol.backward.converged.all())
    assert_grads_close(got, want, rtol=1e-9)


class _Cell(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4, dtype=F64)
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


def test_custom_solver_by_name_in_a_deq(registry):
    register_solver(Halving)
    cell = _Cell()
    deq = eq.DEQ(cell, solver="halving", tol=1e-10, max_iter=300)
    assert deq.solver == Halving()
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    z = deq(x, torch.zeros(3, 4, dtype=F64))
    torch.testing.assert_close(cell(z, x), z, rtol=0, atol=1e-8)
    z.sum().backward()  # the default implicit backward runs too
    assert cell.lin.weight.grad is not None


# --- registration errors ----------------------------------------------------------------------


@dataclass(frozen=True)
class _NoStep(Solver):
    name: ClassVar[str] = "nostep"

    def init(self, x, fx, g):
        return None


@dataclass(frozen=True)
class _NeedsArgs(Halving):
    rate: float = None  # type: ignore[assignment]
    name: ClassVar[str] = "needs-args"

    def __post_init__(self):
        if self.rate is None:
            raise TypeError("rate is required")


class _Unnamed(Halving):
    name: ClassVar[str] = ""


class _OtherPicard(Halving):
    name: ClassVar[str] = "picard"


BAD_REGISTRATIONS = [
    pytest.param(object, TypeError, "a solver must be a subclass of Solver", id="not-a-solver"),
    pytest.param(Halving(), TypeError, "a solver must be a subclass of Solver", id="instance"),
    pytest.param(_NoStep, TypeError, "solver class _NoStep does not implement step", id="no-step"),
    pytest.param(
        _NeedsArgs,
        TypeError,
        "solver class _NeedsArgs must be constructible without arguments to be used by name",
        id="needs-args",
    ),
    pytest.param(_Unnamed, TypeError, "needs a non-empty string class attribute 'name'", id="name"),
    pytest.param(
        _OtherPicard, ValueError, "the solver name 'picard' is taken by Picard", id="taken"
    ),
]


@pytest.mark.parametrize(("cls", "exc", "fragment"), BAD_REGISTRATIONS)
def test_bad_registrations(registry, cls, exc, fragment):
    before = dict(registry)
    with pytest.raises(exc) as info:
        register_solver(cls)
    assert fragment in str(info.value)
    assert dict(registry) == before  # nothing registered


def test_replace_and_reregistration(registry):
    register_solver(Halving)
    register_solver(Halving)  # the same class again: a no-op
    assert registry["halving"] is Halving
    register_solver(_OtherPicard, replace=True)
    assert registry["picard"] is _OtherPicard
    sol = eq.solve(lambda z: 0.5 * z + 1.0, torch.zeros(2, 3, dtype=F64), solver="picard")
    assert sol.solver == "picard" and sol.status is eq.Status.CONVERGED


def test_unknown_name_lists_the_registered_ones(registry):
    register_solver(Halving)
    with pytest.raises(ValueError, match="valid names are 'picard', 'anderson', 'broyden', "):
        eq.solve(lambda z: 0.5 * z, torch.zeros(2, 3), solver="halvng")
    with pytest.raises(ValueError, match="'halving'"):
        eq.solve(lambda z: 0.5 * z, torch.zeros(2, 3), solver="halvng")
