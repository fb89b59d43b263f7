"""Diagnostics: what a Solution records, convergence plots, gradient agreement, warnings.

``gradient_agreement`` is checked against a cosine computed here from the two gradients, and on
known behaviour: the Neumann series approaches the exact gradient as its number of terms grows,
while the one-step (JFB) gradient is clearly off when the Jacobian is strong.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from _problems import F64, Tanh, gen, loss, orthogonal, residual
from torch import nn

import equilibria as eq
from equilibria._backward import resolve_backward


class Cell(nn.Module):
    """f(z, x) = tanh(W z + inj(x)) with a symmetric W whose largest eigenvalue is ``strength``."""

    def __init__(self, d=6, dx=3, strength=0.9, seed=0):
        super().__init__()
        g = gen(seed)
        q = orthogonal(d, g)
        self.W = nn.Parameter((q * torch.linspace(-0.3, strength, d, dtype=F64)) @ q.T)
        self.inj = nn.Linear(dx, d, dtype=F64)
        with torch.no_grad():
            self.inj.weight.copy_(torch.randn(d, dx, generator=g, dtype=F64))
            self.inj.bias.copy_(0.1 * torch.randn(d, generator=g, dtype=F64))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + self.inj(x))


def _init(x):
    return x.new_zeros(x.shape[0], 6)


def _x(batch=8, seed=1):
    return torch.randn(batch, 3, generator=gen(seed), dtype=F64)


@pytest.fixture
def plt():
    """matplotlib.pyplot on the headless Agg backend (matplotlib is an optional extra)."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    yield pyplot
    pyplot.close("all")


# --- what a Solution records -------------------------------------------------------------------


@pytest.mark.parametrize("stop", ["abs", "rel"])
@pytest.mark.parametrize("solver", eq.SOLVERS)
def test_solution_traces_are_the_residuals(solver, stop):
    prob = Tanh.make(batch=5, d=6, norm=0.9)
    sol = eq.solve(prob.f, prob.z0(), solver=solver, stop=stop, tol=1e-10, max_iter=100)
    assert sol.residuals.shape == (sol.nstep, 5) and sol.trace.shape == (sol.nstep,)
    assert sol.trace.dtype == sol.residuals.dtype == F64 and sol.trace.device.type == "cpu"
    torch.testing.assert_close(sol.trace, sol.residuals.amax(1), rtol=0, atol=0)
    # the first row is the residual of z0, recomputed here
    first = residual(prob.f, prob.z0(), stop)
    torch.testing.assert_close(sol.residuals[0], first, rtol=1e-12, atol=0)
    # the reported residual is the best per sample, and it is the residual of sol.value
    torch.testing.assert_close(sol.residual, sol.residuals.amin(0), rtol=0, atol=0)
    at_value = residual(prob.f, sol.value, stop)
    torch.testing.assert_close(sol.residual, at_value, rtol=1e-6, atol=1e-15)
    assert sol.all_converged and float(sol.trace[-1]) < sol.tol < float(sol.trace[0])


# --- plot_convergence --------------------------------------------------------------------------


def test_plot_convergence_forward_and_adjoint(plt):
    layer = eq.DEQ(Cell(), init=_init, tol=1e-8, max_iter=100)
    z = layer(_x())
    sol = layer.last_solution
    ax = eq.plot_convergence(sol)
    # 8 thin sample lines + the bold batch maximum + the dotted tol line
    assert len(ax.lines) == 8 + 2
    bold = [line for line in ax.lines if line.get_label().startswith("forward")]
    assert len(bold) == 1
    assert list(bold[0].get_ydata()) == pytest.approx(sol.trace.tolist(), rel=1e-12)
    assert list(bold[0].get_xdata()) == list(range(1, sol.nstep + 1))
    assert ax.get_yscale() == "log" and "rel" in ax.get_ylabel()
    assert f"{sol.nstep} it" in bold[0].get_label()
    loss(z).backward()  # now the adjoint solve ran: its curves join
    ax = eq.plot_convergence(sol)
    assert len(ax.lines) == 2 * (8 + 2)
    adjoint = [line for line in ax.lines if line.get_label().startswith("backward")]
    assert len(adjoint) == 1 and len(adjoint[0].get_xdata()) == sol.backward.nstep
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == 2
    ax.figure.canvas.draw()  # renders headless


def test_plot_convergence_options(plt):
    layer = eq.DEQ(Cell(), init=_init, tol=1e-8, max_iter=100)
    loss(layer(_x())).backward()
    sol = layer.last_solution
    _, ax = plt.subplots()
    out = eq.plot_convergence(sol, ax, samples=False, backward=False, title="mine")
    assert out is ax and ax.get_title() == "mine"
    assert len(ax.lines) == 2  # batch maximum + tol
    ax2 = eq.plot_convergence(sol, samples=False)
    assert len(ax2.lines) == 4 and ax2 is not ax


