"""Jacobian regularisation (Bai, Koltun & Kolter, ICML 2021) and the spectral radius.

The references are closed forms, independent of the library: for f(z) = z A^T + b the Jacobian is
A, so E||eps^T J||^2 / D = ||A||_F^2 / D and the spectral radius is max |eig(A)|; for
f(z) = tanh(z W^T + x) a probe's vector-Jacobian product is (eps * s) W with s = 1 - f(z)^2,
written out by hand. Every estimate uses a seeded generator, so the tests are deterministic.
"""

from __future__ import annotations

import pytest
import torch
from _problems import F64, BatchAffine, TreeAffine, gen, loss, orthogonal, rel_err

import equilibria as eq

TIGHT = {"tol": 1e-12, "max_iter": 300}


def affine(d=16, batch=4, seed=0, requires_grad=False):
    """f(z) = z A^T + b with one (d, d) matrix A shared by the batch."""
    g = gen(seed)
    a = torch.randn(d, d, generator=g, dtype=F64) / d**0.5
    b = torch.randn(batch, d, generator=g, dtype=F64)
    a.requires_grad_(requires_grad)
    return a, b, (lambda z: z @ a.T + b)


class TanhMap:
    """f(z) = tanh(z W^T + x) with a symmetric W of known eigenvalues; W and x require grad."""

    def __init__(self, batch=4, d=6, eigs=(0.9, 0.5, -0.4, 0.3, 0.2, -0.1), seed=0):
        g = gen(seed)
        q = orthogonal(d, g)
        self.W = ((q * torch.tensor(eigs, dtype=F64)) @ q.T).requires_grad_()
        self.x = torch.randn(batch, d, generator=g, dtype=F64).requires_grad_()
        self.z = 0.5 * torch.randn(batch, d, generator=g, dtype=F64)

    def f(self, z):
        return torch.tanh(z @ self.W.T + self.x)

    def hutchinson(self, samples, g):
        """The penalty written out by hand with the probes the library draws from ``g``."""
        s = 1 - self.f(self.z) ** 2  # f'(u) at z, (B, D)
        total = 0
        for _ in range(samples):
            eps = torch.randn(self.z.shape, generator=g, dtype=F64)
            total = total + ((eps * s) @ self.W).pow(2).sum(1)  # ||eps^T J||^2, J = diag(s) W
        return total / (samples * self.z.shape[1])


# --- Jacobian penalty: the estimate ------------------------------------------------------------


@pytest.mark.parametrize(("samples", "calls"), [(4000, 1), (40, 100)])
def test_penalty_mean_matches_frobenius_norm_per_sample(samples, calls):
    # one matrix per sample: the per-sample estimate must follow each sample's own ||A_b||_F^2
    prob = BatchAffine.make([0.3, 0.7, 0.95, 1.4], d=16, seed=3)
    exact = prob.A.pow(2).sum((1, 2)) / 16
    g = gen(11)
    est = sum(
        eq.jacobian_penalty(prob.f, prob.z0(), samples=samples, reduction="none", generator=g)
        for _ in range(calls)
    )
    est = est / calls
    assert est.shape == (4,) and est.dtype == F64
    assert float(((est - exact) / exact).abs().max()) < 0.03
    # the per-sample values are not all alike, so the check above is per sample
    assert float(exact.max() / exact.min()) > 3


