"""Property tests (hypothesis) on random contractive maps.

For random sizes, batch sizes, spectral radii and seeds, every registered solver must return a
state that satisfies the fixed-point equation to ``tol`` (with the reported residual being the
residual of the returned state), match ``torch.linalg.solve`` on affine maps within the exact
error bound, and the implicit gradients must match the dense analytic ones.
"""

from __future__ import annotations

import pytest
import torch
from _problems import (
    SOLVER_NAMES,
    Affine,
    AffineParams,
    Tanh,
    abs_residual,
    assert_error_bound,
    loss,
    rel_err,
    residual,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import equilibria as eq

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

seeds = st.integers(0, 2**31 - 1)
batches = st.integers(1, 5)
dims = st.integers(1, 8)
radii = st.floats(0.0, 0.9)
stops = st.sampled_from(["abs", "rel"])


def _check_result(sol, f, tol, stop):
    """The contract of every solve: status agrees with the flags, residuals are honest."""
    assert (sol.status is eq.Status.CONVERGED) == bool(sol.converged.all())
    torch.testing.assert_close(sol.converged, sol.residual < tol, rtol=0, atol=0)
    recomputed = residual(f, sol.value, stop)
    torch.testing.assert_close(sol.residual, recomputed, rtol=1e-6, atol=1e-300)
    assert sol.residuals.shape == (sol.nstep, sol.value.shape[0])
    torch.testing.assert_close(sol.trace, sol.residuals.max(1).values.double(), rtol=0, atol=0)
    torch.testing.assert_close(sol.residual, sol.residuals.min(0).values, rtol=0, atol=0)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@SETTINGS
@given(seed=seeds, batch=batches, d=dims, radius=radii, symmetric=st.booleans(), stop=stops)
def test_affine_solution_matches_linalg_solve(name, seed, batch, d, radius, symmetric, stop):
    p = Affine.make(batch, d, radius, seed=seed, symmetric=symmetric)
    tol = 1e-9
    sol = eq.solve(p.f, p.z0(), solver=name, tol=tol, max_iter=400, stop=stop)
    _check_result(sol, p.f, tol, stop)
    assert sol.status is eq.Status.CONVERGED
    bound = p.inverse_norm() * abs_residual(p.f, sol.value)
    assert_error_bound(sol.value, p.solution(), bound, atol=1e-13)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@SETTINGS
@given(
    seed=seeds,
    batch=batches,
    d=dims,
    norm=st.floats(0.05, 0.9),
    scale_x=st.floats(0.1, 3.0),
    stop=stops,
)
def test_tanh_solution_is_a_fixed_point(name, seed, batch, d, norm, scale_x, stop):
    p = Tanh.make(batch, d, norm, seed=seed, scale_x=scale_x)
    tol = 1e-9
    sol = eq.solve(p.f, p.z0(), solver=name, tol=tol, max_iter=400, stop=stop)
    _check_result(sol, p.f, tol, stop)
    assert sol.status is eq.Status.CONVERGED
    bound = abs_residual(p.f, sol.value) / (1 - norm)
    assert_error_bound(sol.value, p.solution(), bound, atol=1e-13)


@pytest.mark.parametrize("name", SOLVER_NAMES)
@SETTINGS
@given(seed=seeds, batch=batches, d=dims, max_iter=st.integers(1, 6), stop=stops)
def test_tight_budget_is_honest(name, seed, batch, d, max_iter, stop):
    # a hard problem under a tiny budget: whatever happens, the result must say so
    p = Affine.make(batch, d, 0.97, seed=seed, symmetric=False)
    tol = 1e-10
    sol = eq.solve(p.f, p.z0(), solver=name, tol=tol, max_iter=max_iter, stop=stop)
    _check_result(sol, p.f, tol, stop)
    assert sol.nstep <= max_iter


@SETTINGS
@given(
    seed=seeds,
    batch=batches,
    d=dims,
    dx=st.integers(1, 4),
    radius=radii,
    solver=st.sampled_from(SOLVER_NAMES),
    adjoint=st.sampled_from(SOLVER_NAMES),
)
def test_implicit_gradients_match_analytic(seed, batch, d, dx, radius, solver, adjoint):
    p = AffineParams.make(batch, d, dx, radius, seed=seed)
    z, sol = eq.fixed_point(
        p.f,
        p.z0(),
        solver=solver,
        backward=eq.Implicit(solver=adjoint, tol=1e-12, max_iter=400),
        tol=1e-12,
        max_iter=400,
    )
    assert sol.status is eq.Status.CONVERGED
    got = p.grads(loss(z))
    assert sol.backward.solution.solver == adjoint
    want = p.grads(loss(p.dense()))
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6 or float((a - b).abs().max()) < 1e-10
