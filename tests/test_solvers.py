"""Forward solvers: registry-driven tables over problems with known answers.

Every registered solver (``equilibria._solvers.SOLVERS``) is run on affine maps with a prescribed
spectral radius (exact answer from ``torch.linalg.solve``), contractive tanh maps (answer from a
long hand-written Picard loop) and tuple / dict states; then the driver loop's contract: per-sample
stopping, best iterate per sample, traces, scale invariance, and the solver-specific guarantees
(Anderson with a singular Gram matrix, Broyden's bounded memory).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from _problems import (
    F64,
    SOLVER_CONFIGS,
    SOLVER_NAMES,
    Affine,
    BatchAffine,
    Tanh,
    TreeAffine,
    abs_residual,
    assert_error_bound,
    budget,
    gen,
    orthogonal,
    rel_err,
    residual,
    solver_damping,
)

import equilibria as eq
from equilibria._solvers import SOLVERS
from equilibria._solvers import anderson as _anderson
from equilibria._solvers.broyden import Broyden, BroydenState

CONFIGS = list(SOLVER_CONFIGS.items())
CONFIG_IDS = [name for name, _ in CONFIGS]


# --- the registry ---------------------------------------------------------------------------


def test_registry_matches_public_names():
    assert set(SOLVERS) == set(eq.SOLVERS)
    for name, cls in SOLVERS.items():
        assert issubclass(cls, eq.Solver)
        assert cls.name == name
        assert cls().name == name


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_name_and_object_give_the_same_solve(name):
    p = Tanh.make(seed=1)
    by_name = eq.solve(p.f, p.z0(), solver=name, tol=1e-8, max_iter=100)
    by_object = eq.solve(p.f, p.z0(), solver=SOLVERS[name](), tol=1e-8, max_iter=100)
    assert by_name.solver == by_object.solver == name
    assert by_name.nstep == by_object.nstep
    torch.testing.assert_close(by_name.value, by_object.value, rtol=0, atol=0)


# --- problems with known answers ------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "nonsym"])
@pytest.mark.parametrize("radius", [0.5, 0.9, 0.95])
@pytest.mark.parametrize(("name", "solver"), CONFIGS, ids=CONFIG_IDS)
def test_affine_matches_linalg_solve(name, solver, radius, symmetric):
    p = Affine.make(batch=4, d=8, radius=radius, seed=1, symmetric=symmetric)
    tol = 1e-10
    sol = eq.solve(p.f, p.z0(), solver=solver, tol=tol, max_iter=budget(solver, radius))
    assert sol.status is eq.Status.CONVERGED
    assert bool(sol.converged.all())
    assert sol.value.dtype == F64 and sol.value.shape == p.b.shape
    # the reported residual is the residual of the returned value, in the rel norm
    torch.testing.assert_close(sol.residual, residual(p.f, sol.value, "rel"), rtol=1e-6, atol=0)
    assert float(sol.residual.max()) < tol
    # exact error bound: ||z - z*|| <= ||(I - A)^-1|| ||f(z) - z|| per sample
    bound = p.inverse_norm() * abs_residual(p.f, sol.value)
    assert_error_bound(sol.value, p.solution(), bound, atol=1e-14)
    assert rel_err(sol.value, p.solution()) < 100 * tol / (1 - radius)


@pytest.mark.parametrize("norm", [0.5, 0.9])
@pytest.mark.parametrize(("name", "solver"), CONFIGS, ids=CONFIG_IDS)
def test_tanh_matches_long_picard(name, solver, norm):
    p = Tanh.make(batch=5, d=7, norm=norm, seed=2)
    ref = p.solution()
    tol = 1e-11
    sol = eq.solve(p.f, p.z0(), solver=solver, tol=tol, max_iter=budget(solver, norm), stop="abs")
    assert sol.status is eq.Status.CONVERGED
    torch.testing.assert_close(sol.residual, abs_residual(p.f, sol.value), rtol=1e-6, atol=1e-15)
    assert float(sol.residual.max()) < tol
    # contraction bound: ||z - z*|| <= ||f(z) - z|| / (1 - L)
    assert_error_bound(sol.value, ref, sol.residual / (1 - norm), atol=1e-14)


@pytest.mark.parametrize("kind", ["tuple", "dict"])
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_tree_states(name, kind):
    p = TreeAffine.make(kind, batch=3, radius=0.9, seed=3)
    solver = SOLVER_CONFIGS[name]
    sol = eq.solve(p.f, p.z0(), solver=solver, tol=1e-10, max_iter=budget(solver, 0.9))
    assert sol.status is eq.Status.CONVERGED
    ref = p.solution()
    if kind == "tuple":
        assert isinstance(sol.value, tuple) and len(sol.value) == 2
        pairs = zip(sol.value, ref)
    else:
        assert isinstance(sol.value, dict) and list(sol.value) == ["a", "c"]
        pairs = ((sol.value[k], ref[k]) for k in ("a", "c"))
    for got, want in pairs:
        assert got.shape == want.shape and got.dtype == F64
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
    # the residual is taken over the whole state (both tensors together)
    flat = p.join(sol.value)
    torch.testing.assert_close(sol.residual, residual(p.inner.f, flat, "rel"), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_multidimensional_tensor_state(name):
    # a (B, 2, 3) state: every sample is one problem of size 6
    p = Affine.make(batch=3, d=6, radius=0.8, seed=4)

    def f(z):
        return p.f(z.reshape(3, 6)).reshape(3, 2, 3)

    sol = eq.solve(f, torch.zeros(3, 2, 3, dtype=F64), solver=name, tol=1e-10, max_iter=300)
    assert sol.value.shape == (3, 2, 3)
    torch.testing.assert_close(sol.value.reshape(3, 6), p.solution(), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_float32(name):
    p = Tanh.make(batch=4, d=6, norm=0.7, seed=5, dtype=torch.float32)
    sol = eq.solve(p.f, p.z0(), solver=name, tol=1e-5, max_iter=100)
    assert sol.status is eq.Status.CONVERGED
    assert sol.value.dtype == torch.float32
    assert float(sol.residual.max()) < 1e-5
    ref = Tanh(p.W.double(), p.x.double(), p.norm).solution()
    torch.testing.assert_close(sol.value.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_solve_records_no_graph_and_does_not_alias_z0(name):
    p = Tanh.make(seed=6)
    w = p.W.clone().requires_grad_()
    z0 = Tanh(p.W, p.x, p.norm).solution()  # already at the fixed point: returns z0 itself

    def f(z):
        return torch.tanh(z @ w.T + p.x)

    sol = eq.solve(f, z0, solver=name, tol=1e-6)
    assert sol.nstep == 1 and sol.status is eq.Status.CONVERGED
    assert not sol.value.requires_grad and not sol.residual.requires_grad
    before = sol.value.clone()
    z0.add_(1.0)
    torch.testing.assert_close(sol.value, before, rtol=0, atol=0)


# --- the driver loop: stopping, best iterate, traces ------------------------------------------


@pytest.mark.parametrize("stop", ["abs", "rel"])
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_per_sample_stopping(name, stop):
    # samples 0 and 2 are easy (spectral radius 1e-4, 1e-3), 1 and 3 hard (0.99, 0.999): within a
    # budget of 8 iterations only the easy ones converge, and each sample is judged on its own
    p = BatchAffine.make([1e-4, 0.99, 1e-3, 0.999], d=16, seed=7)
    tol = 1e-8
    sol = eq.solve(p.f, p.z0(), solver=name, tol=tol, max_iter=8, stop=stop)
    assert sol.status is eq.Status.MAX_ITER
    assert sol.nstep == 8
    assert sol.converged.dtype == torch.bool and sol.converged.shape == (4,)
    assert sol.converged.tolist() == [True, False, True, False]
    # the reported residual is the residual of the returned value, in the stop norm
    torch.testing.assert_close(sol.residual, residual(p.f, sol.value, stop), rtol=1e-6, atol=1e-20)
    assert bool((sol.residual[[0, 2]] < tol).all())
    assert bool((sol.residual[[1, 3]] >= tol).all())
    torch.testing.assert_close(sol.value[[0, 2]], p.solution()[[0, 2]], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_stops_when_every_sample_converged(name):
    p = Affine.make(batch=4, d=6, radius=0.9, seed=8)
    tol = 1e-9
    sol = eq.solve(p.f, p.z0(), solver=name, tol=tol, max_iter=500)
    assert sol.status is eq.Status.CONVERGED
    best = sol.residuals.cummin(0).values.max(1).values  # largest best-so-far residual
    assert float(best[-1]) < tol
    assert bool((best[:-1] >= tol).all()), "the solve went on after every sample converged"


def test_best_iterate_per_sample_picard():
    # per-sample maps f(z) = A_b z + c_b (D = 2): a contraction (best = last iterate), an
    # oscillating divergence (best = z0), and diag(1.3, 0.1) started where the decaying component
    # dominates the residual first and the growing one later (best = an iterate in the middle)
    a = torch.zeros(3, 2, 2, dtype=F64)
    a[0] = 0.5 * torch.eye(2)
    a[1] = -1.5 * torch.eye(2)
    a[2] = torch.diag(torch.tensor([1.3, 0.1]))
    c = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 90.0]], dtype=F64)
    p = BatchAffine(a, c)
    z0 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1e-3, 0.0]], dtype=F64)
    sol = eq.solve(p.f, z0, solver="picard", tol=1e-12, max_iter=8, stop="abs")
    assert sol.status is eq.Status.MAX_ITER
    best = sol.residuals.argmin(0).tolist()
    assert best[:2] == [7, 0] and 0 < best[2] < 7, sol.residuals
    torch.testing.assert_close(sol.residual, sol.residuals.min(0).values, rtol=0, atol=0)
    torch.testing.assert_close(sol.residual, abs_residual(p.f, sol.value), rtol=1e-12, atol=0)
    torch.testing.assert_close(sol.value[1], z0[1], rtol=0, atol=0)
    # the middle iterate of sample 2, recomputed by hand
    z = z0[2]
    for _ in range(best[2]):
        z = a[2] @ z + c[2]
    torch.testing.assert_close(sol.value[2], z, rtol=1e-14, atol=0)


@pytest.mark.parametrize(("name", "solver"), CONFIGS, ids=CONFIG_IDS)
def test_best_iterate_and_traces(name, solver):
    # a hard non-symmetric problem under a tight budget: residuals are not monotone for every
    # solver, and whatever they do the returned value must be the best iterate per sample
    p = Affine.make(batch=6, d=10, radius=0.99, seed=9, symmetric=False)
    z0 = torch.randn(6, 10, dtype=F64) * 5
    sol = eq.solve(p.f, z0, solver=solver, tol=1e-13, max_iter=12, stop="abs")
    assert sol.nstep == 12
    assert sol.residuals.shape == (12, 6)
    assert sol.trace.shape == (12,)
    assert sol.trace.dtype == torch.float64 and sol.trace.device.type == "cpu"
    torch.testing.assert_close(sol.trace, sol.residuals.max(1).values.double(), rtol=0, atol=0)
    torch.testing.assert_close(sol.residual, sol.residuals.min(0).values, rtol=0, atol=0)
    torch.testing.assert_close(sol.residual, abs_residual(p.f, sol.value), rtol=1e-10, atol=0)
    assert sol.nfev >= sol.nstep
    if not getattr(solver, "line_search", False):
        assert sol.nfev == sol.nstep


def test_trace_for_max_iter_one():
    p = Affine.make(seed=10)
    sol = eq.solve(p.f, p.z0(), tol=1e-8, max_iter=1)
    assert sol.nstep == 1 and sol.nfev == 1 and sol.status is eq.Status.MAX_ITER
    assert sol.trace.shape == (1,) and sol.residuals.shape == (1, 4)
    torch.testing.assert_close(sol.value, p.z0(), rtol=0, atol=0)


# --- scale invariance ---------------------------------------------------------------------


def _scaled_tanh(s: float):
    p = Tanh.make(batch=4, d=8, norm=0.95, seed=11, scale_x=2.0)

    def f(z):
        return s * torch.tanh((z / s) @ p.W.T + p.x)

    return p, f


@pytest.mark.parametrize(("name", "solver"), CONFIGS, ids=CONFIG_IDS)
def test_forward_is_scale_invariant(name, solver):
    steps, values = {}, {}
    for s in (1e-3, 1.0, 1e3):
        p, f = _scaled_tanh(s)
        sol = eq.solve(f, p.z0(), solver=solver, tol=1e-8, max_iter=400, stop="rel")
        assert sol.status is eq.Status.CONVERGED
        steps[s], values[s] = sol.nstep, sol.value / s
    assert steps[1e-3] == steps[1.0] == steps[1e3], steps
    torch.testing.assert_close(values[1e-3], values[1.0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(values[1e3], values[1.0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("name", "solver"), CONFIGS, ids=CONFIG_IDS)
def test_float32_power_of_two_rescaling_is_bitwise_invariant(name, solver):
    # scales by powers of two are exact in floating point, so a scale-free solver must produce
    # exactly the rescaled iterates: the same steps and bitwise the same value / s. At 2**-40 the
    # residuals near convergence (~1e-16) have squared norms below float32's precise range, so the
    # driver must fall back from a solver's squared norms to exactly computed ones without changing
    # anything; Anderson's bordered system is normalised by the trace of its Gram block (before,
    # its border of ones did not scale and the round-off of the solve did: one step more or less)
    steps, values = {}, {}
    for s in (2.0**-40, 1.0, 2.0**40):
        p, f = _scaled_tanh(s)
        z0 = p.z0().float()
        f32 = lambda z, f=f: f(z.double()).float()  # noqa: E731
        sol = eq.solve(f32, z0, solver=solver, tol=1e-5, max_iter=400, stop="rel")
        assert sol.status is eq.Status.CONVERGED
        steps[s], values[s] = sol.nstep, sol.value / s
        torch.testing.assert_close(
            sol.residual.double(), residual(f32, sol.value, "rel").double(), rtol=1e-4, atol=0.0
        )
    assert steps[2.0**-40] == steps[1.0] == steps[2.0**40], steps
    for s in (2.0**-40, 2.0**40):
        assert torch.equal(values[s], values[1.0]), s


def test_residual_norm_from_squared_norms_equals_the_direct_one():
    from equilibria._iterate import residual_norm

    g = torch.randn(6, 40, generator=torch.Generator().manual_seed(3))
    fx = torch.randn(6, 40, generator=torch.Generator().manual_seed(4))
    for scale in (1.0, 1e-17, 1e-25, 1e20):  # regular; squared norms imprecise, zero, infinite
        gs, fs = g * scale, fx
        exact = torch.linalg.vector_norm(gs.double(), dim=1) / torch.linalg.vector_norm(fs, dim=1)
        for gsq in (None, gs.pow(2).sum(1)):
            r, r_abs = map(torch.from_numpy, residual_norm(gs, fs, "rel", gsq))
            torch.testing.assert_close(r, exact.double(), rtol=1e-5, atol=0.0)
            want_abs = torch.linalg.vector_norm(gs.double(), dim=1)
            torch.testing.assert_close(r_abs, want_abs, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_implicit_backward_is_scale_invariant(name):
    # the problem and the upstream gradient are both rescaled; J is unchanged, so the adjoint
    # solve u = J^T u + s g must take the same number of iterations and return s u
    solver = SOLVER_CONFIGS[name]
    gbar = torch.randn(4, 8, dtype=F64)
    steps, adjoints = {}, {}
    for s in (1e-3, 1.0, 1e3):
        p, _ = _scaled_tanh(s)
        w = p.W.clone().requires_grad_()

        def f(z, w=w, p=p, s=s):
            return s * torch.tanh((z / s) @ w.T + p.x)

        z, sol = eq.fixed_point(
            f,
            p.z0(),
            solver=solver,
            backward=eq.Implicit(solver=solver, tol=1e-8, max_iter=400),
            tol=1e-10,
            max_iter=400,
        )
        z.backward(s * gbar)
        assert bool(sol.backward.converged.all())
        assert sol.backward.solution.solver == name
        steps[s] = sol.backward.nstep
        adjoints[s] = sol.backward.solution.value / s
    assert steps[1e-3] == steps[1.0] == steps[1e3], steps
    torch.testing.assert_close(adjoints[1e-3], adjoints[1.0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(adjoints[1e3], adjoints[1.0], rtol=1e-6, atol=1e-9)


# --- solver-specific guarantees -------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 1e-4])
@pytest.mark.parametrize("m", [2, 5])
def test_anderson_collinear_residuals(m, lam):
    # A = 0.5 I: every residual is exactly half the previous one, so the Gram matrix is singular
    b = torch.randn(3, 6, dtype=F64)

    def f(z):
        return 0.5 * z + b

    z0 = torch.zeros_like(b)
    sol = eq.solve(f, z0, solver=eq.Anderson(m=m, lam=lam), tol=1e-12, max_iter=100)
    picard = eq.solve(f, z0, solver="picard", tol=1e-12, max_iter=100)
    assert sol.status is eq.Status.CONVERGED
    assert bool(torch.isfinite(sol.residuals).all())
    torch.testing.assert_close(sol.value, 2 * b, rtol=1e-10, atol=1e-10)
    assert sol.nstep < picard.nstep
    if lam == 0.0:  # without a ridge the two-term extrapolation is exact
        assert sol.nstep <= 4


@pytest.mark.parametrize("stop", ["abs", "rel"])
@pytest.mark.parametrize(("name", "solver"), CONFIGS, ids=CONFIG_IDS)
def test_samples_exactly_at_their_fixed_point_while_others_iterate(name, solver, stop):
    # samples 0 and 1 have f = 0. Sample 0 starts at 0.5: an undamped solver lands exactly on the
    # fixed point after one step; sample 1 starts there. Their later residuals (and, for Anderson,
    # their whole Gram matrices) are exactly zero while sample 2 (radius 0.95) keeps the solve
    # going. Nothing may become NaN, and the exact samples must stay exact.
    p = Affine.make(batch=3, d=5, radius=0.95, seed=12)
    mask = torch.tensor([[0.0], [0.0], [1.0]], dtype=F64)

    def f(z):
        return mask * p.f(z)

    z0 = torch.zeros(3, 5, dtype=F64)
    z0[0] = 0.5
    sol = eq.solve(f, z0, solver=solver, tol=1e-10, max_iter=40, stop=stop)
    assert bool(torch.isfinite(sol.residuals).all())
    assert bool(sol.converged[1]) and float(sol.residuals[:, 1].max()) == 0.0
    assert float(sol.value[1].abs().max()) == 0.0
    if solver_damping(solver) == 1.0:
        assert bool(sol.converged[0])
        assert float(sol.residuals[1:, 0].max()) == 0.0
        assert float(sol.value[0].abs().max()) == 0.0
    elif stop == "abs":
        # a damped step only approaches 0 geometrically (in the rel norm ||z|| / ||f(z)|| a fixed
        # point at exactly 0 is reached only exactly, so there is nothing to assert for "rel")
        assert bool(sol.converged[0])
        torch.testing.assert_close(sol.value[0], torch.zeros(5, dtype=F64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_anderson_m1_is_damped_picard(beta):
    p = Tanh.make(seed=13)
    a = eq.solve(p.f, p.z0(), solver=eq.Anderson(m=1, beta=beta), tol=1e-9, max_iter=200)
    b = eq.solve(p.f, p.z0(), solver=eq.Picard(damping=beta), tol=1e-9, max_iter=200)
    assert a.nstep == b.nstep
    torch.testing.assert_close(a.residuals, b.residuals, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.value, b.value, rtol=1e-12, atol=0)


def _check_anderson_ring(state, history, m):
    """The ring holds the last min(count, m) pushes, push k in slot k % m, zeros elsewhere, and
    the bordered system holds their Gram matrix [[0, 1^T], [1, G G^T]] (zero where unused)."""
    count = len(history)
    assert state.count == count
    n = min(count, m)
    slots = [k % m for k in range(count - n, count)]
    images, residuals = torch.zeros_like(state.images), torch.zeros_like(state.residuals)
    for k, slot in zip(range(count - n, count), slots, strict=True):
        images[:, slot], residuals[:, slot] = history[k]
    torch.testing.assert_close(state.images, images, rtol=0, atol=0)
    torch.testing.assert_close(state.residuals, residuals, rtol=0, atol=0)
    system = torch.zeros_like(state.system)
    system[:, 1:, 1:] = residuals @ residuals.mT
    system[:, 0, [s + 1 for s in slots]] = 1.0
    system[:, [s + 1 for s in slots], 0] = 1.0
    torch.testing.assert_close(state.system, system, rtol=1e-12, atol=1e-14)
    return slots


@pytest.mark.parametrize(
    ("m", "lam", "beta"),
    [(1, 0.3, 0.6), (2, 0.0, 0.7), (3, 0.3, 1.0), (3, 0.3, 0.6), (4, 2.0, 0.5)],
)
def test_anderson_step_solves_the_bordered_system(m, lam, beta):
    # one Anderson step at a time against the least-squares problem written out by hand, for a
    # ring still filling (count < m) and wrapped around (count > m):
    #   min_a ||sum_i a_i G_i||^2 + lam' ||a||^2  s.t.  sum_i a_i = 1,
    #   lam' = lam ||G_newest||^2 + 1e-12 trace(G G^T)  (float64 floor),
    #   x = beta sum_i a_i F_i + (1 - beta) sum_i a_i X_i  with X_i = F_i - G_i
    g = gen(21)
    b, d = 3, 6
    w = 1.3 * orthogonal(d, g)
    inp = torch.randn(b, d, generator=g, dtype=F64)

    def fn(z):
        return torch.tanh(z @ w.T + inp) + 0.2 * z

    solver = eq.Anderson(m=m, lam=lam, beta=beta)
    x = torch.randn(b, d, generator=g, dtype=F64)
    fx = fn(x)
    gx = fx - x
    state = solver.init(x, fx, gx)
    history = [(fx, gx)]
    for count in range(1, m + 4):
        slots = _check_anderson_ring(state, history, m)
        if count == 1:
            want_x = x + beta * gx
        else:
            fs = torch.stack([fi for fi, _ in history[-len(slots) :]], 1)  # (B, n, D)
            gs = torch.stack([gi for _, gi in history[-len(slots) :]], 1)
            n = len(slots)
            ridge = lam * gs[:, -1].pow(2).sum(1) + 1e-12 * gs.pow(2).sum((1, 2))  # (B,)
            bordered = torch.zeros(b, n + 1, n + 1, dtype=F64)
            bordered[:, 0, 1:] = 1.0
            bordered[:, 1:, 0] = 1.0
            bordered[:, 1:, 1:] = gs @ gs.mT + ridge.view(-1, 1, 1) * torch.eye(n, dtype=F64)
            rhs = torch.zeros(b, n + 1, dtype=F64)
            rhs[:, 0] = 1.0
            a = torch.linalg.solve(bordered, rhs)[:, 1:]  # (B, n), in push order
            torch.testing.assert_close(a.sum(1), torch.ones(b, dtype=F64))
            alpha = torch.zeros(b, m, dtype=F64)
            alpha[:, slots] = a
            torch.testing.assert_close(_anderson._mixing(state)[:, 0], alpha, rtol=1e-9, atol=1e-12)
            mixed_f = torch.einsum("bn,bnd->bd", a, fs)
            mixed_x = torch.einsum("bn,bnd->bd", a, fs - gs)
            want_x = beta * mixed_f + (1.0 - beta) * mixed_x
        step = solver.step(fn, x, fx, gx, state)
        torch.testing.assert_close(step.x, want_x, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(step.fx, fn(step.x), rtol=0, atol=0)
        torch.testing.assert_close(step.g, step.fx - step.x, rtol=0, atol=0)
        assert step.nfev == 1
        torch.testing.assert_close(step.gsq, step.g.pow(2).sum(1), rtol=1e-12, atol=0)
        x, fx, gx, state = step.x, step.fx, step.g, step.state
        history.append((fx, gx))
    _check_anderson_ring(state, history, m)
    assert state.count == m + 4 > m


def test_anderson_push_writes_the_next_ring_slot():
    # _push alone, from an empty ring: push k lands in slot k % m and fills row/column k % m + 1
    m, b, d = 3, 2, 4
    g = gen(22)
    x = torch.randn(b, d, generator=g, dtype=F64)
    state = eq.Anderson(m=m, lam=0.1).init(x, x, torch.zeros_like(x))
    history = [(x, torch.zeros_like(x))]
    for _ in range(2 * m + 1):
        fx = torch.randn(b, d, generator=g, dtype=F64)
        gx = torch.randn(b, d, generator=g, dtype=F64)
        state = _anderson._push(state, fx, gx)
        history.append((fx, gx))
        _check_anderson_ring(state, history, m)


def test_broyden_line_search_never_increases_a_residual():
    # f(z) = z - 2.5 atan(z) is not contractive: its only fixed point is 0, where |f'(0)| = 1.5;
    # plain Broyden steps overshoot and increase some samples' residual, the line search
    # (Armijo on ||f(z) - z||, the abs norm) backtracks them, at the cost of extra evaluations
    def f(z):
        return z - 2.5 * torch.atan(z)

    z0 = 4.0 * torch.linspace(0.5, 1.5, 3, dtype=F64).unsqueeze(1).expand(3, 4).clone()
    kwargs = {"tol": 1e-10, "max_iter": 100, "stop": "abs"}
    plain = eq.solve(f, z0, solver=eq.Broyden(line_search=False), **kwargs)
    searched = eq.solve(f, z0, solver=eq.Broyden(line_search=True), **kwargs)
    assert plain.nfev == plain.nstep
    assert bool((plain.residuals[1:] > plain.residuals[:-1]).any())
    assert searched.status is eq.Status.CONVERGED
    assert bool((searched.residuals[1:] <= searched.residuals[:-1]).all()), searched.residuals
    assert searched.nfev > searched.nstep
    torch.testing.assert_close(searched.value, torch.zeros_like(z0), rtol=0, atol=1e-9)


class _RecordingBroyden(Broyden):
    """Broyden that records the shapes of its buffers at every step."""

    seen: list  # class attribute, set by the test

    def step(self, fn, x, fx, g, state):
        out = super().step(fn, x, fx, g, state)
        type(self).seen.append((tuple(out.state.us.shape), tuple(out.state.vs.shape), out.state))
        return out


@pytest.mark.parametrize("memory", [2, 3, 7])
def test_broyden_state_has_memory_columns(memory):
    x = torch.randn(4, 9, dtype=F64)
    state = eq.Broyden(memory=memory).init(x, 0.5 * x, -0.5 * x)
    assert isinstance(state, BroydenState)
    assert state.us.shape == state.vs.shape == (4, memory, 9)


def test_broyden_memory_does_not_grow_with_max_iter():
    p = Affine.make(batch=3, d=20, radius=0.95, seed=14, symmetric=False)
    _RecordingBroyden.seen = []
    solver = _RecordingBroyden(memory=4)
    sol = eq.solve(p.f, p.z0(), solver=solver, tol=1e-10, max_iter=200)
    assert sol.status is eq.Status.CONVERGED
    torch.testing.assert_close(sol.value, p.solution(), rtol=1e-7, atol=1e-7)
    seen = _RecordingBroyden.seen
    assert len(seen) == sol.nstep - 1 > 4  # the ring buffer wrapped around
    assert {s[0] for s in seen} == {s[1] for s in seen} == {(3, 4, 20)}
    # every one of the `memory` slots is used before the restart, and never more; the restart
    # keeps the latest secant pair as the first update of H = -I
    counts = [s[2].count for s in seen]
    assert max(counts) == 4 and counts[:7] == [1, 2, 3, 4, 1, 2, 3]


def test_broyden_restart_satisfies_the_latest_secant_condition():
    """After a restart H = -I + u v^T must map the last residual change onto the last step,
    H dg = dx (a bare -I, the old restart, took a Picard step and lost 4 iterations on the conv
    benchmark)."""
    p = Affine.make(batch=3, d=12, radius=0.9, seed=3, symmetric=False)
    solver = Broyden(memory=3)
    x = p.z0()
    fx = p.f(x)
    g = fx - x
    state = solver.init(x, fx, g)
    for _ in range(4):  # the 4th step finds the ring full and restarts
        x_old, g_old = x, g
        x, fx, g, state, *_ = solver.step(p.f, x, fx, g, state)
    assert state.count == 1
    dx, dg = x - x_old, g - g_old
    u, v = state.us[:, 0], state.vs[:, 0]
    h_dg = -dg + u * torch.linalg.vecdot(v, dg).unsqueeze(1)
    torch.testing.assert_close(h_dg, dx)
    torch.testing.assert_close(state.p, g - u * torch.linalg.vecdot(v, g).unsqueeze(1))


# --- per-sample compaction ------------------------------------------------------------------


def _indexed(p: BatchAffine, calls: list):
    """The map of ``p`` in the compaction form f(z, index): rows of z are samples ``index``."""

    def f(z, index):
        calls.append(None if index is None else index.tolist())
        a, c = (p.A, p.c) if index is None else (p.A[index], p.c[index])
        assert z.shape[0] == a.shape[0]
        return torch.einsum("bij,bj->bi", a, z) + c

    return f


@pytest.mark.parametrize("stop", ["abs", "rel"])
@pytest.mark.parametrize(("name", "solver"), CONFIGS, ids=CONFIG_IDS)
def test_compaction_matches_the_full_solve(name, solver, stop):
    p = BatchAffine.make([1e-4, 0.9, 1e-2, 0.95, 0.5], d=6, seed=15)
    tol = 1e-10
    calls = []
    sol = eq.solve(
        _indexed(p, calls), p.z0(), solver=solver, tol=tol, max_iter=2000, stop=stop, compact=True
    )
    full = eq.solve(p.f, p.z0(), solver=solver, tol=tol, max_iter=2000, stop=stop)
    assert sol.status is full.status is eq.Status.CONVERGED
    assert bool(sol.converged.all())
    torch.testing.assert_close(sol.residual, residual(p.f, sol.value, stop), rtol=1e-6, atol=0)
    torch.testing.assert_close(sol.value, p.solution(), rtol=1e-7, atol=1e-7)
    # converged samples leave the batch: fewer sample-evaluations, and the map sees only the rest
    assert full.evaluations == 5 * full.nfev
    assert sol.evaluations == sum(5 if c is None else len(c) for c in calls)
    assert sol.evaluations < full.evaluations
    assert calls[0] is None and calls[-1] is not None and 0 not in calls[-1]
    # a dropped sample's residuals are NaN from then on, and never again a number
    nan = torch.isnan(sol.residuals)
    assert bool(nan[-1, 0]) and not bool(nan[0].any())
    assert bool((nan[1:] >= nan[:-1]).all())
    # each sample's last recorded residual is its first below tol (it stops there)
    for b in range(5):
        rows = sol.residuals[~nan[:, b], b]
        assert float(rows[-1]) < tol and bool((rows[:-1] >= tol).all())
    finite = torch.where(nan, -torch.inf, sol.residuals)
    torch.testing.assert_close(sol.trace, finite.max(1).values, rtol=0, atol=0)


def test_compaction_keeps_the_first_row_of_residuals():
    p = BatchAffine.make([1e-4, 0.9], d=3, seed=16)
    sol = eq.solve(_indexed(p, []), p.z0(), solver="picard", tol=1e-8, max_iter=500, compact=True)
    torch.testing.assert_close(sol.residuals[0], residual(p.f, p.z0(), "rel"), rtol=1e-12, atol=0)
    assert float(sol.residuals[0].max()) == float(sol.trace[0])


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_compaction_with_tree_states(kind):
    p = TreeAffine.make(kind, batch=3, radius=0.9, seed=17)

    def f(z, index):
        out = p.inner.f(p.join(z)) if index is None else p.join(z) @ p.inner.A.T + p.inner.b[index]
        return p.split(out)

    z0 = p.z0()
    # start sample 1 at its fixed point: it is dropped after the first evaluation
    flat = p.join(z0)
    flat[1] = p.inner.solution()[1]
    sol = eq.solve(f, p.split(flat), tol=1e-10, max_iter=300, compact=True)
    assert sol.status is eq.Status.CONVERGED
    torch.testing.assert_close(p.join(sol.value), p.inner.solution(), rtol=1e-8, atol=1e-8)
    assert bool(torch.isnan(sol.residuals[1:, 1]).all())


def test_compaction_reports_nonfinite_samples_by_their_original_index():
    p = BatchAffine.make([1e-6, 0.9, 0.9], d=3, seed=18)
    calls = [0]

    def f(z, index):
        calls[0] += 1
        a, c = (p.A, p.c) if index is None else (p.A[index], p.c[index])
        out = torch.einsum("bij,bj->bi", a, z) + c
        if calls[0] == 6:  # by now sample 0 has been dropped: original sample 2 is row 1
            assert index is not None and index.tolist() == [1, 2]
            out[1, 0] = math.nan
        return out

    with pytest.raises(
        eq.NonFiniteError, match=re.escape("the map returned NaN or inf (samples 2)")
    ):
        eq.solve(f, p.z0(), solver="picard", tol=1e-8, max_iter=50, compact=True)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_zero_tolerance_runs_the_whole_budget(name):
    # tol=0 is a fixed iteration count: nothing ever counts as converged
    p = Affine.make(batch=3, d=5, radius=0.5, seed=21)
    sol = eq.solve(p.f, p.z0(), solver=name, tol=0.0, max_iter=7)
    assert sol.nstep == 7 and sol.status is eq.Status.MAX_ITER
    assert not bool(sol.converged.any())
