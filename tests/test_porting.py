"""What porting outside DEQ code and adversarial inputs found (issue 11, sections 3 and 4).

Each test fails on the code before the fix: the adjoint following the forward's settings,
fixed-point correction with the implicit gradient, list states, per-call overrides, saved models
without the last solve, eval mode returning z*, norm caching through ``fixed_point``, maps that
edit their input in place, 0-d map outputs and ``torch.func`` transforms.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from _cells import TanhCell, backward_reference, dense_implicit, phantom_reference
from _problems import F64, SOLVER_NAMES, loss, rel_err
from torch import nn

import equilibria as eq
from equilibria._tree import StateSpec


def _cell(seed=0):
    return TanhCell(d=5, dx=3, seed=seed, norm=0.7)


def _x(batch=4, seed=1):
    return torch.randn(batch, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _init(x):
    return x.new_zeros(x.shape[0], 5)


# --- backward settings not given follow the forward's ----------------------------------------


def test_implicit_defaults_follow_the_forward_solve():
    cell, x = _cell(), _x()
    layer = eq.DEQ(cell, init=_init, tol=1e-2, max_iter=25)
    loss(layer(x)).backward()
    adjoint = layer.last_solution.backward.solution
    assert adjoint.tol == 1e-2 and adjoint.stop == "rel" and adjoint.nstep <= 25
    # explicit values win, each on its own
    layer = eq.DEQ(cell, init=_init, tol=1e-2, max_iter=25, backward=eq.Implicit(tol=1e-9))
    loss(layer(x)).backward()
    adjoint = layer.last_solution.backward.solution
    assert adjoint.tol == 1e-9 and adjoint.nstep > 3
    z, sol = eq.fixed_point(
        lambda z: cell(z, x), _init(x), tol=1e-3, stop="abs", backward=eq.Implicit(max_iter=2)
    )
    loss(z).backward()
    adjoint = sol.backward.solution
    # the stop norm stays rel: an abs tol in the state's units means nothing for the gradient
    assert (adjoint.tol, adjoint.stop, adjoint.nstep) == (1e-3, "rel", 2)
    z, sol = eq.fixed_point(
        lambda z: cell(z, x), _init(x), stop="abs", backward=eq.Implicit(stop="abs")
    )
    loss(z).backward()
    assert sol.backward.solution.stop == "abs"


def test_the_implicit_adjoint_of_an_abs_forward_does_not_depend_on_the_loss_scale():
    # GradScaler multiplies the loss by 65536: with the adjoint in the rel norm, the same
    # adjoint iterations and a gradient scaled by exactly that
    cell, x = _cell(), _x()
    layer = eq.DEQ(cell, init=_init, stop="abs", tol=1e-4)
    steps, grads = [], []
    for scale in (1.0, 65536.0):
        cell.zero_grad()
        (scale * loss(layer(x))).backward()
        steps.append(layer.last_solution.backward.nstep)
        grads.append(next(cell.parameters()).grad.clone() / scale)
    assert steps[0] == steps[1]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=0)


def test_implicit_defaults_follow_the_eval_budget_and_a_fixed_budget_gets_a_real_tol():
    cell, x = _cell(), _x().requires_grad_()
    layer = eq.DEQ(cell, init=_init, tol=1e-2, eval_tol=1e-8, eval_max_iter=80).eval()
    loss(layer(x)).backward()
    assert layer.last_solution.backward.solution.tol == 1e-8
    # tol = 0: a fixed number of forward iterations; the adjoint stops at 1e-6 within that budget
    z, sol = eq.fixed_point(lambda z: cell(z, x), _init(x), tol=0.0, max_iter=40)
    loss(z).backward()
    adjoint = sol.backward.solution
    assert sol.nstep == 40 and adjoint.tol == 1e-6 and adjoint.nstep < 40
    assert adjoint.status is eq.Status.CONVERGED


# --- fixed-point correction with the implicit gradient on the last state ---------------------


@pytest.mark.parametrize("use_deq", [False, True], ids=["functional", "deq"])
def test_states_with_the_implicit_gradient_on_the_last_state(use_deq):
    cell, x = _cell(), _x()
    params = list(cell.parameters())
    tight = {"tol": 1e-12, "max_iter": 300}
    backward = eq.Implicit(tol=1e-12, max_iter=300)
    if use_deq:
        layer = eq.DEQ(cell, init=_init, backward=backward, **tight)
        states = layer(x, states=3)
        sol = layer.last_solution
    else:
        states, sol = eq.fixed_point_states(
            lambda z: cell(z, x), _init(x), 3, backward=backward, **tight
        )
    assert len(states) == 3 and sol.backward.method == "implicit"
    last = torch.autograd.grad(loss(states[-1]), params, retain_graph=True)
    z, _ = eq.fixed_point(lambda z: cell(z, x), _init(x), backward=backward, **tight)
    exact = torch.autograd.grad(loss(z), params)
    _, dense = dense_implicit(lambda z: cell(z, x), _init(x), params, loss, iters=300)
    for a, b, c in zip(last, exact, dense):
        assert rel_err(a, b) < 1e-9 and rel_err(a, c) < 1e-9
    # the earlier states: one phantom step from their iterates, as with the phantom backward
    # (same forward solve, same picks)
    one_step = eq.Phantom(steps=1, damping=1.0)
    if use_deq:
        ref = eq.DEQ(cell, init=_init, backward=one_step, **tight)(x, states=3)
    else:
        ref, _ = eq.fixed_point_states(lambda z: cell(z, x), _init(x), 3, **tight)
    for state, want_state in zip(states[:-1], ref[:-1]):
        torch.testing.assert_close(state, want_state, rtol=0, atol=0)
        grads = torch.autograd.grad(loss(state), params, retain_graph=True)
        want = torch.autograd.grad(loss(want_state), params, retain_graph=True)
        for a, b in zip(grads, want):
            assert rel_err(a, b) < 1e-12
    assert sol.backward.calls == 1


def test_states_correction_path_is_configurable():
    cell, x = _cell(), _x()
    params = list(cell.parameters())
    f = lambda z: cell(z, x)  # noqa: E731
    states, _ = eq.fixed_point_states(
        f, _init(x), 2, backward="implicit", correction=eq.Phantom(steps=3, damping=0.5)
    )
    ref, _ = eq.fixed_point_states(f, _init(x), 2, backward=eq.Phantom(steps=3, damping=0.5))
    torch.testing.assert_close(states[0], ref[0], rtol=0, atol=0)
    a = torch.autograd.grad(loss(states[0]), params)
    b = torch.autograd.grad(loss(ref[0]), params)
    for u, v in zip(a, b):
        assert rel_err(u, v) < 1e-12


def test_deq_correction_path_is_configurable():
    cell, x = _cell(), _x()
    params = list(cell.parameters())
    path = eq.Phantom(steps=3, damping=0.5)
    states = eq.DEQ(cell, init=_init, correction=path)(x, states=2)
    ref = eq.DEQ(cell, init=_init, backward=path)(x, states=2)
    torch.testing.assert_close(states[0], ref[0], rtol=0, atol=0)
    a = torch.autograd.grad(loss(states[0]), params)
    b = torch.autograd.grad(loss(ref[0]), params)
    for u, v in zip(a, b):
        assert rel_err(u, v) < 1e-12


# --- list states -------------------------------------------------------------------------------


def _pair_map(a):
    def f(z):
        h, s = z
        return [torch.tanh(h @ a.T + 0.5 * s.sum(1, keepdim=True) + 0.3), 0.5 * s + 0.1 * h[:, :2]]

    return f


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_list_states_give_lists_back_and_the_tuple_answer(solver):
    a = (0.3 * torch.randn(4, 4, generator=torch.Generator().manual_seed(0))).double()
    f = _pair_map(a)
    z0 = [torch.zeros(3, 4, dtype=F64), torch.zeros(3, 2, dtype=F64)]
    sol = eq.solve(f, z0, solver=solver, tol=1e-10, max_iter=200)
    assert isinstance(sol.value, list) and len(sol.value) == 2
    as_tuple = eq.solve(f, tuple(z0), solver=solver, tol=1e-10, max_iter=200)  # f returns lists
    assert isinstance(as_tuple.value, tuple)
    for u, v in zip(sol.value, as_tuple.value):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    tuple_map = lambda z: tuple(f(z))  # noqa: E731  (a tuple for a list state)
    again = eq.solve(tuple_map, z0, solver=solver, tol=1e-10, max_iter=200)
    assert isinstance(again.value, list)
    torch.testing.assert_close(again.value[0], sol.value[0], rtol=0, atol=0)


def test_list_states_are_differentiable_through_fixed_point_and_deq():
    a = (0.3 * torch.randn(4, 4, generator=torch.Generator().manual_seed(0))).double()
    a.requires_grad_()
    f = _pair_map(a)
    z0 = [torch.zeros(3, 4, dtype=F64), torch.zeros(3, 2, dtype=F64)]
    z, _ = eq.fixed_point(f, z0, tol=1e-12, max_iter=300)
    assert isinstance(z, list)
    (g_list,) = torch.autograd.grad(loss(torch.cat(z, 1)), a)
    zt, _ = eq.fixed_point(f, tuple(z0), tol=1e-12, max_iter=300)
    (g_tuple,) = torch.autograd.grad(loss(torch.cat(zt, 1)), a)
    assert rel_err(g_list, g_tuple) < 1e-12
    # and both are the implicit gradient: the same map on the concatenated (3, 6) state, dense
    flat = lambda z: torch.cat(f([z[:, :4], z[:, 4:]]), 1)  # noqa: E731
    _, (g_dense,) = dense_implicit(flat, torch.zeros(3, 6, dtype=F64), [a], loss, iters=300)
    assert rel_err(g_list, g_dense) < 1e-9
    layer = eq.DEQ(lambda z, x: f(z), init=lambda x: [t.clone() for t in z0])
    out = layer(torch.zeros(3, 1, dtype=F64))
    assert isinstance(out, list) and [t.shape for t in out] == [(3, 4), (3, 2)]


def test_a_sequence_of_the_wrong_length_is_a_clear_error():
    z0 = [torch.zeros(3, 4, dtype=F64), torch.zeros(3, 2, dtype=F64)]
    with pytest.raises(TypeError, match=r"\(a list of 2 tensors\), got a tuple of 1 items"):
        eq.solve(lambda z: (z[0],), z0)


# --- per-call overrides --------------------------------------------------------------------------


def test_per_call_overrides_apply_to_one_call_only():
    cell, x = _cell(), _x()
    layer = eq.DEQ(cell, init=_init, tol=1e-10, max_iter=100, eval_max_iter=90)
    before = repr(layer)
    layer(x, max_iter=3)
    assert layer.last_solution.nstep == 3
    layer(x, solver="picard", tol=1e-3)
    assert layer.last_solution.solver == "picard" and layer.last_solution.tol == 1e-3
    params = list(cell.parameters())
    grads = torch.autograd.grad(loss(layer(x, backward="jfb")), params)
    assert layer.last_solution.backward.method == "jfb"
    z_star = layer.last_solution.value  # the call's gradient is JFB's, from its own z*
    want = phantom_reference(lambda z: cell(z, x), z_star, params, loss, 1, 1.0)
    for a, b in zip(grads, want):
        assert rel_err(a, b) < 1e-12
    layer.eval()
    layer(x, max_iter=4)  # wins over eval_max_iter
    assert layer.last_solution.nstep == 4
    layer(x)
    assert layer.last_solution.nstep > 4 and layer.last_solution.solver == "anderson"
    assert repr(layer) == before and layer.max_iter == 100 and layer.backward.name == "implicit"


# --- saved models do not carry the last solve -----------------------------------------------


def _saved_size(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell(), buffer


def test_torch_save_after_a_training_step_stays_near_the_model_size():
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    model = nn.Sequential(
        eq.DEQ(_LinCell(lin), tol=1e-3, max_iter=20, backward="implicit"), nn.Linear(32, 2)
    )
    empty, _ = _saved_size(model)
    x = torch.randn(1024, 32)
    loss(model(x)).backward()
    assert model[0].last_solution is not None
    size, buffer = _saved_size(model)
    assert size < empty + 4096  # the solve's (1024, 32) tensors would add over 100 kB
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded[0].last_solution is None
    torch.testing.assert_close(loaded(x[:4]), model(x[:4]))
    assert model[0].last_solution is not None  # saving did not change the live module


def test_a_deq_pickled_before_the_options_object_loads_and_solves():
    """torch.save(model) of equilibria 0.1.0 before issue 11 kept the options as attributes
    (``solver``, ``tol``, ..., ``eval_tol``/``eval_max_iter`` as numbers, the caches as dicts and
    a ``_pending`` adjoint harvest): such a file loaded, but its repr and its first call raised
    AttributeError 'DEQ' object has no attribute 'solver'. The state below is that layout (the
    keys of a DEQ pickled by 3c797fa)."""
    torch.manual_seed(0)
    new = eq.DEQ(_LinCell(nn.Linear(4, 4)), backward=eq.Phantom(steps=2), tol=1e-3, max_iter=17)
    state = {k: v for k, v in new.__dict__.items() if not k.startswith(("_eval", "_using"))}
    for name in ("options", "correction", "_state_cache", "_adjoint_cache"):
        del state[name]
    row = torch.full((4,), 0.25)
    state.update(
        solver=eq.Anderson(),
        backward=eq.Phantom(steps=2),
        tol=1e-3,
        max_iter=17,
        stop="abs",
        eval_tol=1e-5,
        eval_max_iter=33,
        warn_unconverged=False,
        compact=False,
        _state_cache={7: row},
        _adjoint_cache={},
        _pending=None,
    )
    loaded = eq.DEQ.__new__(eq.DEQ)  # what unpickling does: a bare object, then its state
    loaded.__setstate__(state)
    assert isinstance(loaded, eq.DEQ) and "max_iter=17" in repr(loaded)
    assert (loaded.solver, loaded.backward, loaded.tol, loaded.stop) == (
        eq.Anderson(),
        eq.Phantom(steps=2),
        1e-3,
        "abs",
    )
    assert (loaded.eval_tol, loaded.eval_max_iter, loaded.correction) == (1e-5, 33, None)
    assert torch.equal(loaded._state_cache.rows[7], row) and len(loaded._adjoint_cache) == 0
    x = torch.randn(3, 4)
    loaded(x, max_iter=1, cache_key=[7, 8, 9])
    assert loaded.last_solution.nstep == 1
    loaded(x).sum().backward()
    assert loaded.last_solution.backward.method == "phantom"
    loaded.eval()
    loaded(x)
    assert loaded.last_solution.tol == 1e-5


class _LinCell(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, z, x):
        return torch.tanh(0.5 * self.lin(z) + x)


# --- eval mode returns the solver's equilibrium ----------------------------------------------


@pytest.mark.parametrize("backward", ["phantom", "jfb", "implicit", "neumann", "unrolled"])
def test_eval_mode_returns_the_equilibrium_with_each_methods_gradient(backward):
    cell, x = _cell(), _x()
    params = list(cell.parameters())
    layer = eq.DEQ(cell, init=_init, backward=backward, tol=1e-12, max_iter=300)
    train_grads = torch.autograd.grad(loss(layer(x)), params)
    if backward in ("implicit", "neumann", "unrolled"):  # the train gradient, checked on its own
        dense = backward_reference(lambda z: cell(z, x), _init(x), params, loss, backward)
        for a, b in zip(train_grads, dense):  # unrolled: autograd through a converged solve
            assert rel_err(a, b) < 1e-9
    layer.eval()
    with torch.no_grad():
        quiet = layer(x)
    z = layer(x)
    assert z.requires_grad
    torch.testing.assert_close(z, quiet, rtol=0, atol=0)
    torch.testing.assert_close(z.detach(), layer.last_solution.value, rtol=0, atol=0)
    if backward in ("phantom", "jfb"):  # the phantom gradient at z*, not another method's
        steps = 5 if backward == "phantom" else 1
        damping = 0.5 if backward == "phantom" else 1.0
        want = phantom_reference(
            lambda z: cell(z, x),
            quiet,
            params,
            lambda h: loss(quiet + (h - h.detach())),
            steps,
            damping,
        )
    else:  # implicit, Neumann, unrolled: in eval mode the same gradient as in training
        want = train_grads
    grads = torch.autograd.grad(loss(z), params)
    for a, b in zip(grads, want):
        assert rel_err(a, b) < 1e-9


# --- normalised weights computed once through fixed_point -----------------------------------


class _NormMap(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6).double()
        self.x = torch.randn(3, 6, dtype=F64)

    def forward(self, z):
        return torch.tanh(0.5 * self.lin(z) + self.x)


def test_fixed_point_of_a_normalised_module_computes_its_weight_once():
    f = eq.apply_norm(_NormMap(), "weight")
    calls = []
    norm = f.lin.parametrizations.weight[0]
    norm.register_forward_hook(lambda *_: calls.append(1))
    z, sol = eq.fixed_point(f, torch.zeros(3, 6, dtype=F64), tol=1e-10, max_iter=100)
    loss(z).backward()
    assert sol.nfev > 5 and len(calls) == 1
    assert f.lin.parametrizations.weight.original0.grad is not None
    calls.clear()
    eq.solve(f, torch.zeros(3, 6, dtype=F64), tol=1e-10, max_iter=100)
    assert len(calls) == 1
    calls.clear()  # a closure over the module: norm_cache, as the README shows
    with eq.norm_cache(f):
        eq.fixed_point(lambda z: f(z), torch.zeros(3, 6, dtype=F64), tol=1e-10, max_iter=100)
    assert len(calls) == 1


# --- adversarial: maps that edit their input in place ----------------------------------------


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_a_map_editing_its_input_in_place_gets_the_true_fixed_point(solver):
    z0 = torch.zeros(4, 3, dtype=F64)
    sol = eq.solve(lambda z: z.mul_(0.5).add_(1.0), z0, solver=solver, tol=1e-10, max_iter=200)
    assert sol.all_converged
    torch.testing.assert_close(sol.value, torch.full((4, 3), 2.0, dtype=F64))
    assert bool((z0 == 0).all())  # the caller's z0 is untouched
    a = torch.tensor(0.5, dtype=F64, requires_grad=True)
    z, sol = eq.fixed_point(lambda z: z.mul_(a).add_(1.0), z0, solver=solver, tol=1e-12)
    (g,) = torch.autograd.grad(z.sum(), a)
    torch.testing.assert_close(z.detach(), torch.full((4, 3), 2.0, dtype=F64))
    # z* = 1 / (1 - a): dz*/da = 1 / (1 - a)^2 = 4 per entry
    torch.testing.assert_close(g, torch.tensor(48.0, dtype=F64))
    assert bool((z0 == 0).all())


def test_a_map_editing_its_input_in_place_under_inference_mode():
    # inference tensors have no version counter: the first call's copy is compared instead
    z0 = torch.zeros(4, 3)
    with torch.inference_mode():
        sol = eq.solve(lambda z: z.mul_(0.5).add_(1.0), z0, tol=1e-6)
    torch.testing.assert_close(sol.value, torch.full((4, 3), 2.0))
    assert bool((z0 == 0).all())


def test_a_map_editing_a_dict_state_in_place():
    z0 = {"a": torch.zeros(2, 3, dtype=F64), "b": torch.ones(2, 1, dtype=F64)}

    def f(z):
        z["a"].mul_(0.5).add_(1.0)
        z["b"].mul_(0.25)
        return z

    sol = eq.solve(f, z0, tol=1e-10, max_iter=200)
    torch.testing.assert_close(sol.value["a"], torch.full((2, 3), 2.0, dtype=F64))
    torch.testing.assert_close(sol.value["b"], torch.zeros(2, 1, dtype=F64), atol=1e-9, rtol=0)
    assert bool((z0["a"] == 0).all()) and bool((z0["b"] == 1).all())


# --- adversarial: 0-d outputs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: eq.solve(lambda z: z.sum(), torch.zeros(2, 3)), r"f\(z\) must have the shape"),
        (
            lambda: eq.solve(lambda z: {"a": z["a"].sum()}, {"a": torch.zeros(2, 3)}),
            r"f\(z\)\['a'\] must have the shape of the state, \(2, 3\)",
        ),
        (
            lambda: eq.fixed_point(lambda z: (z * 0.5).mean(), torch.zeros(2, 3)),
            r"f\(z\) must have the shape",
        ),
        (lambda: eq.jacobian_penalty(lambda z: z.sum(), torch.zeros(2, 3)), "0-d tensor"),
    ],
    ids=["solve", "dict", "fixed_point", "jacobian_penalty"],
)
def test_a_map_returning_a_0d_tensor_is_a_clear_error(call, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        call()
    assert "0-d tensor" in str(info.value)


# --- adversarial: torch.func transforms are refused with the alternative -------------------


@pytest.mark.parametrize(
    "transform",
    [
        lambda: torch.func.vmap(lambda z: eq.solve(lambda u: 0.5 * u + 1.0, z[None]).value)(
            torch.zeros(3, 2)
        ),
        lambda: torch.func.grad(
            lambda a: eq.fixed_point(lambda u: a * u + 1.0, torch.zeros(2, 2))[0].sum()
        )(torch.tensor(0.5)),
        lambda: torch.func.jacrev(lambda x: eq.DEQ(lambda z, x: 0.5 * z + x)(x))(torch.zeros(2, 2)),
        lambda: torch.func.vmap(
            lambda z: eq.fixed_point_states(lambda u: 0.5 * u + 1.0, z[None], 2)[0][0]
        )(torch.zeros(3, 2)),
    ],
    ids=["vmap-solve", "grad-fixed_point", "jacrev-deq", "vmap-states"],
)
def test_torch_func_transforms_are_refused_naming_the_alternative(transform):
    with pytest.raises(RuntimeError, match=r"torch\.func transforms") as info:
        transform()
    assert "torch.autograd" in str(info.value)


# --- section 2: the state is flattened once per DEQ call ---------------------------------------


def test_a_deq_call_builds_its_spec_once(monkeypatch):
    """One StateSpec per DEQ call, with and without the warm-start cache (the state was
    described, flattened and unflattened again at each layer of the call)."""
    count = [0]
    of = StateSpec.of

    def counting_of(*args, **kwargs):
        count[0] += 1
        return of(*args, **kwargs)

    monkeypatch.setattr(StateSpec, "of", staticmethod(counting_of))

    def cell(z, x):
        return {"h": torch.tanh(0.5 * z["s"].sum(1, keepdim=True) + x), "s": 0.5 * z["s"]}

    def init(x):
        return {"h": torch.zeros(4, 3, dtype=F64), "s": torch.ones(4, 2, dtype=F64)}

    x = _x().requires_grad_()
    layer = eq.DEQ(cell, init=init, tol=1e-8)
    for keys in (None, [0, 1, 2, 3], [0, 1, 2, 3]):
        count[0] = 0
        z = layer(x, cache_key=keys)
        loss(z["h"]).backward()
        assert count[0] == 1


# --- registering a backward method: one class ---------------------------------------------------


def test_a_new_backward_method_is_one_registered_class():
    @dataclass(frozen=True)
    class Halved(eq.Backward):
        """Half the JFB gradient (a toy method for the test)."""

        name: ClassVar[str] = "halved-jfb-test"

        def attach(self, fn, z_star, at):
            h = fn(z_star)
            return z_star + 0.5 * (h - h.detach())

    eq.register_backward(Halved)
    try:
        assert "halved-jfb-test" in eq.BACKWARDS
        cell, x = _cell(), _x()
        params = list(cell.parameters())
        tight = {"tol": 1e-12, "max_iter": 300}
        z, sol = eq.fixed_point(lambda z: cell(z, x), _init(x), backward="halved-jfb-test", **tight)
        grads = torch.autograd.grad(loss(z), params)
        z2, _ = eq.fixed_point(lambda z: cell(z, x), _init(x), backward="jfb", **tight)
        want = torch.autograd.grad(loss(z2), params)
        for a, b in zip(grads, want):
            assert rel_err(2 * a, b) < 1e-10  # JFB's gradient at the same z*
        assert sol.backward.method == "halved-jfb-test"
        layer = eq.DEQ(cell, init=_init, backward="halved-jfb-test")
        loss(layer(x)).backward()
        with pytest.raises(ValueError, match="name 'halved-jfb-test' is taken by Halved"):
            eq.register_backward(type("Other", (Halved,), {}))
        with pytest.raises(TypeError, match="must be a subclass of Backward"):
            eq.register_backward(int)
        with pytest.raises(TypeError, match="Lazy does not implement attach"):
            eq.register_backward(type("Lazy", (eq.Backward,), {"name": "lazy"}))
        needy = dataclass(frozen=True)(
            type("Needy", (Halved,), {"__annotations__": {"k": int}, "name": "needy"})
        )
        with pytest.raises(TypeError, match=r"Needy must be constructible without arguments"):
            eq.register_backward(needy)
        assert "lazy" not in eq.BACKWARDS and "needy" not in eq.BACKWARDS
    finally:
        eq.BACKWARDS._classes.pop("halved-jfb-test", None)


def test_solver_registration_is_public_and_eq_solvers_follows_it():
    """eq.SOLVERS was a tuple of the names at import: a registered solver was missing from it."""
    relaxed = type("RelaxedPicard", (eq.Picard,), {"name": "relaxed-picard-test"})
    assert eq.register_solver(relaxed) is relaxed
    try:
        assert "relaxed-picard-test" in eq.SOLVERS and isinstance(eq.Step, type)
        sol = eq.solve(lambda z: 0.5 * z + 1.0, torch.zeros(2, 3), solver="relaxed-picard-test")
        assert sol.solver == "relaxed-picard-test" and sol.all_converged
        layer = eq.DEQ(lambda z, x: 0.5 * z + x, solver="relaxed-picard-test")
        layer(torch.ones(2, 3))
        assert layer.last_solution.solver == "relaxed-picard-test"
    finally:
        eq.SOLVERS._classes.pop("relaxed-picard-test", None)


def test_assigning_a_deq_option_validates_it_and_takes_effect():
    # training schedules assign budgets between epochs (layer.max_iter = 30), as TorchDEQ users do
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    layer = eq.DEQ(lambda z, x: torch.tanh(0.5 * lin(z) + x), solver="picard", tol=0.0)
    x = torch.randn(3, 4)
    layer.max_iter = 7
    layer.solver = "anderson"
    layer.backward = eq.Phantom(steps=2)
    assert layer.max_iter == 7 and layer.solver.name == "anderson"
    assert isinstance(layer.backward, eq.Phantom) and layer.backward.steps == 2
    layer(x)
    assert layer.last_solution.nstep == 7 and layer.last_solution.solver == "anderson"
    with pytest.raises(ValueError, match="max_iter must be"):
        layer.max_iter = 0
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        layer.solver = "newton"
    with pytest.raises(TypeError, match="tol cannot be set to None"):
        layer.tol = None
    assert layer.max_iter == 7  # a refused value leaves the option as it was
    # the eval budget follows the training one unless it was given
    layer.eval()
    layer(x)
    assert layer.eval_max_iter == 7 and layer.last_solution.nstep == 7
    layer.eval_max_iter = 3
    layer(x)
    assert layer.last_solution.nstep == 3
    layer.max_iter = 9
    assert layer.eval_max_iter == 3 and layer.eval_tol == 0.0
    with pytest.raises(ValueError, match="eval_tol must be"):
        layer.eval_tol = -1.0
    layer.eval_max_iter = None
    assert layer.eval_max_iter == 9
