"""The DEQ module and fixed-point correction.

The reference for a nonlinear cell is dense: z* from a long hand-written Picard loop, the
Jacobian J_b = df/dz at z*_b per sample, u_b = (I - J_b^T)^{-1} g_b, and (df/dtheta)^T u by one
autograd call.
"""

from __future__ import annotations

import copy
import itertools
from typing import NamedTuple

import pytest
import torch
from _cells import TanhCell, backward_reference, dense_implicit
from _problems import BACKWARD_NAMES, F64, SOLVER_NAMES, gen, has_node, rel_err
from torch import nn

import equilibria as eq
from equilibria._backward import _Adjoint

TIGHT = {"tol": 1e-12, "max_iter": 300}


class Cell(TanhCell):
    """f(z, x) = tanh(W z + U x + c) with ||W||_2 = 0.7: a contraction in z."""

    def __init__(self, d=5, dx=3, dtype=F64, seed=0):
        super().__init__(d=d, dx=dx, dtype=dtype, seed=seed, norm=0.7)


class TreeCell(nn.Module):
    """The same map on a dict state {"h": (B, 3), "s": (B, 2)} (the two parts are coupled)."""

    def __init__(self, seed=0):
        super().__init__()
        self.inner = Cell(d=5, dx=3, seed=seed)

    def forward(self, z, x):
        out = self.inner(torch.cat([z["h"], z["s"]], 1), x)
        return {"h": out[:, :3], "s": out[:, 3:]}


def reference(cell, x, z_shape):
    """Dense z* and dense implicit gradients of loss(z*) w.r.t. the cell's parameters and x."""
    z0 = torch.zeros(z_shape, dtype=x.dtype)
    return dense_implicit(lambda z: cell(z, x), z0, [*cell.parameters(), x], _loss, iters=200)


def _loss(z):
    w = torch.linspace(-1, 2, z.shape[-1], dtype=z.dtype)
    return ((z - 0.3) ** 2 * w).sum() + z.sum()


def _init(x):
    return x.new_zeros(x.shape[0], 5)


def _x(batch=4, dx=3, dtype=F64, seed=1):
    return torch.randn(batch, dx, generator=gen(seed), dtype=dtype).requires_grad_()


# --- the module -------------------------------------------------------------------------------