def test_penalty_reduction_mean_is_the_batch_mean():
    prob = BatchAffine.make([0.3, 0.7, 0.95], d=8, seed=1)
    per = eq.jacobian_penalty(prob.f, prob.z0(), samples=3, reduction="none", generator=gen(5))
    mean = eq.jacobian_penalty(prob.f, prob.z0(), samples=3, generator=gen(5))
    assert mean.dim() == 0 and per.shape == (3,)
    torch.testing.assert_close(mean, per.mean(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_penalty_on_a_tree_state_divides_by_the_total_size(kind):
    prob = TreeAffine.make(kind, batch=3, seed=2)
    exact = float(prob.inner.A.pow(2).sum()) / 7  # D = 3 + 2 * 2
    est = eq.jacobian_penalty(prob.f, prob.z0(), samples=4000, generator=gen(4))
    assert abs(float(est) / exact - 1) < 0.03


def test_penalty_is_zero_where_the_map_saturates():
    # tanh saturated everywhere: J ~ 0 at z, so the penalty is ~0 whatever the probes
    m = TanhMap()
    with torch.no_grad():
        m.x.mul_(1e3)
    pen = eq.jacobian_penalty(m.f, m.z, samples=5, generator=gen(0))
    assert 0 <= float(pen.detach()) < 1e-30


# --- Jacobian penalty: gradients ----------------------------------------------------------------


@pytest.mark.parametrize("samples", [1, 3])
def test_penalty_and_its_gradients_equal_the_hand_written_estimate(samples):
    m = TanhMap()
    leaves = (m.W, m.x)
    got = eq.jacobian_penalty(m.f, m.z, samples=samples, reduction="none", generator=gen(7))
    want = m.hutchinson(samples, gen(7))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for a, b in zip(
        torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), leaves)
    ):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_penalty_affine_gradient_equals_hand_written_estimate():
    a, _, f = affine(d=5, batch=3, requires_grad=True)
    z = torch.randn(3, 5, generator=gen(1), dtype=F64)
    got = eq.jacobian_penalty(f, z, samples=2, generator=gen(3))
    g = gen(3)
    probes = [torch.randn(3, 5, generator=g, dtype=F64) for _ in range(2)]
    want = sum((e @ a).pow(2).sum(1) for e in probes).mean() / (2 * 5)  # eps^T J = eps A
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    torch.testing.assert_close(
        torch.autograd.grad(got, a)[0], torch.autograd.grad(want, a)[0], rtol=1e-12, atol=0
    )


def test_penalty_gradcheck():
    m = TanhMap(batch=2, d=4, eigs=(0.8, 0.4, -0.3, 0.1))

    def penalty(w, x):
        return eq.jacobian_penalty(
            lambda z: torch.tanh(z @ w.T + x), m.z, samples=2, generator=gen(1)
        )

    assert torch.autograd.gradcheck(penalty, (m.W, m.x))


def test_penalty_gradient_expectation_is_the_exact_gradient():
    # grad_A E||eps A||^2 / D = 2 A / D
    d = 8
    a, _, f = affine(d=d, batch=8, requires_grad=True)
    pen = eq.jacobian_penalty(f, torch.zeros(8, d, dtype=F64), samples=4000, generator=gen(9))
    grad = torch.autograd.grad(pen, a)[0]
    assert rel_err(grad, 2 * a.detach() / d) < 0.04
    # the value too, and it carries no gradient to the (detached) state
    assert abs(float(pen.detach()) / float(a.detach().pow(2).sum() / d) - 1) < 0.03


def test_penalty_detaches_the_state():
    a, _, f = affine(d=4, batch=2, requires_grad=True)
    z = torch.randn(2, 4, dtype=F64, requires_grad=True)
    pen = eq.jacobian_penalty(f, z * 2.0, generator=gen(0))
    grads = torch.autograd.grad(pen, (a, z), allow_unused=True)
    assert grads[0] is not None and grads[1] is None


# --- Solution.jacobian_penalty: the implicit backward's recorded evaluation ----------------------


class Counted:
    """f(z) = tanh(z W^T + x U^T + c), counting its calls; W, U, c, x require grad."""

    def __init__(self, seed=0):
        g = gen(seed)
        q = orthogonal(5, g)
        self.W = ((q * torch.linspace(-0.4, 0.8, 5, dtype=F64)) @ q.T).requires_grad_()
        self.U = torch.randn(5, 3, generator=g, dtype=F64).requires_grad_()
        self.c = torch.randn(5, generator=g, dtype=F64).requires_grad_()
        self.x = torch.randn(4, 3, generator=g, dtype=F64).requires_grad_()
        self.calls = 0

    @property
    def leaves(self):
        return (self.W, self.U, self.c, self.x)

    def f(self, z):
        self.calls += 1
        return torch.tanh(z @ self.W.T + self.x @ self.U.T + self.c)

    def z0(self):
        return torch.zeros(4, 5, dtype=F64)


