"""Gradients of equilibria, in float64, checked against independent references.

* implicit vs the dense analytic gradient (autograd through ``torch.linalg.solve`` and the hand
  written IFT formula), for parameters and the input, every forward x adjoint solver;
* ``torch.autograd.gradcheck`` through ``fixed_point`` with the implicit backward;
* Neumann and phantom gradients approach the exact one as the number of steps grows;
* JFB equals (df/dtheta)^T g computed by hand;
* unrolled equals autograd through a hand-written loop of the same solver;
* the implicit backward's contract: a module-level ``autograd.Function`` (no hooks), several calls
  before one backward, ``no_grad``, the reported backward statistics.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from _problems import (
    BACKWARD_NAMES,
    DEVICE,
    F64,
    SOLVER_NAMES,
    AffineParams,
    Tanh,
    TreeAffine,
    assert_grads_close,
    has_node,
    loss,
    rel_err,
    residual,
)
from torch import nn

import equilibria as eq
from equilibria._backward import BACKWARDS, _Adjoint

TIGHT = {"tol": 1e-12, "max_iter": 500}


def tight_implicit(solver: str = "anderson") -> eq.Implicit:
    return eq.Implicit(solver=solver, tol=1e-12, max_iter=500)


# --- implicit vs dense analytic --------------------------------------------------------------


def test_registry_matches_public_names():
    assert set(BACKWARDS) == set(eq.BACKWARDS)
    for name, cls in BACKWARDS.items():
        assert issubclass(cls, eq.Backward)
        assert cls.name == name and cls().name == name


@pytest.mark.parametrize("adjoint_solver", SOLVER_NAMES)
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_implicit_matches_dense_gradient(solver, adjoint_solver):
    p = AffineParams.make(radius=0.9, seed=1)
    z, sol = eq.fixed_point(
        p.f, p.z0(), solver=solver, backward=tight_implicit(adjoint_solver), **TIGHT
    )
    assert sol.status is eq.Status.CONVERGED
    got = p.grads(loss(z))
    want = p.grads(loss(p.dense()))
    assert_grads_close(got, want, 1e-6)
    assert sol.backward.method == "implicit"
    assert bool(sol.backward.converged.all())
    # the adjoint was solved by the solver asked for, not by a default
    assert sol.backward.solution.solver == adjoint_solver


@pytest.mark.parametrize("stop", ["abs", "rel"])
def test_implicit_matches_hand_written_ift(stop):
    # dL/dW = sum_b u_b z*_b^T, dL/dU = sum_b u_b x_b^T, dL/dc = sum_b u_b, dL/dx_b = U^T u_b
    # with u_b = (I - W^T)^{-1} g_b
    p = AffineParams.make(radius=0.95, seed=2, d=6, batch=3)
    backward = eq.Implicit(tol=1e-12, max_iter=500, stop=stop)
    z, sol = eq.fixed_point(p.f, p.z0(), backward=backward, stop=stop, **TIGHT)
    got = p.grads(loss(z))
    with torch.no_grad():
        zs = p.dense()
        zz = zs.clone().requires_grad_()
        with torch.enable_grad():
            gbar = torch.autograd.grad(loss(zz), zz)[0]
        eye = torch.eye(6, dtype=F64)
        u = torch.linalg.solve(eye - p.W.T, gbar.T).T  # (B, D)
        want = (u.T @ zs, u.T @ p.x, u.sum(0), u @ p.U)
    assert_grads_close(got, want, 1e-6)
    adjoint = sol.backward.solution
    assert adjoint.stop == stop and adjoint.status is eq.Status.CONVERGED
    torch.testing.assert_close(adjoint.value, u, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("stop", ["abs", "rel"])
def test_implicit_adjoint_stops_in_its_own_norm(stop):
    # the adjoint solve u = W^T u + g with Picard is a hand-written loop: it must stop at the first
    # iterate whose residual is below tol in the adjoint's stop norm (whatever the forward's), and
    # report that residual; ||u|| is far from 1, so the abs and rel norms stop at different steps
    p = AffineParams.make(radius=0.9, seed=5, d=5, batch=3)
    tol = 1e-6
    backward = eq.Implicit(solver="picard", tol=tol, max_iter=500, stop=stop)
    other = "rel" if stop == "abs" else "abs"
    z, sol = eq.fixed_point(p.f, p.z0(), backward=backward, stop=other, **TIGHT)
    gbar = 50.0 * torch.ones_like(z)
    z.backward(gbar)
    adjoint = sol.backward.solution
    assert adjoint.solver == "picard" and adjoint.stop == stop
    assert adjoint.status is eq.Status.CONVERGED

    def adjoint_map(v):
        return v @ p.W.detach() + gbar

    with torch.no_grad():
        u, steps = gbar, 1
        while float(residual(adjoint_map, u, stop).max()) >= tol:
            u, steps = adjoint_map(u), steps + 1
        other_steps, v = 1, gbar
        while float(residual(adjoint_map, v, other).max()) >= tol:
            v, other_steps = adjoint_map(v), other_steps + 1
    assert steps != other_steps, "the problem does not tell the norms apart"
    assert adjoint.nstep == steps, (adjoint.nstep, steps)
    torch.testing.assert_close(adjoint.value, u, rtol=1e-12, atol=0)
    want_r = residual(adjoint_map, adjoint.value, stop)
    torch.testing.assert_close(adjoint.residual, want_r, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_implicit_gradient_for_tree_states(kind):
    p = TreeAffine.make(kind, batch=3, radius=0.9, seed=3)
    a = p.inner.A.clone().requires_grad_()
    b = p.inner.b.clone().requires_grad_()

    def f(z):
        return p.split(p.join(z) @ a.T + b)

    z, _ = eq.fixed_point(f, p.z0(), backward=tight_implicit(), **TIGHT)
    assert type(z) is type(p.z0())
    flat = p.join(z)
    eye = torch.eye(7, dtype=F64)
    dense = torch.linalg.solve(eye - a, b.T).T
    got = torch.autograd.grad(loss(flat), (a, b))
    want = torch.autograd.grad(loss(dense), (a, b))
    assert_grads_close(got, want, 1e-6)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_gradcheck_implicit(solver):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 3, generator=g, dtype=F64)
    w = (0.6 * w / torch.linalg.matrix_norm(w, ord=2)).requires_grad_()
    x = torch.randn(2, 3, generator=g, dtype=F64).requires_grad_()

    def layer(w, x):
        z, _ = eq.fixed_point(
            lambda z: torch.tanh(z @ w.T + x),
            torch.zeros(2, 3, dtype=F64),
            solver=solver,
            backward=tight_implicit(solver),
            **TIGHT,
        )
        return z

    assert torch.autograd.gradcheck(layer, (w, x), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_implicit_tuple_output():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 4, generator=g, dtype=F64)
    w = (0.5 * w / torch.linalg.matrix_norm(w, ord=2)).requires_grad_()
    x = torch.randn(2, 4, generator=g, dtype=F64).requires_grad_()

    def layer(w, x):
        def f(z):
            h = torch.tanh(torch.cat(z, 1) @ w.T + x)
            return h[:, :1], h[:, 1:]

        z0 = (torch.zeros(2, 1, dtype=F64), torch.zeros(2, 3, dtype=F64))
        z, _ = eq.fixed_point(f, z0, backward=tight_implicit(), **TIGHT)
        return z

    assert torch.autograd.gradcheck(layer, (w, x), eps=1e-6, atol=1e-7, rtol=1e-5)


# --- inexact gradients ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["phantom", "neumann"])
def test_phantom_and_neumann_approach_exact_gradient(name):
    # symmetric W with radius 0.5 and damping 0.8: (1 - lam) I + lam J has radius 0.6, so the
    # truncation error of k steps shrinks like 0.6^k
    p = AffineParams.make(radius=0.5, seed=6, symmetric=True)
    weight = torch.randn(4, 5, dtype=F64)  # a linear loss: the same upstream gradient everywhere
    want = p.grads((weight * p.dense()).sum())
    errors = []
    for steps in (1, 2, 4, 8, 16, 32, 64):
        method = BACKWARDS[name](steps=steps, damping=0.8)
        z, _ = eq.fixed_point(p.f, p.z0(), backward=method, **TIGHT)
        got = p.grads((weight * z).sum())
        errors.append(max(rel_err(a, b) for a, b in zip(got, want)))
    assert all(b < 0.7 * a for a, b in itertools.pairwise(errors[:5])), errors
    assert all(b <= a * 1.01 + 1e-12 for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 0.05  # the one-step gradient is far off: the test can fail
    assert errors[-1] < 1e-9, errors


def test_neumann_one_step_is_damped_jfb():
    p = AffineParams.make(seed=7)
    z, _ = eq.fixed_point(p.f, p.z0(), backward=eq.Neumann(steps=1, damping=0.3), **TIGHT)
    got = p.grads(loss(z))
    z, _ = eq.fixed_point(p.f, p.z0(), backward="jfb", **TIGHT)
    want = p.grads(loss(z))
    assert_grads_close(got, [0.3 * w for w in want], 1e-9)


def test_jfb_is_df_dtheta_transpose_g():
    p = AffineParams.make(seed=8)
    z, sol = eq.fixed_point(p.f, p.z0(), backward=eq.JFB(), **TIGHT)
    zs = sol.value
    torch.testing.assert_close(z.detach(), p.f(zs).detach(), rtol=0, atol=0)
    got = p.grads(loss(z))
    zz = z.detach().requires_grad_()
    gbar = torch.autograd.grad(loss(zz), zz)[0]
    want = (gbar.T @ zs, gbar.T @ p.x.detach(), gbar.sum(0), gbar @ p.U.detach())
    assert_grads_close(got, want, 1e-12)


def test_jfb_equals_one_undamped_phantom_step():
    p = AffineParams.make(seed=9)
    z1, _ = eq.fixed_point(p.f, p.z0(), backward="jfb", **TIGHT)
    z2, _ = eq.fixed_point(p.f, p.z0(), backward=eq.Phantom(steps=1, damping=1.0), **TIGHT)
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)
    assert_grads_close(p.grads(loss(z1)), p.grads(loss(z2)), 1e-14)


def test_phantom_is_backprop_through_damped_steps_from_the_equilibrium():
    p = AffineParams.make(seed=10)
    z, sol = eq.fixed_point(p.f, p.z0(), backward=eq.Phantom(steps=3, damping=0.6), **TIGHT)
    h = sol.value
    for _ in range(3):
        h = h + 0.6 * (p.f(h) - h)
    torch.testing.assert_close(z, h, rtol=1e-14, atol=0)
    assert_grads_close(p.grads(loss(z)), p.grads(loss(h)), 1e-12)


# --- unrolled ---------------------------------------------------------------------------------


def test_unrolled_is_autograd_through_the_picard_loop():
    p = AffineParams.make(radius=0.9, seed=11, symmetric=True)
    z0 = torch.randn(4, 5, dtype=F64).requires_grad_()
    n = 15
    z, sol = eq.fixed_point(
        p.f,
        z0,
        solver=eq.Picard(damping=0.7),
        backward="unrolled",
        tol=1e-300,
        max_iter=n,
        stop="abs",
    )
    assert sol.nstep == n and sol.status is eq.Status.MAX_ITER
    h = z0
    for _ in range(n - 1):  # nstep counts z0
        h = h + 0.7 * (p.f(h) - h)
    torch.testing.assert_close(z, h, rtol=1e-13, atol=0)
    leaves = (*p.leaves, z0)
    got = torch.autograd.grad(loss(z), leaves)
    want = torch.autograd.grad(loss(h), leaves)
    assert_grads_close(got, want, 1e-12)
    assert float(got[-1].abs().max()) > 1e-3  # z0 receives a gradient through the loop


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_unrolled_converged_is_close_to_implicit(solver):
    p = AffineParams.make(radius=0.8, seed=12)
    z, sol = eq.fixed_point(p.f, p.z0(), solver=solver, backward="unrolled", **TIGHT)
    assert sol.status is eq.Status.CONVERGED
    assert sol.backward.method == "unrolled"
    got = p.grads(loss(z))
    want = p.grads(loss(p.dense()))
    assert_grads_close(got, want, 1e-6)


@pytest.mark.parametrize("name", BACKWARD_NAMES)
def test_gradient_reaches_z0_only_when_unrolled(name):
    p = AffineParams.make(seed=13)
    z0 = torch.randn(4, 5, dtype=F64).requires_grad_()
    z, _ = eq.fixed_point(p.f, z0, backward=name, tol=1e-6, max_iter=30, solver="picard")
    gz0, gw = torch.autograd.grad(loss(z), (z0, p.W), allow_unused=True)
    assert gw is not None and float(gw.abs().max()) > 0
    if name == "unrolled":
        assert gz0 is not None and float(gz0.abs().max()) > 0
    else:
        assert gz0 is None or float(gz0.abs().max()) == 0.0


@pytest.mark.parametrize("name", BACKWARD_NAMES)
def test_every_backward_runs_on_tree_states_and_reaches_every_parameter(name):
    p = TreeAffine.make("dict", batch=2, radius=0.7, seed=14)
    a = p.inner.A.clone().requires_grad_()
    b = p.inner.b.clone().requires_grad_()

    def f(z):
        return p.split(p.join(z) @ a.T + b)

    z, _ = eq.fixed_point(f, p.z0(), backward=name, tol=1e-8, max_iter=100)
    ga, gb = torch.autograd.grad(loss(p.join(z)), (a, b))
    assert float(ga.abs().max()) > 0 and float(gb.abs().max()) > 0


# --- the implicit backward's contract -------------------------------------------------------


def test_implicit_uses_the_module_level_function_and_no_hooks():
    p = AffineParams.make(seed=15)
    z, _ = eq.fixed_point(p.f, p.z0(), backward="implicit")
    assert has_node(z.grad_fn, _Adjoint._backward_cls)
    assert not z._backward_hooks
    for leaf in p.leaves:
        assert not leaf._backward_hooks


def test_layer_called_twice_before_one_backward():
    p = AffineParams.make(seed=16)
    x2 = torch.randn(4, 3, dtype=F64).requires_grad_()
    backward = tight_implicit()

    def call(x):
        return eq.fixed_point(
            lambda z: z @ p.W.T + x @ p.U.T + p.c, p.z0(), backward=backward, **TIGHT
        )

    leaves = (p.W, p.U, p.c, p.x, x2)
    z1, s1 = call(p.x)
    z2, s2 = call(x2)
    both = torch.autograd.grad(loss(z1) + 2 * loss(z2), leaves, allow_unused=True)
    assert s1.backward.calls == 1 and s2.backward.calls == 1
    one = torch.autograd.grad(loss(call(p.x)[0]), leaves, allow_unused=True)
    two = torch.autograd.grad(2 * loss(call(x2)[0]), leaves, allow_unused=True)
    for i, (g, g1, g2) in enumerate(zip(both, one, two)):
        want = (0 if g1 is None else g1) + (0 if g2 is None else g2)
        assert rel_err(g, want) < 1e-10, i


def test_same_input_twice_in_one_graph():
    p = AffineParams.make(seed=17)
    z1, _ = eq.fixed_point(p.f, p.z0(), backward=tight_implicit(), **TIGHT)
    z2, _ = eq.fixed_point(p.f, p.z0(), backward=tight_implicit(), **TIGHT)
    got = p.grads(loss(z1) + loss(z2))
    want = p.grads(2 * loss(p.dense()))
    assert_grads_close(got, want, 1e-6)


def test_no_graph_under_no_grad():
    p = AffineParams.make(seed=18)
    for name in BACKWARD_NAMES:
        with torch.no_grad():
            z, sol = eq.fixed_point(p.f, p.z0(), backward=name)
        assert not z.requires_grad and z.grad_fn is None, name
        assert sol.backward.method is None
        torch.testing.assert_close(z, p.dense().detach(), rtol=1e-3, atol=1e-3)


def test_no_graph_when_nothing_requires_grad():
    p = Tanh.make(seed=19)
    z, sol = eq.fixed_point(p.f, p.z0(), backward="implicit")
    assert not z.requires_grad
    torch.testing.assert_close(z, sol.value, rtol=0, atol=0)


def test_backward_statistics_are_reported():
    p = AffineParams.make(radius=0.9, seed=20)
    z, sol = eq.fixed_point(p.f, p.z0(), backward=eq.Implicit(tol=1e-8, max_iter=100))
    assert sol.backward.method == "implicit" and sol.backward.calls == 0
    assert sol.backward.nstep is None and sol.backward.residual is None
    out = loss(z)
    out.backward(retain_graph=True)
    info = sol.backward
    assert info.calls == 1
    assert isinstance(info.solution, eq.Solution)
    assert info.nstep == info.solution.nstep > 1
    assert info.residual.shape == (4,) and float(info.residual.max()) < 1e-8
    assert info.converged.tolist() == [True] * 4
    assert info.solution.trace.shape == (info.nstep,)
    # the adjoint is the solution of u = J^T u + g
    zz = z.detach().requires_grad_()
    gbar = torch.autograd.grad(loss(zz), zz)[0]
    u = info.solution.value
    image = u @ p.W.detach() + gbar  # J^T u + g
    r = torch.linalg.vector_norm(image - u, dim=1) / torch.linalg.vector_norm(image, dim=1)
    torch.testing.assert_close(info.residual, r, rtol=1e-6, atol=0)
    out.backward()
    assert info.calls == 2
    assert "implicit" in repr(info) and "calls=2" in repr(info)


@pytest.mark.parametrize(
    ("backward", "why"),
    [("implicit", "a solved fixed point"), ("neumann", "a truncated series")],
)
def test_double_backward_through_a_solved_adjoint_raises(backward, why):
    # a second derivative through the adjoint would treat it as a constant and be silently
    # wrong; first derivatives under the same call still work
    p = AffineParams.make(seed=24)
    z, _ = eq.fixed_point(p.f, p.z0(), backward=backward)
    match = f"backward={backward!r} gives first derivatives only: its adjoint is {why}"
    with pytest.raises(NotImplementedError, match=match):
        torch.autograd.grad(loss(z), p.W, create_graph=True)
    z, _ = eq.fixed_point(p.f, p.z0(), backward=backward)
    assert torch.autograd.grad(loss(z), p.W)[0].shape == p.W.shape


def test_second_derivatives_through_unrolled_match_the_dense_solution():
    # the unrolled backward supports double backward; its Hessian-vector product matches the one
    # of the closed-form equilibrium z* = (I - W)^-1 (U x + c)
    p = AffineParams.make(seed=25, radius=0.5)
    z, _ = eq.fixed_point(p.f, p.z0(), backward="unrolled", tol=1e-14, max_iter=200)
    g = torch.autograd.grad(loss(z), p.W, create_graph=True)[0]
    got = torch.autograd.grad(g.pow(2).sum(), p.W)[0]
    g_ref = torch.autograd.grad(loss(p.dense()), p.W, create_graph=True)[0]
    want = torch.autograd.grad(g_ref.pow(2).sum(), p.W)[0]
    assert rel_err(got, want) < 1e-8


def test_no_grad_output_does_not_share_storage_with_the_solution():
    p = AffineParams.make(seed=26)
    with torch.no_grad():
        z, sol = eq.fixed_point(p.f, p.z0())
    before = sol.value.clone()
    z.add_(100.0)
    assert torch.equal(sol.value, before)


def test_no_grad_states_share_no_storage_with_the_solution_z0_or_each_other():
    # the best iterate is an early one (the map contracts for 3 calls, then expands), so a pick
    # of the trajectory is the tensor that sol.value came from; the first pick is z0's iterate
    calls = [0]

    def f(z):
        calls[0] += 1
        return 0.5 * z if calls[0] <= 3 else -3.0 * z

    z0 = torch.ones(1, 2, dtype=F64)
    with torch.no_grad():
        zs, sol = eq.fixed_point_states(f, z0, 5, solver="picard", tol=1e-12, max_iter=5)
    before, z0_before = sol.value.clone(), z0.clone()
    for z in zs:
        z.mul_(100.0)
    assert torch.equal(sol.value, before) and torch.equal(z0, z0_before)
    assert len({z.data_ptr() for z in zs}) == len(zs)


def test_neumann_reports_method_and_calls():
    p = AffineParams.make(seed=21)
    z, sol = eq.fixed_point(p.f, p.z0(), backward=eq.Neumann(steps=3))
    loss(z).backward()
    assert sol.backward.method == "neumann" and sol.backward.calls == 1
    assert sol.backward.solution is None


@pytest.mark.parametrize("backward", ["phantom", "jfb", "unrolled"])
def test_autograd_methods_report_their_name_without_a_call_count(backward):
    # their backward is plain autograd through map calls: nothing to count, so nothing printed
    p = AffineParams.make(seed=23)
    z, sol = eq.fixed_point(p.f, p.z0(), backward=backward)
    loss(z).backward()
    assert sol.backward.method == backward and sol.backward.solution is None
    assert repr(sol.backward) == f"BackwardInfo(method={backward!r})"


def test_implicit_gradient_for_input_only():
    # only x requires grad: the gradient reaches it through (df/dx)^T u
    p = AffineParams.make(seed=22)
    w, u, c = (t.detach() for t in (p.W, p.U, p.c))
    x = p.x
    z, _ = eq.fixed_point(
        lambda z: z @ w.T + x @ u.T + c, p.z0(), backward=tight_implicit(), **TIGHT
    )
    got = torch.autograd.grad(loss(z), x)[0]
    want = torch.autograd.grad(loss(p.dense()), x)[0]
    assert rel_err(got, want) < 1e-6


class _FreshNode:
    """A stand-in autograd node whose children are new Python objects on every access, as torch
    2.11's wrappers of C++ nodes can be: a freed wrapper's id is then reused by the next one."""

    def __init__(self, depth, leaf):
        self.depth, self.leaf = depth, leaf

    @property
    def next_functions(self):
        if self.depth == 0:
            return ((SimpleNamespace(variable=self.leaf, next_functions=()), 0),)
        return ((_FreshNode(self.depth - 1, self.leaf), 0), (None, 0))


@pytest.mark.parametrize("depth", [0, 1, 3, 6])
def test_adjoint_is_attached_when_node_wrappers_are_short_lived(depth):
    # the walk that decides whether f closes over anything needing a gradient once keyed visited
    # nodes by id alone and, on torch 2.11, skipped the parameters: implicit/Neumann gradients
    # silently vanished
    from equilibria._backward import _reaches_other_leaves

    class Output:  # a new root wrapper on every access too
        def __init__(self, leaf):
            self.leaf = leaf

        @property
        def grad_fn(self):
            return _FreshNode(depth, self.leaf)

    zr, param = object(), object()
    assert _reaches_other_leaves(Output(param), zr)
    assert not _reaches_other_leaves(Output(zr), zr)


# --- review findings: non-finite upstream gradients, maps that ignore the state ----------------


def test_implicit_passes_a_non_finite_upstream_gradient_on():
    """GradScaler's protocol: an overflowing loss sends inf/NaN down, and the scaler must find it
    in the parameter gradients to skip the step; the adjoint solve used to raise instead."""
    prob = Tanh.make(batch=3, d=4, norm=0.5)
    w = prob.W.clone().requires_grad_()
    z, sol = eq.fixed_point(lambda z: torch.tanh(z @ w.T + prob.x), prob.z0(), tol=1e-10)
    upstream = torch.ones_like(z)
    upstream[1, 2] = float("inf")
    (grad,) = torch.autograd.grad(z, w, upstream)
    assert not bool(torch.isfinite(grad).all())
    assert sol.backward.solution is None and sol.backward.calls == 1


def test_grad_scaler_skips_an_overflowing_step_with_the_implicit_backward():
    torch.manual_seed(0)
    cell, head = nn.Linear(16, 16), nn.Linear(16, 10)
    with torch.no_grad():
        cell.weight.mul_(0.3)
    layer = eq.DEQ(lambda z, x: torch.tanh(cell(z) + x), backward="implicit", tol=1e-3)
    opt = torch.optim.SGD([*cell.parameters(), *head.parameters()], lr=0.1)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**24)  # overflows in float16
    x, y = torch.randn(8, 16), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in cell.parameters()]
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        objective = nn.functional.cross_entropy(head(layer(x)), y)
    scaler.scale(objective).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**24  # the overflow was seen
    assert all(torch.equal(a, b) for a, b in zip(before, cell.parameters()))  # step skipped


@pytest.mark.parametrize("name", ["implicit", "jfb", "unrolled"])  # the exact ones when J = 0
def test_map_that_ignores_the_state_gets_its_parameter_gradient(name):
    """f(z) = 2 b (z enters only detached): J = 0, so dL/db = 2 g exactly; the implicit VJP
    raised torch's 'appears to not have been used in the graph'."""
    b = torch.randn(3, 4, dtype=F64, requires_grad=True)
    z, _ = eq.fixed_point(lambda z: 2.0 * b + 0.0 * z.detach(), torch.zeros(3, 4, dtype=F64),
                          backward=name)  # fmt: skip
    (grad,) = torch.autograd.grad(z.sum(), b)
    torch.testing.assert_close(grad, torch.full_like(b, 2.0))