def test_parameters_are_registered():
    cell = Cell()
    layer = eq.DEQ(cell, init=_init)
    assert {id(p) for p in layer.parameters()} == {id(p) for p in cell.parameters()}
    assert set(layer.state_dict()) == {"cell.W", "cell.inj.weight", "cell.inj.bias"}
    text = repr(layer)
    assert "solver=" in text and "eval_max_iter=" in text


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_forward_and_implicit_gradients_match_dense_reference(solver):
    cell = Cell()
    x = _x()
    layer = eq.DEQ(
        cell, init=_init, solver=solver, backward=eq.Implicit(solver=solver, tol=1e-12), **TIGHT
    )
    z = layer(x)
    sol = layer.last_solution
    assert sol.status is eq.Status.CONVERGED
    z_ref, g_ref = reference(cell, x, (4, 5))
    torch.testing.assert_close(z.detach(), z_ref, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(_loss(z), [*cell.parameters(), x])
    for a, b in zip(got, g_ref):
        assert rel_err(a, b) < 1e-6
    assert sol.backward.calls == 1 and bool(sol.backward.converged.all())


def test_eval_mode_uses_eval_budget_and_still_differentiates():
    cell = Cell()
    x = _x()
    layer = eq.DEQ(cell, init=_init, solver="picard", tol=1e-12, max_iter=300, eval_max_iter=3)
    layer.train()
    layer(x)
    assert layer.last_solution.nstep > 3 and layer.last_solution.all_converged
    layer.eval()
    z = layer(x)
    assert layer.last_solution.nstep == 3
    assert layer.last_solution.status is eq.Status.MAX_ITER
    assert z.requires_grad  # eval mode is not no_grad: input gradients still flow
    gx = torch.autograd.grad(z.sum(), x)[0]
    assert float(gx.abs().max()) > 0
    assert layer.last_solution.backward.calls == 1


def test_eval_mode_gradients_equal_train_mode_gradients():
    cell = Cell()
    x = _x()
    layer = eq.DEQ(cell, init=_init, backward=eq.Implicit(tol=1e-12), **TIGHT)
    train = torch.autograd.grad(_loss(layer(x)), [*cell.parameters(), x])
    layer.eval()
    evals = torch.autograd.grad(_loss(layer(x)), [*cell.parameters(), x])
    for a, b in zip(train, evals):
        assert rel_err(a, b) < 1e-9


def test_eval_tol_is_used_in_eval_mode():
    cell = Cell()
    x = _x()
    layer = eq.DEQ(cell, init=_init, solver="picard", tol=1e-2, eval_tol=1e-10, max_iter=300)
    with torch.no_grad():
        layer(x)
        loose = layer.last_solution
        layer.eval()
        layer(x)
        tight = layer.last_solution
    assert loose.tol == 1e-2 and tight.tol == 1e-10
    assert float(tight.residual.max()) < 1e-10 < float(loose.residual.max())
    assert tight.nstep > loose.nstep


def test_no_graph_under_no_grad():
    layer = eq.DEQ(Cell(), init=_init)
    with torch.no_grad():
        z = layer(_x())
    assert not z.requires_grad and z.grad_fn is None


def test_layer_called_twice_before_backward():
    cell = Cell()
    x1, x2 = _x(seed=1), _x(seed=2)
    layer = eq.DEQ(cell, init=_init, backward=eq.Implicit(tol=1e-12), **TIGHT)
    params = [*cell.parameters(), x1, x2]
    z1 = layer(x1)
    s1 = layer.last_solution
    z2 = layer(x2)
    s2 = layer.last_solution
    assert s1 is not s2
    for z in (z1, z2):  # the module-level autograd.Function, no hooks
        assert has_node(z.grad_fn, _Adjoint._backward_cls)
        assert not z._backward_hooks
    both = torch.autograd.grad(_loss(z1) + 3 * _loss(z2), params)
    assert s1.backward.calls == 1 and s2.backward.calls == 1
    one = torch.autograd.grad(_loss(layer(x1)), params, allow_unused=True)
    two = torch.autograd.grad(3 * _loss(layer(x2)), params, allow_unused=True)
    for g, g1, g2 in zip(both, one, two):
        want = (0 if g1 is None else g1) + (0 if g2 is None else g2)
        assert rel_err(g, want) < 1e-10


def test_warm_start_from_the_previous_equilibrium():
    cell = Cell()
    x = _x()
    layer = eq.DEQ(cell, init=_init, solver="anderson", tol=1e-8, max_iter=100)
    z = layer(x)
    cold = layer.last_solution.nstep
    assert cold > 3
    layer(x, z0=z.detach())
    assert layer.last_solution.nstep <= 2
    assert layer.last_solution.all_converged
    # a nearby input also starts close: fewer iterations than from zero
    layer(x.detach() + 1e-3, z0=z.detach())
    assert layer.last_solution.nstep < cold


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_tree_state_with_init(kind):
    tree = TreeCell()
    x = _x()

    if kind == "dict":
        cell = tree

        def init(x):
            return {"h": x.new_zeros(x.shape[0], 3), "s": x.new_zeros(x.shape[0], 2)}

    else:

        def cell(z, x):
            out = tree({"h": z[0], "s": z[1]}, x)
            return out["h"], out["s"]

        def init(x):
            return x.new_zeros(x.shape[0], 3), x.new_zeros(x.shape[0], 2)

    layer = eq.DEQ(cell, init=init, backward=eq.Implicit(tol=1e-12), **TIGHT)
    z = layer(x)
    h, s = (z["h"], z["s"]) if kind == "dict" else z
    assert h.shape == (4, 3) and s.shape == (4, 2)
    flat = torch.cat([h, s], 1)
    z_ref, g_ref = reference(tree.inner, x, (4, 5))
    torch.testing.assert_close(flat.detach(), z_ref, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(_loss(flat), [*tree.inner.parameters(), x])
    for a, b in zip(got, g_ref):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("backward", BACKWARD_NAMES)
def test_every_backward_trains_every_parameter(backward):
    cell = Cell()
    x = _x()
    layer = eq.DEQ(cell, init=_init, backward=backward, tol=1e-6, max_iter=60)
    z = layer(x)
    _loss(z).backward()
    for name, p in cell.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name
    assert x.grad is not None and float(x.grad.abs().max()) > 0
    assert layer.last_solution.backward.method == backward
    # each method's own gradient, from an independent dense reference: the exact implicit gradient
    # (implicit; unrolled through a converged solve), or its formula on explicit loops / dense J
    params = [*cell.parameters(), x]
    want = backward_reference(lambda z: cell(z, x), _init(x), params, _loss, backward)
    for name, p, b in zip([n for n, _ in cell.named_parameters()] + ["x"], params, want):
        assert rel_err(p.grad, b) < 1e-4, name


def test_float32_layer():
    cell = Cell(dtype=torch.float32)
    x = _x(dtype=torch.float32)
    layer = eq.DEQ(cell, init=_init, tol=1e-5)
    z = layer(x)
    assert z.dtype == torch.float32 and layer.last_solution.all_converged
    z.sum().backward()
    assert cell.W.grad.dtype == torch.float32
    cell64 = copy.deepcopy(cell).double()
    x64 = x.detach().double().requires_grad_()
    z64, (w64, *_) = dense_implicit(
        lambda z: cell64(z, x64), torch.zeros(4, 5, dtype=F64), [cell64.W], lambda z: z.sum()
    )
    torch.testing.assert_close(z.detach().double(), z64, rtol=1e-4, atol=1e-4)
    assert rel_err(cell.W.grad.double(), w64) < 1e-3
    assert (
        rel_err(
            x.grad.double(),
            dense_implicit(
                lambda z: cell64(z, x64), torch.zeros(4, 5, dtype=F64), [x64], lambda z: z.sum()
            )[1][0],
        )
        < 1e-3
    )


@pytest.mark.parametrize("backward", ["implicit", "phantom", "jfb"])
def test_compact_layer_matches_the_full_layer(backward):
    # sample 0 saturates tanh (its Jacobian is ~0), so it converges first and leaves the batch
    cell = Cell()
    with torch.no_grad():
        x = _x().detach()
        x[0] *= 50
    x.requires_grad_()
    params = [*cell.parameters(), x]
    results = {}
    for compact in (False, True):
        layer = eq.DEQ(cell, init=_init, backward=backward, compact=compact, **TIGHT)
        z = layer(x)
        grads = torch.autograd.grad(_loss(z), params)
        results[compact] = (z.detach(), grads, layer.last_solution)
    (z_full, g_full, s_full), (z_cmp, g_cmp, s_cmp) = results[False], results[True]
    assert s_cmp.all_converged
    assert s_cmp.evaluations < s_full.evaluations == 4 * s_full.nfev
    assert bool(torch.isnan(s_cmp.residuals[-1, 0]))
    torch.testing.assert_close(z_cmp, z_full, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_cmp, g_full):
        assert rel_err(a, b) < 1e-8


# --- fixed-point correction --------------------------------------------------------------------


def _picard_trajectory(cell, x, n):
    with torch.no_grad():
        h = torch.zeros(x.shape[0], 5, dtype=x.dtype)
        out = [h]
        for _ in range(n):
            h = cell(h, x)
            out.append(h)
    return out


@pytest.mark.parametrize(
    ("backward", "steps", "damping"),
    [
        (None, 1, 1.0),
        (eq.JFB(), 1, 1.0),
        (eq.Phantom(steps=2, damping=0.5), 2, 0.5),
        ("jfb", 1, 1.0),
        ("phantom", eq.Phantom().steps, eq.Phantom().damping),
    ],
)
def test_fixed_point_states(backward, steps, damping):
    cell = Cell()
    x = _x()

    def f(z):
        return cell(z, x)

    n = 4
    states, sol = eq.fixed_point_states(
        f, torch.zeros(4, 5, dtype=F64), n, solver="picard", backward=backward, tol=1e-10
    )
    assert isinstance(states, list) and len(states) == n
    assert sol.status is eq.Status.CONVERGED
    # each state is a phantom step from an iterate of the solver, later states from later iterates
    traj = _picard_trajectory(cell, x, sol.nstep)
    picks, all_matches = [], []
    for state in states:
        want = state.detach()
        matches = []
        for k, h in enumerate(traj[: sol.nstep]):
            step = h
            for _ in range(steps):
                step = (step + damping * (f(step) - step)).detach()
            if torch.allclose(step, want, rtol=1e-12, atol=1e-12):
                matches.append(k)
        assert matches, "a state is not a phantom step from an iterate"
        picks.append(matches[0])
        all_matches.append(matches)
    assert picks == sorted(picks) and len(set(picks)) == n
    # evenly spaced along the trajectory (iterates 0 .. nstep - 1), ending with the final iterate:
    # the i-th of the first n - 1 states comes from iterate round((i + 1) nstep / n) - 1
    nstep = sol.nstep
    assert nstep >= 2 * n  # enough iterations for the spacing to be visible
    want = [max(0, round((i + 1) * nstep / n) - 1) for i in range(n - 1)] + [nstep - 1]
    assert picks[:-1] == want[:-1]
    # (near convergence several late iterates give the same final state to 1e-12)
    assert nstep - 1 in all_matches[-1]
    picks[-1] = nstep - 1
    gaps = [b - a for a, b in itertools.pairwise(picks)]
    assert max(gaps) - min(gaps) <= 1
    assert picks[0] >= nstep // n - 1
    # the last state is at the equilibrium (within the phantom step)
    torch.testing.assert_close(states[-1].detach(), sol.value, rtol=1e-8, atol=1e-8)
    # every state has its own gradient path to the parameters
    grads = [torch.autograd.grad(s.sum(), cell.W)[0] for s in states]
    for g in grads:
        assert float(g.abs().max()) > 0
    for a, b in itertools.pairwise(grads):
        assert not torch.equal(a, b)
    # (five damped steps bring even the earliest iterate close to the equilibrium)
    assert rel_err(grads[0], grads[-1]) > (1e-3 if steps < 5 else 1e-4)


def test_fixed_point_states_more_states_than_iterations():
    cell = Cell()
    x = _x()
    z_star = _picard_trajectory(cell, x, 200)[-1]
    states, sol = eq.fixed_point_states(lambda z: cell(z, x), z_star + 1e-9, 5, tol=1e-6)
    assert sol.nstep <= 2 and len(states) == 5
    for s in states:
        torch.testing.assert_close(s.detach(), z_star, rtol=1e-7, atol=1e-7)


def test_fixed_point_states_without_grad():
    cell = Cell()
    x = _x()
    with torch.no_grad():
        states, _ = eq.fixed_point_states(lambda z: cell(z, x), torch.zeros(4, 5, dtype=F64), 3)
    assert len(states) == 3 and not any(s.requires_grad for s in states)


def test_deq_states_for_correction():
    cell = Cell()
    x = _x()
    layer = eq.DEQ(cell, init=_init, backward=eq.Phantom(steps=1, damping=1.0), tol=1e-8)
    states = layer(x, states=3)
    assert len(states) == 3
    loss = eq.correction_loss([_loss(s) for s in states], gamma=0.8)
    loss.backward()
    assert float(cell.W.grad.abs().max()) > 0
    assert layer.last_solution.all_converged


@pytest.mark.parametrize("gamma", [0.5, 0.8, 1.0])
def test_correction_loss_weights(gamma):
    n = 4
    losses = [torch.tensor(float(10**i), dtype=F64, requires_grad=True) for i in range(n)]
    total = eq.correction_loss(losses, gamma=gamma)
    want = sum(gamma ** (n - 1 - i) * 10**i for i in range(n))
    assert float(total.detach()) == pytest.approx(want, rel=1e-15)
    grads = torch.autograd.grad(total, losses)
    for i, g in enumerate(grads):
        assert float(g) == pytest.approx(gamma ** (n - 1 - i), rel=1e-15)
    one = eq.correction_loss(losses[:1], gamma=gamma)
    assert float(one.detach()) == 1.0


def test_correction_loss_default_gamma_is_0_8():
    losses = [torch.tensor(1.0), torch.tensor(1.0)]
    assert float(eq.correction_loss(losses)) == pytest.approx(1.8)


# --- review findings: deep copies, NamedTuple states, in-place edits of tree outputs -----------


@pytest.mark.parametrize("backward", BACKWARD_NAMES)
def test_deq_can_be_deep_copied_after_a_training_step(backward):
    """Snapshots and EMA copies: the implicit/Neumann solution recorded a non-leaf map call on
    the module, and torch refuses to deep-copy non-leaf tensors."""
    layer = eq.DEQ(Cell(), init=_init, backward=backward, tol=1e-8, max_iter=100)
    _loss(layer(_x())).backward()
    copied = copy.deepcopy(layer)
    info, original = copied.last_solution.backward, layer.last_solution.backward
    assert info.method == original.method
    if backward in ("implicit", "neumann"):  # statistics kept, the recorded graph dropped
        assert info.calls == original.calls == 1 and info.nstep == original.nstep
        with pytest.raises(ValueError, match="no recorded map evaluation"):
            copied.last_solution.jacobian_penalty()
    z0 = _init(_x())
    torch.testing.assert_close(copied(_x(), z0), layer(_x(), z0))


class HC(NamedTuple):
    h: torch.Tensor
    c: torch.Tensor


def test_named_tuple_state_keeps_its_type():
    """NamedTuples are the natural typed states: f must see the fields, and the result
    must come back as the same class (it was rebuilt as a plain tuple)."""
    cell = Cell()
    x = _x()

    def f(z):
        out = cell(torch.cat([z.h, z.c], 1), x)
        return HC(h=out[:, :3], c=out[:, 3:])

    z0 = HC(torch.zeros(4, 3, dtype=F64), torch.zeros(4, 2, dtype=F64))
    sol = eq.solve(f, z0, tol=1e-12, max_iter=300)
    assert type(sol.value) is HC and sol.all_converged
    z, _ = eq.fixed_point(f, z0, tol=1e-12, max_iter=300)
    assert type(z) is HC
    z_ref, g_ref = reference(cell, x, (4, 5))
    torch.testing.assert_close(torch.cat(z, 1).detach(), z_ref, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(_loss(torch.cat(z, 1)), [*cell.parameters(), x])
    for a, b in zip(got, g_ref):
        assert rel_err(a, b) < 1e-6
    layer = eq.DEQ(lambda z, x: f(z), init=lambda x: z0)
    assert type(layer(x)) is HC


@pytest.mark.parametrize("kind", ["tuple", "dict"])
@pytest.mark.parametrize("backward", BACKWARD_NAMES)
def test_tree_outputs_can_be_modified_in_place(kind, backward):
    """nn.ReLU(inplace=True) or `h += skip` right after the layer: the leaves were views of one
    torch.split, which autograd forbids editing in place."""
    cell = Cell()
    x = _x()

    def f(z):
        h, s = z if kind == "tuple" else (z["h"], z["s"])
        out = cell(torch.cat([h, s], 1), x)
        return (out[:, :3], out[:, 3:]) if kind == "tuple" else {"h": out[:, :3], "s": out[:, 3:]}

    zeros = (torch.zeros(4, 3, dtype=F64), torch.zeros(4, 2, dtype=F64))
    z0 = zeros if kind == "tuple" else dict(zip("hs", zeros))
    grads = []
    for in_place in (False, True):
        z, _ = eq.fixed_point(f, z0, backward=backward, tol=1e-10, max_iter=200)
        h = z[0] if kind == "tuple" else z["h"]
        h = torch.relu_(h) if in_place else torch.relu(h)
        grads.append(torch.autograd.grad(_loss(h), [*cell.parameters(), x]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("backward", "compact"),
    [(b, c) for b in BACKWARD_NAMES for c in (False, True) if not (c and b == "unrolled")],
)
def test_an_empty_batch_passes_through_like_a_torch_layer(backward, compact):
    """ROI heads and masked batches produce zero-size batches at run time; torch layers pass
    them through, and the DEQ refused them."""
    cell = Cell()
    x = _x(batch=0)
    layer = eq.DEQ(cell, init=_init, backward=backward, compact=compact)
    z = layer(x)
    assert z.shape == (0, 5) and z.requires_grad
    sol = layer.last_solution
    assert sol.status is eq.Status.CONVERGED and sol.nstep == 0 and sol.all_converged
    assert sol.residual.shape == sol.converged.shape == (0,) and sol.residuals.shape == (0, 0)
    assert "converged=0/0" in repr(sol)
    grads = torch.autograd.grad(z.sum(), [*cell.parameters(), x], allow_unused=True)
    assert all(g is None or not bool(g.any()) for g in grads)
    states = eq.DEQ(cell, init=_init, backward="phantom")(x, states=3)
    assert [s.shape for s in states] == [(0, 5)] * 3
    empty = (torch.zeros(0, 2, dtype=F64), torch.zeros(0, 3, 2, dtype=F64))
    sol = eq.solve(lambda z: (0.5 * z[0], 0.5 * z[1]), empty)
    assert [tuple(v.shape) for v in sol.value] == [(0, 2), (0, 3, 2)]
