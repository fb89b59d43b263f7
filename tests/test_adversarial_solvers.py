"""What adversarial testing of the solvers found (issue 11, section 4), each a test that failed
before its fix.

* Scale invariance over the dtype's whole range: a problem rescaled by any factor that keeps its
  values representable is solved in the same steps, to the same relative result (before, Anderson
  and Broyden overflowed their Gram matrices and dot products from about 1e19 in float32, and the
  driver's norms overflowed from about 1e154 in float64).
* Hyper-parameters outside the range where they make sense are refused (``lam=1e300`` gave NaN).
* Two mutants of the mutation-testing run that the suite did not kill: Broyden's line search
  keeping its last trial instead of its best, and the driver stopping on the current instead of
  the best residual per sample.
"""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch
from _problems import BACKWARD_NAMES, F64, SOLVER_CONFIGS, Tanh

import equilibria as eq

CONFIGS = list(SOLVER_CONFIGS.items())
CONFIG_IDS = [name for name, _ in CONFIGS]
F32 = torch.float32

# scales over each dtype's range (float32 reaches 3.4e38, float64 1.8e308), with the two values
# the issue reported: 1e19 (Anderson and Broyden failed in float32) and 1e160 (the driver failed
# in float64); 2^-100 and 2^100 are exact, so the solve must be bitwise the rescaled one
SCALES = {
    F32: [1e-30, 1e-20, 1e-10, 1e10, 1e19, 1e30, 2.0**-100, 2.0**100],
    F64: [1e-300, 1e-150, 1e-50, 1e50, 1e150, 1e160, 1e300, 2.0**-900, 2.0**900],
}
TOL = {F32: 1e-5, F64: 1e-11}
ATOL = {F32: 1e-6, F64: 1e-13}  # residuals agree to the round-off of the value, 1/10 of TOL


def _scaled(s: float, dtype: torch.dtype, batch: int = 3):
    """s * tanh(z / s W^T + x): the unit problem's fixed points times s, computed at scale s."""
    p = Tanh.make(batch=batch, d=6, norm=0.9, seed=3, dtype=dtype)

    def f(z):
        return s * torch.tanh((z / s) @ p.W.T + p.x)

    return f, p.z0()


def _solve(solver, s, dtype, stop="rel", **kwargs):
    f, z0 = _scaled(s, dtype)
    tol = TOL[dtype] * (s if stop == "abs" else 1.0)
    return eq.solve(f, z0, solver=solver, tol=tol, max_iter=300, stop=stop, **kwargs), f


def _residual(f, z, s, stop):
    """(B,) the residual of ``z`` recomputed outside the library, in float64 and in units of
    ``s`` (the plain norms of a problem at 1e30 overflow in float32)."""
    fz, z = f(z).double() / s, z.double() / s
    r = torch.linalg.vector_norm(fz - z, dim=1)
    return r / torch.linalg.vector_norm(fz, dim=1) if stop == "rel" else r * s


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "solver"), CONFIGS, ids=CONFIG_IDS)
def test_solvers_are_scale_invariant_over_the_dtype_range(name, solver, dtype):
    unit, _ = _solve(solver, 1.0, dtype)
    assert unit.status is eq.Status.CONVERGED
    rtol = 1e-4 if dtype == F32 else 1e-9
    for s in SCALES[dtype]:
        sol, f = _solve(solver, s, dtype)
        assert sol.status is eq.Status.CONVERGED, (s, sol)
        assert sol.nstep == unit.nstep, (s, sol.nstep, unit.nstep)
        assert sol.value.dtype == dtype
        torch.testing.assert_close(sol.value / s, unit.value, rtol=rtol, atol=0.0)
        # the reported residual is the residual of the returned value
        torch.testing.assert_close(
            sol.residual.double(), _residual(f, sol.value, s, "rel"), rtol=1e-3, atol=ATOL[dtype]
        )
        if float(s).hex().startswith("0x1.0000000000000p"):  # a power of two: exact
            assert torch.equal(sol.value / s, unit.value), s
            assert torch.equal(sol.residuals, unit.residuals), s