def test_plot_convergence_with_compaction_nans(plt):
    x = _x()
    x[:6] *= 30  # six easy samples leave the batch early
    layer = eq.DEQ(Cell(), init=_init, tol=1e-10, max_iter=100, compact=True)
    with torch.no_grad():
        layer(x)
    sol = layer.last_solution
    assert bool(torch.isnan(sol.residuals).any())
    ax = eq.plot_convergence(sol)
    assert len(ax.lines) == 8 + 2
    ax.figure.canvas.draw()


@pytest.mark.parametrize("bad", [None, "solution", torch.zeros(3), (1, 2)])
def test_plot_convergence_bad_input(bad, plt):
    with pytest.raises(TypeError, match="sol must be an equilibria Solution"):
        eq.plot_convergence(bad)


# --- gradient_agreement ------------------------------------------------------------------------


def _setup(strength=0.9):
    cell = Cell(strength=strength)
    x = _x()
    layer = eq.DEQ(cell, init=_init, tol=1e-11, max_iter=200)

    def loss_of(backward):
        with layer.using(backward):
            return loss(layer(x))

    return cell, layer, loss_of


def _flat_grads(loss_of, backward, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss_of(backward), params)])


@pytest.mark.parametrize(
    "backward", ["jfb", eq.Phantom(steps=5, damping=0.5), eq.Neumann(steps=4, damping=1.0)]
)
def test_gradient_agreement_matches_a_hand_computed_cosine(backward):
    cell, _, loss_of = _setup()
    params = list(cell.parameters())
    reference = eq.Implicit(tol=1e-11, max_iter=200)
    got = eq.gradient_agreement(loss_of, params, backward, reference=reference)
    a = _flat_grads(loss_of, resolve_backward(backward), params)
    b = _flat_grads(loss_of, reference, params)
    cosine = float(a @ b / (a.norm() * b.norm()))
    assert got.cosine == pytest.approx(cosine, rel=1e-10)
    assert got.relative_error == pytest.approx(float((a - b).norm() / b.norm()), rel=1e-10)
    assert got.norm_ratio == pytest.approx(float(a.norm() / b.norm()), rel=1e-10)
    assert len(got.per_parameter) == len(params)
    assert all(-1 <= c <= 1 for c in got.per_parameter)
    assert got.cosine < 0.9999  # inexact methods are visibly inexact here


def test_gradient_agreement_implicit_against_implicit():
    cell, _, loss_of = _setup()
    got = eq.gradient_agreement(loss_of, cell.parameters(), eq.Implicit(tol=1e-10))
    assert got.cosine > 0.9999 and got.relative_error < 1e-6
    assert got.norm_ratio == pytest.approx(1.0, abs=1e-6)


def test_gradient_agreement_gives_both_losses_the_same_random_draws():
    """A training-mode model with dropout: the two losses drew different masks, so a method
    compared with itself read cosine 0.8; both now start from one RNG state, which then moves on
    as after a single loss."""
    torch.manual_seed(0)
    lin, drop = nn.Linear(8, 8, dtype=F64), eq.VariationalDropout(0.2)
    layer = eq.DEQ(lambda z, x: drop(0.5 * torch.tanh(lin(z))) + x, tol=1e-10, max_iter=200)
    layer.train()
    x = torch.randn(4, 8, dtype=F64)

    def loss_of(backward):
        with layer.using(backward):
            return layer(x).pow(2).sum()

    exact = eq.Implicit(tol=1e-11, max_iter=300)
    state = torch.get_rng_state()
    got = eq.gradient_agreement(loss_of, lin.parameters(), exact, reference=exact)
    assert got.cosine == pytest.approx(1.0, abs=1e-12) and got.relative_error < 1e-12
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    loss_of(exact)
    assert torch.equal(torch.get_rng_state(), after)


def test_gradient_agreement_neumann_converges_to_the_exact_gradient():
    cell, _, loss_of = _setup()
    params = list(cell.parameters())
    results = [
        eq.gradient_agreement(loss_of, params, eq.Neumann(steps=k, damping=1.0))
        for k in (1, 2, 4, 8, 16, 32, 128)
    ]
    errors = [r.relative_error for r in results]
    assert all(a > b for a, b in itertools.pairwise(errors))
    assert results[0].cosine < 0.95
    assert results[-1].cosine > 0.9999 and errors[-1] < 1e-6


def test_gradient_agreement_jfb_is_off_for_a_strong_jacobian():
    strong = _setup(strength=0.9)
    weak = _setup(strength=0.2)
    jfb = [
        eq.gradient_agreement(loss_of, cell.parameters(), "jfb")
        for cell, _, loss_of in (strong, weak)
    ]
    assert jfb[0].cosine < 0.95 and jfb[0].relative_error > 0.3
    assert jfb[1].cosine > jfb[0].cosine  # the weaker the Jacobian, the better one step is