@pytest.mark.parametrize("backward", [eq.Implicit(tol=1e-12, max_iter=200), eq.Neumann(steps=8)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_solution_penalty_reuses_the_recorded_evaluation(backward, reduction, monkeypatch):
    m = Counted()
    z, sol = eq.fixed_point(m.f, m.z0(), backward=backward, **TIGHT)
    vjps, depth = [], [0]
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        # outermost calls only: under a torch-function mode (tests/conftest.py) autograd.grad
        # re-dispatches through the patched name
        vjps.append(depth[0] == 0)
        depth[0] += 1
        try:
            return real_grad(*args, **kwargs)
        finally:
            depth[0] -= 1

    before = m.calls
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    pen = sol.jacobian_penalty(samples=3, reduction=reduction, generator=gen(9))
    monkeypatch.undo()
    assert m.calls == before  # no extra map call
    assert sum(vjps) == 3  # one VJP per probe
    ref = eq.jacobian_penalty(m.f, z, samples=3, reduction=reduction, generator=gen(9))
    assert m.calls == before + 1  # the free function evaluates the map once
    torch.testing.assert_close(pen, ref, rtol=1e-13, atol=0)
    assert pen.shape == (() if reduction == "mean" else (4,))
    for a, b in zip(
        torch.autograd.grad(pen.sum(), m.leaves), torch.autograd.grad(ref.sum(), m.leaves)
    ):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("backward", [eq.Implicit(tol=1e-12, max_iter=200), eq.Neumann(steps=8)])
def test_task_plus_penalty_in_one_backward_call(backward):
    gamma = 0.7
    m = Counted()
    z, sol = eq.fixed_point(m.f, m.z0(), backward=backward, **TIGHT)
    total = loss(z) + gamma * sol.jacobian_penalty(samples=2, generator=gen(5))
    combined = torch.autograd.grad(total, m.leaves)
    assert sol.backward.calls == 1
    # the two parts separately, from a fresh solve
    z2, sol2 = eq.fixed_point(m.f, m.z0(), backward=backward, **TIGHT)
    task = torch.autograd.grad(loss(z2), m.leaves)
    pen = eq.jacobian_penalty(m.f, sol2.value, samples=2, generator=gen(5))
    reg = torch.autograd.grad(gamma * pen, m.leaves)
    for c, t, r in zip(combined, task, reg):
        assert rel_err(c, t + r) < 1e-10
        assert float(r.abs().max()) > 1e-3 * float(t.abs().max())  # both parts matter


def test_deq_last_solution_penalty_trains_with_the_task_loss():
    cell = torch.nn.Linear(5, 5, dtype=F64)
    with torch.no_grad():
        cell.weight.mul_(0.5)
    layer = eq.DEQ(lambda z, x: torch.tanh(cell(z) + x), tol=1e-10, max_iter=100)
    x = torch.randn(4, 5, generator=gen(2), dtype=F64)
    z = layer(x)
    pen = layer.last_solution.jacobian_penalty(generator=gen(1))
    (loss(z) + pen).backward()
    assert float(cell.weight.grad.abs().max()) > 0
    ref_pen = eq.jacobian_penalty(lambda z: torch.tanh(cell(z) + x), z, generator=gen(1))
    torch.testing.assert_close(pen, ref_pen, rtol=1e-13, atol=0)


def _solution(backward, *, grad=True, closes_over_leaf=True):
    w = torch.full((3, 3), 0.1, dtype=F64).requires_grad_(closes_over_leaf)
    z0 = torch.zeros(2, 3, dtype=F64)
    with torch.set_grad_enabled(grad):
        _, sol = eq.fixed_point(lambda z: torch.tanh(z @ w.T + 1.0), z0, backward=backward)
    return sol


NO_PAIR = "no recorded map evaluation"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _solution("phantom"), id="phantom"),
        pytest.param(lambda: _solution("jfb"), id="jfb"),
        pytest.param(lambda: _solution("unrolled"), id="unrolled"),
        pytest.param(lambda: _solution("implicit", grad=False), id="no-grad"),
        pytest.param(lambda: _solution("implicit", closes_over_leaf=False), id="no-leaf"),
        pytest.param(lambda: eq.solve(lambda z: 0.5 * z + 1, torch.zeros(2, 3)), id="solve"),
    ],
)
def test_solution_penalty_needs_a_recorded_evaluation(make):
    sol = make()
    with pytest.raises(ValueError, match=NO_PAIR):
        sol.jacobian_penalty()