@pytest.mark.parametrize("compact", [False, True], ids=["full", "compact"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_abs_stop_and_compaction_are_scale_invariant(name, dtype, compact):
    big = SCALES[dtype][-3]  # 1e30 / 1e300
    unit, _ = _solve_abs(name, 1.0, dtype, compact)
    sol, f = _solve_abs(name, big, dtype, compact)
    assert sol.status is unit.status is eq.Status.CONVERGED
    assert sol.nstep == unit.nstep
    rtol = 1e-4 if dtype == F32 else 1e-9
    torch.testing.assert_close(sol.value / big, unit.value, rtol=rtol, atol=0.0)
    # abs residuals are reported in the problem's own units
    torch.testing.assert_close(sol.residual / big, unit.residual, rtol=1e-3, atol=ATOL[dtype])
    torch.testing.assert_close(
        sol.residual.double() / big,
        _residual(f, sol.value, big, "abs") / big,
        rtol=1e-3,
        atol=ATOL[dtype],
    )


def _solve_abs(name, s, dtype, compact):
    p = Tanh.make(batch=3, d=6, norm=0.9, seed=3, dtype=dtype)

    def f(z, index=None):  # with compaction, f(z, index) gets the rows still iterating
        x = p.x if index is None else p.x[index]
        return s * torch.tanh((z / s) @ p.W.T + x)

    tol = TOL[dtype] * s
    sol = eq.solve(f, p.z0(), solver=name, tol=tol, max_iter=300, stop="abs", compact=compact)
    return sol, f


@pytest.mark.parametrize("compact", [False, True], ids=["full", "compact"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_samples_of_very_different_scales_in_one_batch(name, dtype, compact):
    # each sample is brought near 1 by its own power of two: one batch holds samples at 1e-30,
    # 1 and 1e30 (float32) and each is solved as its unit-scale self; with compaction the units
    # of the samples still iterating follow them (the easy, saturated samples 3 and 4 leave the
    # batch first)
    scales = [SCALES[dtype][0], 1.0, SCALES[dtype][-3], SCALES[dtype][-3], SCALES[dtype][0]]
    s = torch.tensor(scales, dtype=dtype).unsqueeze(1)
    p = Tanh.make(batch=5, d=6, norm=0.9, seed=3, dtype=dtype)
    p.x[3:] *= 30

    def f(z, index=None):
        x, si = (p.x, s) if index is None else (p.x[index], s[index])
        return si * torch.tanh((z / si) @ p.W.T + x)

    def f_unit(z, index=None):
        x = p.x if index is None else p.x[index]
        return torch.tanh(z @ p.W.T + x)

    kwargs = {"solver": name, "tol": TOL[dtype], "max_iter": 300, "compact": compact}
    sol = eq.solve(f, p.z0(), **kwargs)
    unit = eq.solve(f_unit, p.z0(), **kwargs)
    assert sol.status is unit.status is eq.Status.CONVERGED
    assert sol.nstep == unit.nstep
    assert torch.equal(sol.residuals.isnan(), unit.residuals.isnan())  # the same samples left
    if compact:
        assert bool(unit.residuals[1:, 3:].isnan().any())  # compaction happened
    rtol = 1e-4 if dtype == F32 else 1e-9
    torch.testing.assert_close(sol.value / s, unit.value, rtol=rtol, atol=0.0)


@pytest.mark.parametrize(("name", "solver"), CONFIGS, ids=CONFIG_IDS)
def test_the_reported_affine_cases(name, solver):
    # the reproductions: 0.5 z + 1e19 in float32, 0.5 z + 1e160 in float64
    for shift, dtype in ((1e19, F32), (1e160, F64)):
        z0 = torch.zeros(4, 8, dtype=dtype)
        sol = eq.solve(lambda z, c=shift: 0.5 * z + c, z0, solver=solver, max_iter=200)
        assert sol.status is eq.Status.CONVERGED, (dtype, sol)
        torch.testing.assert_close(sol.value, torch.full_like(z0, 2 * shift), rtol=1e-3, atol=0.0)


def test_trajectory_states_are_in_the_problem_units():
    # fixed_point_states hands out iterates along the trajectory: they must not be the solver's
    # internal (rescaled) iterates
    s = 1e30
    f, z0 = _scaled(s, F32)
    unit_f, unit_z0 = _scaled(1.0, F32)
    states, _ = eq.fixed_point_states(f, z0, n=3, solver="anderson", tol=1e-5, max_iter=100)
    unit_states, _ = eq.fixed_point_states(
        unit_f, unit_z0, n=3, solver="anderson", tol=1e-5, max_iter=100
    )
    for a, b in zip(states, unit_states, strict=True):
        torch.testing.assert_close(a / s, b, rtol=1e-4, atol=1e-6)


# --- hyper-parameter ranges -----------------------------------------------------------------

BAD_HYPERPARAMETERS = [
    pytest.param(
        lambda: eq.Anderson(lam=1e300),
        ValueError,
        "Anderson lam must be in [0.0, 1000000.0], got 1e+300",
        id="anderson-lam-huge",
    ),
    pytest.param(
        lambda: eq.Anderson(lam=1e6 * (1 + 1e-15)),
        ValueError,
        "Anderson lam must be in [0.0, 1000000.0]",
        id="anderson-lam-above-bound",
    ),
    pytest.param(
        lambda: eq.Anderson(lam=float("inf")),
        ValueError,
        "Anderson lam must be in [0.0, 1000000.0], got inf",
        id="anderson-lam-inf",
    ),
    pytest.param(
        lambda: eq.Anderson(beta=float("nan")),
        ValueError,
        "Anderson beta must be in (0.0, 1.0], got nan",
        id="anderson-beta-nan",
    ),
    pytest.param(
        lambda: eq.Broyden(max_backtracks=61),
        ValueError,
        "Broyden max_backtracks must be an int in [1, 60], got 61",
        id="broyden-backtracks-huge",
    ),
    pytest.param(
        lambda: eq.Broyden(max_backtracks=2.0),
        TypeError,
        "Broyden max_backtracks must be an int in [1, 60], got float 2.0",
        id="broyden-backtracks-float",
    ),
    pytest.param(  # an int Python refuses to print (over 4300 digits) still names the argument
        lambda: eq.Anderson(lam=10**5000),
        ValueError,
        "Anderson lam must be in [0.0, 1000000.0], got an int of 16610 bits",
        id="anderson-lam-unprintable-int",
    ),
    pytest.param(
        lambda: eq.Broyden(max_backtracks=-(10**5000)),
        ValueError,
        "Broyden max_backtracks must be an int in [1, 60], got an int of 16610 bits",
        id="broyden-backtracks-unprintable-int",
    ),
    pytest.param(
        lambda: eq.Picard(damping=float("inf")),
        ValueError,
        "Picard damping must be in (0.0, 1.0], got inf",
        id="picard-damping-inf",
    ),
    pytest.param(
        lambda: eq.Picard(damping=True),
        TypeError,
        "Picard damping must be a real number in (0.0, 1.0], got bool True",
        id="picard-damping-bool",
    ),
]


@pytest.mark.parametrize(("make", "exc", "fragment"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameters(make, exc, fragment):
    with pytest.raises(exc) as info:
        make()
    assert fragment in str(info.value)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("s", [1.0, 2.0**31, 2.0**-31])
def test_anderson_largest_lam_stays_finite(s, dtype):
    # the bound is finite and usable: the ridge dominates (the step averages the history) and
    # the solve converges like a damped iteration, without NaN, at the edges of the units band
    sol, _ = _solve(eq.Anderson(lam=1e6), s, dtype)
    assert sol.status is eq.Status.CONVERGED
    assert bool(torch.isfinite(sol.value).all())


# --- mutants the suite did not kill ---------------------------------------------------------


def test_broyden_line_search_returns_its_best_trial_not_its_last():
    # g(z) = f(z) - z is 1 at z0 = 0 and 1.5 + 4 (z - 0.5)^2 elsewhere: the first step is
    # p = g(0) = 1, and along it no trial t = 1, 1/2, ..., 1/16 satisfies the Armijo condition
    # (every residual exceeds 1); the best trial is t = 1/2 (residual 1.5), the last t = 1/16
    # (residual 2.27). The step must take the best one.
    def f(z):
        g = torch.where(z == 0, 1.0, 1.5 + 4.0 * (z - 0.5) ** 2)
        return z + g

    z0 = torch.zeros(2, 1, dtype=F64)
    solver = eq.Broyden(line_search=True, max_backtracks=4)
    sol = eq.solve(f, z0, solver=solver, tol=1e-12, max_iter=2, stop="abs")
    assert sol.nfev == 1 + 5  # z0, then five trials
    torch.testing.assert_close(sol.residuals[1], torch.full((2,), 1.5, dtype=F64))
    # the best iterate is still z0 (residual 1)
    torch.testing.assert_close(sol.value, z0)


def test_driver_stops_on_the_best_residual_per_sample():
    # Picard on a scripted map: the residual of sample 0 dips below tol at iteration 3 and rises
    # again (200-fold: not a divergence); sample 1 first reaches tol at iteration 7. Every
    # sample's best residual is then below tol: the solve must stop there as CONVERGED and
    # return sample 0's iterate of iteration 3 (stopping on the current residuals runs on to
    # the budget: MAX_ITER).
    tol = 1e-6
    steps = torch.tensor(
        [
            [1.0, 1e-3, 5e-7, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4],
            [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-7, 1.0, 1.0, 1.0, 1.0, 1.0],
        ],
        dtype=F64,
    )  # (B, iteration): the residual f(z) - z at the n-th evaluation
    calls = [0]

    def f(z):
        d = steps[:, calls[0]].unsqueeze(1)
        calls[0] += 1
        return z + d

    z0 = torch.zeros(2, 1, dtype=F64)
    sol = eq.solve(f, z0, solver="picard", tol=tol, max_iter=12, stop="abs")
    assert sol.status is eq.Status.CONVERGED
    assert sol.nstep == 7
    assert bool(sol.converged.all())
    # sample 0: its best iterate is the third (after steps 1 and 1e-3), residual 5e-7
    torch.testing.assert_close(sol.value[0], torch.tensor([1.001], dtype=F64))
    assert float(sol.residual[0]) == pytest.approx(5e-7, rel=1e-6)
    # sample 1: the seventh iterate
    torch.testing.assert_close(sol.value[1], steps[1, :6].sum().reshape(1))
    assert float(sol.residual[1]) == pytest.approx(1e-7, rel=1e-6)
    # the current residuals at the last iteration were not all below tol
    assert float(sol.residuals[-1].max()) > tol


@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_the_adjoint_solve_is_scale_invariant_over_the_range(name):
    # the implicit backward's adjoint solve runs on the upstream gradient: a loss scaled by 1e-30
    # (float32) must give gradients scaled by exactly that, in the same adjoint steps (before,
    # Anderson's Gram matrix of such vectors underflowed and its adjoint solve crawled)
    p = Tanh.make(batch=3, d=6, norm=0.9, seed=3, dtype=F32)
    w = p.W.clone().requires_grad_()
    target = torch.linspace(-1, 1, 18, dtype=F32).view(3, 6)
    grads, steps = {}, {}
    for c in (1.0, 1e-30, 1e30):
        backward = eq.Implicit(solver=name, tol=1e-5, max_iter=200)
        z, sol = eq.fixed_point(lambda z, w=w: torch.tanh(z @ w.T + p.x), p.z0(),
                                solver=name, backward=backward, tol=1e-5, max_iter=200)  # fmt: skip
        (grad,) = torch.autograd.grad(c * ((z - target) ** 2).sum(), w)
        assert bool(sol.backward.converged.all()), (c, sol.backward)
        grads[c], steps[c] = grad / c, sol.backward.nstep
    assert steps[1e-30] == steps[1.0] == steps[1e30], steps
    torch.testing.assert_close(grads[1e-30], grads[1.0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads[1e30], grads[1.0], rtol=1e-4, atol=1e-7)


class _Recording(eq.Picard):
    """Picard that records the images f(x) the driver hands it."""

    seen: ClassVar[list] = []

    def step(self, fn, x, fx, g, state):
        type(self).seen.append(fx.clone())
        return super().step(fn, x, fx, g, state)


@pytest.mark.parametrize(
    ("shift", "rescaled"), [(3.0, False), (1e-30, True), (1e30, True)], ids=["1", "tiny", "huge"]
)
def test_values_are_rescaled_only_outside_the_band(shift, rescaled):
    # the common case changes nothing: the solver sees the problem's own values; a sample exactly
    # at its fixed point 0 (f(0) = 0: size 0) does not count as out of the band
    _Recording.seen = []
    b = torch.tensor([[0.0], [shift]], dtype=F32).expand(2, 4)
    sol = eq.solve(lambda z: 0.5 * z + b, torch.zeros(2, 4, dtype=F32), solver=_Recording(),
                   tol=1e-6, max_iter=100)  # fmt: skip
    x = _Recording.seen[0]  # f(z0) = b, in the units the solver works in
    assert torch.equal(x[0], torch.zeros(4))
    assert torch.equal(x[1] == b[1], torch.full((4,), not rescaled))
    if rescaled:  # in units where the sample's size is near 1 (a power of two away from b)
        size = float(x[1].norm())
        assert 0.5 <= size <= 2.0 and math.log2(float(b[1, 0]) / float(x[1, 0])).is_integer()
    torch.testing.assert_close(sol.value[1], 2 * b[1], rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("backward", BACKWARD_NAMES)
def test_gradients_of_every_backward_method_at_the_edge_of_float64(backward):
    # a problem at 1e200 (squared norms overflow float64) gives, for every backward method (the
    # unrolled one differentiates through the rescaled iteration itself), the gradient of the
    # unit-scale problem, in the same forward steps
    p = Tanh.make(batch=3, d=6, norm=0.7, seed=5)
    grads, steps = {}, {}
    for s in (1.0, 1e200):
        w = p.W.clone().requires_grad_()

        def f(z, w=w, s=s):
            return s * torch.tanh((z / s) @ w.T + p.x)

        kwargs = {"solver": "anderson", "backward": backward, "tol": 1e-10, "max_iter": 100}
        z, sol = eq.fixed_point(f, p.z0(), **kwargs)
        (grads[s],) = torch.autograd.grad((z / s).sum(), w)
        steps[s] = sol.nstep
    assert steps[1e200] == steps[1.0]
    torch.testing.assert_close(grads[1e200], grads[1.0], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("compact", [False, True], ids=["full", "compact"])
@pytest.mark.parametrize("max_iter", [1, 50])
def test_a_solve_that_takes_no_step_returns_z0_outside_the_band(max_iter, compact):
    # z0 is the answer when the first iterate already meets tol or the budget is one map call:
    # it must come back in the problem's own units, not divided by the unit it was never
    # multiplied by (compaction returned inf here: 1e19 * 2^65 overflows float32)
    z0 = torch.full((2, 3), 2e19 if max_iter > 1 else 1e18, dtype=F32)
    sol = eq.solve(lambda z, index=None: 0.5 * z + 1e19, z0, max_iter=max_iter, compact=compact)
    assert sol.nstep == 1
    assert sol.status is (eq.Status.CONVERGED if max_iter > 1 else eq.Status.MAX_ITER)
    assert torch.equal(sol.value, z0)


@pytest.mark.parametrize("far", [3e152, 1e153, 1e200])
@pytest.mark.parametrize("stop", ["rel", "abs"])
@pytest.mark.parametrize("compact", [False, True], ids=["full", "compact"])
@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_a_far_initial_state_is_not_reported_converged_at_a_wrong_point(name, compact, stop, far):
    # z0 at 1e200 sets the units, the O(1) fixed point then lies at ~1e-200 in them, where the
    # squares of the residual underflow float64: Picard and Broyden reported CONVERGED with a
    # residual of 0 after one step, at a point whose true rel residual was above 1; near 1e153
    # the squares are subnormal and the residuals reported were off by up to 30%
    p = Tanh.make(batch=3, d=6, norm=0.9, seed=3)

    def f(z, index=None):
        return p.f(z) if index is None else torch.tanh(z @ p.W.T + p.x[index])

    z0 = torch.full_like(p.z0(), far)
    sol = eq.solve(f, z0, solver=name, tol=1e-6, max_iter=300, stop=stop, compact=compact)
    ref = eq.solve(p.f, p.z0(), solver=name, tol=1e-10, max_iter=300)
    assert sol.status is eq.Status.CONVERGED
    assert sol.nstep > 2
    true = _residual(p.f, sol.value, 1.0, stop)
    assert float(true.max()) < 1e-6
    torch.testing.assert_close(sol.residual, true.to(sol.residual), rtol=1e-6, atol=1e-15)
    torch.testing.assert_close(sol.value, ref.value, rtol=0.0, atol=1e-5)