def test_gradient_agreement_restores_the_layer_backward():
    cell, layer, loss_of = _setup()
    eq.gradient_agreement(loss_of, cell.parameters(), "phantom")
    assert isinstance(layer.backward, eq.Implicit)


def test_gradient_agreement_unused_parameter_gives_nan():
    cell, _, loss_of = _setup()
    unused = torch.zeros(3, dtype=F64, requires_grad=True)
    got = eq.gradient_agreement(loss_of, [cell.W, unused], "jfb")
    assert math.isfinite(got.per_parameter[0]) and math.isnan(got.per_parameter[1])
    assert math.isfinite(got.cosine)


def _scalar(b):
    return torch.zeros(2, dtype=F64, requires_grad=True).sum()


AGREEMENT_BAD = [
    (lambda: eq.gradient_agreement(_scalar, [], "jfb"), ValueError, "at least one tensor"),
    (
        lambda: eq.gradient_agreement(
            lambda b: torch.ones(2, dtype=F64, requires_grad=True) * 2, [torch.ones(1)], "jfb"
        ),
        ValueError,
        "must return a scalar tensor",
    ),
    (
        lambda: eq.gradient_agreement(_scalar, [torch.ones(1)], "exact"),
        ValueError,
        "unknown backward 'exact'",
    ),
    (
        lambda: eq.gradient_agreement(lambda b: 1.0, [torch.ones(1)], "jfb"),
        ValueError,
        "must return a scalar tensor",
    ),
    (  # the reference was used unchecked: a bad one failed inside the user's loss
        lambda: eq.gradient_agreement(_scalar, [torch.ones(1)], "jfb", reference="exact"),
        ValueError,
        "unknown reference 'exact'",
    ),
    (
        lambda: eq.gradient_agreement(_scalar, [torch.ones(1)], "jfb", reference=1e-8),
        TypeError,
        "reference must be a name",
    ),
]


@pytest.mark.parametrize(("call", "exc", "fragment"), AGREEMENT_BAD)
def test_gradient_agreement_bad_input(call, exc, fragment):
    with pytest.raises(exc, match=fragment):
        call()


# --- DEQ.using ---------------------------------------------------------------------------------


def test_using_switches_and_restores_the_backward():
    layer = eq.DEQ(Cell(), init=_init, backward=eq.Phantom(steps=3))
    saved = layer.backward
    with layer.using("neumann") as same:
        assert same is layer and isinstance(layer.backward, eq.Neumann)
        loss(layer(_x())).backward()
        assert layer.last_solution.backward.method == "neumann"
    assert layer.backward is saved
    with pytest.raises(RuntimeError, match="inside"), layer.using(eq.JFB()):
        assert isinstance(layer.backward, eq.JFB)
        raise RuntimeError("inside")
    assert layer.backward is saved
    with pytest.raises(ValueError, match="unknown backward 'exact'"), layer.using("exact"):
        pass
    assert layer.backward is saved


# --- warnings ----------------------------------------------------------------------------------


def test_warn_unconverged_deq():
    layer = eq.DEQ(Cell(), init=_init, solver="picard", max_iter=3, warn_unconverged=True)
    with pytest.warns(RuntimeWarning, match=r"status 'max_iter' after 3 iterations: \d+ of 8"):
        layer(_x())
    assert layer.last_solution.status is eq.Status.MAX_ITER


def test_warn_unconverged_deq_with_states():
    layer = eq.DEQ(
        Cell(), init=_init, solver="picard", backward="jfb", max_iter=3, warn_unconverged=True
    )
    with pytest.warns(RuntimeWarning, match="status 'max_iter'"):
        layer(_x(), states=2)
    assert layer.last_solution.status is eq.Status.MAX_ITER


def test_warn_unconverged_solve_and_fixed_point():
    prob = Tanh.make(batch=4, d=6, norm=0.9)
    with pytest.warns(RuntimeWarning, match="the solve ended with status 'max_iter'"):
        eq.solve(prob.f, prob.z0(), max_iter=2, warn_unconverged=True)
    with pytest.warns(RuntimeWarning, match="the forward solve ended with status 'max_iter'"):
        eq.fixed_point(prob.f, prob.z0(), max_iter=2, warn_unconverged=True)


def test_warn_unconverged_adjoint():
    cell = Cell()
    layer = eq.DEQ(
        cell, init=_init, tol=1e-10, backward=eq.Implicit(max_iter=2, warn_unconverged=True)
    )
    z = layer(_x())
    with pytest.warns(RuntimeWarning, match="the implicit backward solve ended with status"):
        loss(z).backward()
    assert layer.last_solution.backward.solution.status is eq.Status.MAX_ITER


def test_no_warning_when_converged():
    prob = Tanh.make(batch=4, d=6, norm=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = eq.solve(prob.f, prob.z0(), tol=1e-8, max_iter=100, warn_unconverged=True)
        layer = eq.DEQ(Cell(), init=_init, tol=1e-8, warn_unconverged=True)
        loss(layer(_x())).backward()
    assert sol.all_converged