# --- spectral radius ---------------------------------------------------------------------------


def test_spectral_radius_symmetric_per_sample():
    prob = BatchAffine.make([0.2, 0.5, 0.9, 1.3], d=8, seed=4)
    rho = eq.spectral_radius(prob.f, prob.z0(), iters=100, generator=gen(0))
    exact = torch.linalg.eigvals(prob.A).abs().amax(1)
    assert rho.shape == (4,) and not rho.requires_grad
    assert float(((rho - exact) / exact).abs().max()) < 0.02
    assert (rho > 1).tolist() == [False, False, False, True]  # flags the diverging sample


def test_spectral_radius_of_a_tanh_map_matches_the_dense_jacobian():
    m = TanhMap(eigs=(1.2, 0.6, -0.5, 0.4, 0.2, -0.1))
    rho = eq.spectral_radius(m.f, m.z, iters=200, generator=gen(0))
    exact = []
    for b in range(m.z.shape[0]):
        jac = torch.autograd.functional.jacobian(
            lambda v, b=b: torch.tanh(v @ m.W.detach().T + m.x.detach()[b]), m.z[b]
        )
        exact.append(torch.linalg.eigvals(jac).abs().max())
    exact = torch.stack(exact)
    assert float(((rho - exact) / exact).abs().max()) < 0.02
    assert float(exact.max() / exact.min()) > 1.2  # the samples differ


def test_spectral_radius_when_the_dominant_eigenvalues_are_a_complex_pair():
    """Random real non-symmetric Jacobians: the largest |eigenvalue| is usually a complex pair,
    where the last growth factor ||J^T v|| oscillates forever (it read 1.003 for a radius of
    0.949 at any iteration count); their geometric mean converges."""
    g = gen(5)
    a = torch.randn(6, 24, 24, generator=g, dtype=F64) * (0.9 / 24**0.5)
    exact = torch.linalg.eigvals(a).abs().amax(1)
    top2 = torch.linalg.eigvals(a).abs().sort(dim=1, descending=True).values[:, :2]
    assert int(((top2[:, 0] - top2[:, 1]).abs() < 1e-12).sum()) >= 3  # mostly complex pairs

    def f(z):
        return torch.einsum("bij,bj->bi", a, z)

    z = torch.zeros(6, 24, dtype=F64)
    rho = eq.spectral_radius(f, z, iters=400, generator=gen(0))
    assert float(((rho - exact) / exact).abs().max()) < 0.01
    nilpotent = torch.diag(torch.ones(23, dtype=F64), 1).expand(6, 24, 24)  # rho = 0 exactly
    rho0 = eq.spectral_radius(lambda z: torch.einsum("bij,bj->bi", nilpotent, z), z, iters=40)
    assert rho0.tolist() == [0.0] * 6


def test_spectral_radius_on_a_tree_state():
    prob = TreeAffine.make("dict", batch=2, radius=0.9, seed=1)  # non-symmetric, real eigenvalues
    rho = eq.spectral_radius(prob.f, prob.z0(), iters=300, generator=gen(0))
    exact = float(torch.linalg.eigvals(prob.inner.A).abs().max())
    assert float(((rho - exact) / exact).abs().max()) < 0.02


def test_spectral_radius_at_a_deq_equilibrium_is_below_one():
    m = TanhMap(eigs=(0.95, 0.5, -0.4, 0.3, 0.2, -0.1))
    with torch.no_grad():
        sol = eq.solve(m.f, torch.zeros_like(m.z), tol=1e-10, max_iter=100)
    rho = eq.spectral_radius(m.f, sol.value, generator=gen(0))  # default iters
    assert bool(((rho > 0) & (rho < 0.95 + 1e-6)).all())
    # the dense spectral radius of the Jacobian at each sample's equilibrium
    z_star = sol.value
    exact = []
    for b in range(z_star.shape[0]):
        jac = torch.autograd.functional.jacobian(
            lambda v, b=b: torch.tanh(v @ m.W.detach().T + m.x.detach()[b]), z_star[b]
        )
        exact.append(torch.linalg.eigvals(jac).abs().max())
    exact = torch.stack(exact)
    assert float(((rho - exact) / exact).abs().max()) < 0.02


# --- bad input ---------------------------------------------------------------------------------

Z = torch.zeros(2, 3, dtype=F64)


def F(z):
    return 0.5 * z + 1.0


BAD = [
    (lambda: eq.jacobian_penalty(F, Z, samples=0), ValueError, "samples must be an int >= 1"),
    (lambda: eq.jacobian_penalty(F, Z, samples=1.5), TypeError, "samples must be an int"),
    (lambda: eq.jacobian_penalty(F, Z, reduction="sum"), ValueError, "reduction must be one of"),
    (lambda: eq.jacobian_penalty(F, {Z}), TypeError, "z must be a tensor, a tuple"),
    (lambda: eq.spectral_radius(F, Z, iters=0), ValueError, "iters must be an int >= 1"),
    (lambda: eq.spectral_radius(F, Z, iters=True), TypeError, "iters must be an int"),
    (lambda: eq.spectral_radius(F, Z.long()), TypeError, "must have a floating dtype"),
    (
        lambda: _solution("implicit").jacobian_penalty(samples=0),
        ValueError,
        "samples must be an int >= 1",
    ),
    (
        lambda: _solution("implicit").jacobian_penalty(reduction="sum"),
        ValueError,
        "reduction must be one of",
    ),
    # a map returning a 0-d tensor (a loss, not a state) was an IndexError from the flattening
    (
        lambda: eq.jacobian_penalty(lambda z: z.sum(), Z),
        ValueError,
        r"f\(z\) must have the shape of the state, \(2, 3\) \(batch-first\), got a 0-d tensor",
    ),
    (
        lambda: eq.jacobian_penalty(lambda z: {"a": z["a"].sum()}, {"a": Z}),
        ValueError,
        r"f\(z\)\['a'\] must have the shape of the state, \(2, 3\) .*got a 0-d tensor",
    ),
    (
        lambda: eq.jacobian_penalty(lambda z: (z[0], z[1].sum()), (Z, Z[:, :2])),
        ValueError,
        r"f\(z\)\[1\] must have the shape of the state, \(2, 2\) .*got a 0-d tensor",
    ),
    (
        lambda: eq.spectral_radius(lambda z: z.mean(), Z),
        ValueError,
        r"f\(z\) must have the shape of the state.*got a 0-d tensor",
    ),
    (
        lambda: eq.spectral_radius(lambda z: {"a": z["a"].mean()}, {"a": Z}),
        ValueError,
        r"f\(z\)\['a'\] must have the shape of the state.*got a 0-d tensor",
    ),
]


@pytest.mark.parametrize(("call", "exc", "fragment"), BAD)
def test_bad_input(call, exc, fragment):
    with pytest.raises(exc, match=fragment):
        call()


@pytest.mark.parametrize("estimate", ["penalty", "radius"])
def test_zero_jacobian_gives_zero(estimate):
    b = torch.randn(3, 4, dtype=F64, requires_grad=True)

    def f(z):
        return b * 1.0  # ignores z

    if estimate == "penalty":
        value = eq.jacobian_penalty(f, torch.zeros(3, 4, dtype=F64), reduction="none")
    else:
        value = eq.spectral_radius(f, torch.zeros(3, 4, dtype=F64))
    assert torch.equal(value.detach(), torch.zeros(3, dtype=F64))
