"""Bad input raises a clear exception; failure to converge is a status, never silent.

The table asserts the exception type and a fragment of the message: the argument's name and what
is allowed (valid names come from the registries, so a new solver or backward is covered).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from _problems import F64, SOLVER_NAMES, Affine, BatchAffine

import equilibria as eq
from equilibria._backward import BACKWARDS
from equilibria._iterate import DIVERGENCE_FACTOR
from equilibria._solvers import SOLVERS

Z = torch.zeros(2, 3, dtype=F64)
PAIR = (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 2, 2, dtype=F64))
VALID_SOLVERS = "valid names are " + ", ".join(repr(k) for k in SOLVERS)
VALID_BACKWARDS = "valid names are " + ", ".join(repr(k) for k in BACKWARDS)


def f(z):
    return 0.5 * z + 1.0


def cell(z, x):
    return 0.5 * z + x


W = torch.tensor([[0.5, -0.3, 0.2], [0.1, 0.6, -0.4], [-0.2, 0.3, 0.5]], dtype=F64)


def _nan_at_call(k: int, sample: int = 1, value: float = math.nan):
    """A map that returns ``value`` (NaN) in ``sample`` at its ``k``-th call."""
    calls = [0]

    def g(z):
        calls[0] += 1
        out = torch.tanh(z @ W.T + 1.0)
        if calls[0] == k:
            out = out.clone()
            out[sample, 0] = value
        return out

    return g


# non-finite values appearing during the solve: (id, entry point, _nan_at_call arguments, keyword
# arguments, message fragment)
_NONFINITE_DURING_SOLVE = [
    (
        "nan-first-call",
        eq.solve,
        (1,),
        {"solver": "picard", "tol": 1e-12},
        "at iteration 1: the map returned NaN or inf (samples 1)",
    ),
    *(
        (
            f"nan-later-{name}",
            eq.solve,
            (4,),
            {"solver": name, "tol": 1e-15, "max_iter": 20},
            "in the solve at iteration 4: the map returned NaN or inf (samples 1)",
        )
        for name in SOLVER_NAMES
    ),
    (
        "nan-fixed-point",
        eq.fixed_point,
        (3,),
        {"backward": "phantom", "tol": 1e-15},
        "non-finite values in the solve at iteration 3: the map returned",
    ),
    (
        "inf-later-rel",
        eq.solve,
        (2, 0, math.inf),
        {"solver": "broyden", "tol": 1e-15},
        "at iteration 2: the map returned NaN or inf (samples 0)",
    ),
    (
        "inf-later-abs",
        eq.solve,
        (2, 0, math.inf),
        {"solver": "broyden", "stop": "abs"},
        "at iteration 2: the map returned NaN or inf (samples 0)",
    ),
]


BAD_INPUTS = [
    # --- registry names -----------------------------------------------------------------------
    pytest.param(
        lambda: eq.solve(f, Z, solver="newton"), ValueError, VALID_SOLVERS, id="solver-name"
    ),
    pytest.param(
        lambda: eq.fixed_point(f, Z, solver="Anderson"), ValueError, VALID_SOLVERS, id="fp-solver"
    ),
    pytest.param(lambda: eq.DEQ(cell, solver="x"), ValueError, VALID_SOLVERS, id="deq-solver"),
    pytest.param(
        lambda: eq.Implicit(solver="x"), ValueError, "unknown Implicit solver 'x'", id="adj-solver"
    ),
    pytest.param(
        lambda: eq.fixed_point(f, Z, backward="ift"), ValueError, VALID_BACKWARDS, id="backward"
    ),
    pytest.param(lambda: eq.DEQ(cell, backward="x"), ValueError, VALID_BACKWARDS, id="deq-bwd"),
    pytest.param(
        lambda: eq.solve(f, Z, solver=3),
        TypeError,
        "solver must be a name ('picard', 'anderson', 'broyden')",
        id="solver-int",
    ),
    pytest.param(
        lambda: eq.solve(f, Z, solver=eq.Anderson),
        TypeError,
        "solver must be a name ('picard', 'anderson', 'broyden')",
        id="solver-class",
    ),
    pytest.param(
        lambda: eq.fixed_point(f, Z, backward=eq.Implicit),
        TypeError,
        "backward must be a name",
        id="backward-class",
    ),
    # --- solver hyper-parameters --------------------------------------------------------------
    pytest.param(lambda: eq.Anderson(m=0), ValueError, "Anderson m must be an int >= 1, got 0"),
    pytest.param(lambda: eq.Anderson(m=2.0), TypeError, "Anderson m must be an int"),
    pytest.param(lambda: eq.Anderson(lam=-1e-3), ValueError, "Anderson lam must be in"),
    pytest.param(lambda: eq.Anderson(lam=math.nan), ValueError, "Anderson lam must be in"),
    pytest.param(  # an int beyond float range: no OverflowError from float()
        lambda: eq.Anderson(lam=10**400),
        ValueError,
        "Anderson lam must be in [0.0, 1000000.0], got 1000",
    ),
    pytest.param(lambda: eq.Anderson(beta=0), ValueError, "Anderson beta must be in (0.0, 1.0]"),
    pytest.param(lambda: eq.Anderson(beta=1.5), ValueError, "Anderson beta must be in (0.0, 1.0]"),
    pytest.param(lambda: eq.Anderson(mm=3), TypeError, "unexpected keyword argument 'mm'"),
    pytest.param(lambda: eq.Picard(damping=0), ValueError, "Picard damping must be in (0.0, 1.0]"),
    pytest.param(lambda: eq.Picard(damping=1.5), ValueError, "Picard damping must be in"),
    pytest.param(lambda: eq.Picard(damping="1"), TypeError, "Picard damping must be a real number"),
    pytest.param(lambda: eq.Broyden(memory=0), ValueError, "Broyden memory must be an int >="),
    pytest.param(lambda: eq.Broyden(max_backtracks=0), ValueError, "Broyden max_backtracks"),
    pytest.param(
        lambda: eq.Broyden(line_search=1), TypeError, "Broyden line_search must be a bool"
    ),
    # --- backward hyper-parameters ------------------------------------------------------------
    pytest.param(lambda: eq.Phantom(steps=0), ValueError, "Phantom steps must be an int >= 1"),
    pytest.param(lambda: eq.Phantom(steps=2.5), TypeError, "Phantom steps must be an int"),
    pytest.param(
        lambda: eq.Phantom(damping=0), ValueError, "Phantom damping must be in (0.0, 1.0]"
    ),
    pytest.param(lambda: eq.Phantom(damping=2), ValueError, "Phantom damping must be in"),
    pytest.param(lambda: eq.Neumann(steps=0), ValueError, "Neumann steps must be an int >= 1"),
    pytest.param(lambda: eq.Neumann(damping=-1), ValueError, "Neumann damping must be in"),
    pytest.param(lambda: eq.Implicit(tol=-1), ValueError, "Implicit tol must be in [0.0,"),
    pytest.param(lambda: eq.Implicit(max_iter=0), ValueError, "Implicit max_iter must be an int"),
    pytest.param(lambda: eq.Implicit(stop="l2"), ValueError, "Implicit stop must be one of"),
    pytest.param(
        lambda: eq.Implicit(warn_unconverged="no"),
        TypeError,
        "warn_unconverged must be a bool",
        id="implicit-warn",
    ),
    # --- solve options ------------------------------------------------------------------------
    pytest.param(
        lambda: eq.solve(f, Z, tol=-0.0001), ValueError, "tol must be in [0.0,", id="tol-neg-small"
    ),
    pytest.param(lambda: eq.solve(f, Z, tol=-1e-3), ValueError, "tol must be in", id="tol-neg"),
    pytest.param(lambda: eq.solve(f, Z, tol=math.nan), ValueError, "got nan", id="tol-nan"),
    pytest.param(
        lambda: eq.solve(f, Z, tol=math.inf),
        ValueError,
        "tol must be in [0.0, inf), got inf",
        id="tol-inf",
    ),
    pytest.param(lambda: eq.solve(f, Z, tol="1e-3"), TypeError, "tol must be a real number"),
    pytest.param(lambda: eq.solve(f, Z, tol=True), TypeError, "tol must be a real number"),
    pytest.param(lambda: eq.solve(f, Z, max_iter=0), ValueError, "max_iter must be an int >= 1"),
    pytest.param(lambda: eq.solve(f, Z, max_iter=1.5), TypeError, "max_iter must be an int"),
    pytest.param(lambda: eq.solve(f, Z, max_iter=True), TypeError, "max_iter must be an int"),
    pytest.param(
        lambda: eq.fixed_point(f, Z, max_iter=-3), ValueError, "max_iter must be an int >= 1"
    ),
    pytest.param(
        lambda: eq.solve(f, Z, stop="foo"), ValueError, "stop must be one of 'abs', 'rel'"
    ),
    pytest.param(
        lambda: eq.solve(f, Z, warn_unconverged=1), TypeError, "warn_unconverged must be a bool"
    ),
    pytest.param(lambda: eq.solve(f, Z, tolerance=1e-3), TypeError, "unexpected keyword"),
    pytest.param(lambda: eq.fixed_point(f, Z, adjoint="x"), TypeError, "unexpected keyword"),
    pytest.param(lambda: eq.solve(f, Z, compact=1), TypeError, "compact must be a bool"),
    pytest.param(
        lambda: eq.fixed_point(f, Z, backward="unrolled", compact=True),
        ValueError,
        "compact=True cannot be combined with backward='unrolled'",
        id="compact-unrolled",
    ),
    pytest.param(
        lambda: eq.DEQ(cell, backward="unrolled", compact=True),
        ValueError,
        "compact=True cannot be combined with backward='unrolled'",
        id="deq-compact-unrolled",
    ),
    pytest.param(lambda: eq.DEQ(cell, compact="yes"), TypeError, "compact must be a bool"),
    # --- the map ------------------------------------------------------------------------------
    pytest.param(lambda: eq.solve(3, Z), TypeError, "f must be callable", id="f-int"),
    pytest.param(
        lambda: eq.solve(lambda z: (z, z), Z),
        TypeError,
        "f must return the same structure as the state (a tensor), got a tuple of 2 items",
        id="f-tuple-for-tensor",
    ),
    pytest.param(
        lambda: eq.solve(lambda z: z[0], PAIR),
        TypeError,
        "f must return the same structure as the state (a tuple of 2 tensors), got a tensor",
        id="f-tensor-for-tuple",
    ),
    pytest.param(
        lambda: eq.solve(lambda z: (z[0],), PAIR),
        TypeError,
        "(a tuple of 2 tensors), got a tuple of 1 items",
        id="f-short-tuple",
    ),
    pytest.param(
        lambda: eq.solve(lambda z: {"a": z["a"], "b": z["c"]}, {"a": Z, "c": Z}),
        TypeError,
        "(a dict with keys ['a', 'c']), got a dict with keys ['a', 'b']",
        id="f-dict-keys",
    ),
    pytest.param(
        lambda: eq.solve(lambda z: [z], Z),
        TypeError,
        "(a tensor), got a list of 1 items",
        id="f-list",
    ),
    pytest.param(
        lambda: eq.solve(lambda z: (z[0], 1.0), PAIR),
        TypeError,
        "f(z)[1] must be a tensor, got float",
        id="f-leaf-float",
    ),
    pytest.param(
        lambda: eq.solve(lambda z: torch.zeros(2, 4, dtype=F64), Z),
        ValueError,
        "f(z) must have the shape of the state, (2, 3), got (2, 4)",
        id="f-shape",
    ),
    pytest.param(
        lambda: eq.solve(lambda z: z[:1], Z),
        ValueError,
        "f(z) must have the shape of the state, (2, 3), got (1, 3)",
        id="f-batch",
    ),
    pytest.param(
        lambda: eq.solve(lambda z: (z[0], z[1][:, 0]), PAIR),
        ValueError,
        "f(z)[1] must have the shape of the state, (2, 2, 2), got (2, 2)",
        id="f-leaf-shape",
    ),
    pytest.param(
        lambda: eq.solve(lambda z: z.float(), Z),
        TypeError,
        "f(z) must have the dtype of the state, torch.float64, got torch.float32",
        id="f-dtype",
    ),
    pytest.param(
        lambda: eq.fixed_point(lambda z: (z[0], z[1].float()), PAIR),
        TypeError,
        "f(z)[1] must have the dtype of the state, torch.float64, got torch.float32",
        id="f-leaf-dtype",
    ),
    pytest.param(  # "meta" stands in for a GPU: the check is the same on any other device
        lambda: eq.solve(lambda z: z.to("meta"), Z),
        ValueError,
        f"f(z) must be on the device of the state, {Z.device}, got meta",
        id="f-device",
    ),
    pytest.param(
        lambda: eq.fixed_point(lambda z: (z[0], z[1].to("meta")), PAIR),
        ValueError,
        "f(z)[1] must be on the device of the state",
        id="f-leaf-device",
    ),
    pytest.param(
        lambda: eq.DEQ(lambda z, x: z[:, :2])(Z),
        ValueError,
        "must have the shape of the state",
        id="deq-cell-shape",
    ),
    # --- the initial state --------------------------------------------------------------------
    pytest.param(
        lambda: eq.solve(f, {Z}),
        TypeError,
        "z0 must be a tensor, a tuple, list or dict of tensors, got an object of type set",
        id="z0-set",
    ),
    pytest.param(
        lambda: eq.solve(f, torch.zeros(2, 3, dtype=torch.int64)),
        TypeError,
        "z0 must have a floating dtype, got torch.int64",
        id="z0-int",
    ),
    pytest.param(
        lambda: eq.solve(f, torch.tensor(1.0, dtype=F64)),
        ValueError,
        "z0 must be batch-first (at least one dimension, the batch), got shape ()",
        id="z0-0d",
    ),
    pytest.param(lambda: eq.solve(f, ()), ValueError, "z0 must contain at least one tensor"),
    pytest.param(
        lambda: eq.solve(f, (Z, 1.0)), TypeError, "z0[1] must be a tensor, got float", id="z0-leaf"
    ),
    pytest.param(
        lambda: eq.solve(f, (Z, torch.zeros(3, 3, dtype=F64))),
        ValueError,
        "must have the same batch size",
        id="z0-batch",
    ),
    pytest.param(
        lambda: eq.solve(f, {"a": Z, "b": Z.float()}),
        ValueError,
        "every tensor in z0 must share one dtype and device: z0['b'] is torch.float32",
        id="z0-dtype-mix",
    ),
    pytest.param(
        lambda: eq.solve(f, torch.tensor([[0.0, 1.0], [math.nan, 0.0]], dtype=F64)),
        eq.NonFiniteError,
        "the initial state of the solve contains NaN or inf (samples 1)",
        id="z0-nan",
    ),
    pytest.param(
        lambda: eq.fixed_point(f, torch.tensor([[math.inf, 1.0]], dtype=F64)),
        eq.NonFiniteError,
        "initial state",
        id="z0-inf",
    ),
    # --- non-finite values appearing during the solve ------------------------------------------
    *(
        pytest.param(
            lambda run=run, at=at, kw=kw: run(_nan_at_call(*at), Z, **kw),
            eq.NonFiniteError,
            message,
            id=case,
        )
        for case, run, at, kw, message in _NONFINITE_DURING_SOLVE
    ),
    # --- DEQ ----------------------------------------------------------------------------------
    pytest.param(lambda: eq.DEQ(3), TypeError, "cell must be callable as cell(z, x)"),
    pytest.param(lambda: eq.DEQ(cell, init=3), TypeError, "init must be callable as init(x)"),
    pytest.param(
        lambda: eq.DEQ(cell, eval_max_iter=0), ValueError, "eval_max_iter must be an int >= 1"
    ),
    pytest.param(lambda: eq.DEQ(cell, eval_max_iter=2.5), TypeError, "eval_max_iter must be an"),
    pytest.param(lambda: eq.DEQ(cell, eval_tol=-1.0), ValueError, "eval_tol must be in [0.0,"),
    pytest.param(lambda: eq.DEQ(cell, max_iter=0), ValueError, "max_iter must be an int >= 1"),
    pytest.param(lambda: eq.DEQ(cell, stop="max"), ValueError, "stop must be one of"),
    pytest.param(lambda: eq.DEQ(cell, tolerance=1.0), TypeError, "unexpected keyword"),
    pytest.param(
        lambda: eq.DEQ(cell)({"x": Z}), TypeError, "z0 is required when x is not a tensor"
    ),
    pytest.param(
        lambda: eq.DEQ(cell, backward="jfb")(Z, states=0),
        ValueError,
        "states must be an int >= 1, got 0",
        id="deq-states-0",
    ),
    pytest.param(
        lambda: eq.DEQ(cell, backward="jfb", compact=True)(Z, states=2),
        ValueError,
        "states=2 (fixed-point correction) cannot be combined with compact=True",
        id="deq-states-compact",
    ),
    pytest.param(
        lambda: eq.DEQ(cell, backward="unrolled")(Z, states=2),
        TypeError,
        "backward for fixed-point correction must be eq.Implicit(), eq.Neumann(), "
        "eq.Phantom(...) or eq.JFB(), got eq.Unrolled()",
        id="deq-states-unrolled",
    ),
    pytest.param(  # a correction path given does not hide it (was: 'only through ... DEQ')
        lambda: eq.DEQ(cell, correction="jfb")(Z, states=2, backward="unrolled"),
        TypeError,
        "backward for fixed-point correction must be eq.Implicit(), eq.Neumann(), "
        "eq.Phantom(...) or eq.JFB(), got eq.Unrolled()",
        id="deq-states-override-unrolled-with-correction",
    ),
    pytest.param(
        lambda: eq.fixed_point_states(f, Z, 2, backward="unrolled", correction="jfb"),
        TypeError,
        "backward for fixed-point correction must be eq.Implicit(), eq.Neumann(), "
        "eq.Phantom(...) or eq.JFB(), got eq.Unrolled()",
        id="states-unrolled-with-correction",
    ),
    pytest.param(
        lambda: eq.DEQ(cell, correction=eq.Implicit()),
        TypeError,
        "correction (the gradient path of the states before the last) must be eq.Phantom(...) "
        "or eq.JFB()",
        id="deq-correction-implicit",
    ),
    # --- per-call overrides: validated like the constructor's arguments -----------------------
    pytest.param(
        lambda: eq.DEQ(cell)(Z, max_iter=0), ValueError, "max_iter must be an int >= 1, got 0"
    ),
    pytest.param(lambda: eq.DEQ(cell)(Z, tol=-1.0), ValueError, "tol must be in [0.0, inf)"),
    pytest.param(lambda: eq.DEQ(cell)(Z, max_iter=2.5), TypeError, "max_iter must be an int"),
    pytest.param(lambda: eq.DEQ(cell)(Z, solver="newton"), ValueError, "unknown solver 'newton'"),
    pytest.param(lambda: eq.DEQ(cell)(Z, backward="ift"), ValueError, "unknown backward 'ift'"),
    pytest.param(
        lambda: eq.DEQ(cell, compact=True)(Z, backward="unrolled"),
        ValueError,
        "compact=True cannot be combined with backward='unrolled'",
        id="deq-override-unrolled-compact",
    ),
    pytest.param(lambda: eq.DEQ(cell)(Z, maxiter=3), TypeError, "unexpected keyword"),
    # --- fixed-point correction ---------------------------------------------------------------
    pytest.param(
        lambda: eq.fixed_point_states(f, Z, 3, backward="implicit", correction=eq.Implicit()),
        TypeError,
        "correction (the gradient path of the states before the last) must be eq.Phantom(...) "
        "or eq.JFB(): those states are not equilibria",
        id="states-correction-implicit",
    ),
    pytest.param(
        lambda: eq.fixed_point_states(f, Z, 3, correction="neumann"),
        TypeError,
        "correction (the gradient path of the states before the last) must be",
        id="states-correction-neumann",
    ),
    pytest.param(
        lambda: eq.fixed_point_states(f, Z, 3, correction="phantm"),
        ValueError,
        "unknown correction 'phantm': " + VALID_BACKWARDS,
        id="states-correction-unknown",
    ),
    pytest.param(
        lambda: eq.fixed_point_states(f, Z, 0), ValueError, "n must be an int >= 1", id="n-0"
    ),
    pytest.param(lambda: eq.fixed_point_states(f, Z, 2.0), TypeError, "n must be an int", id="n-f"),
    pytest.param(
        lambda: eq.correction_loss([]),
        ValueError,
        "losses must be a non-empty sequence",
        id="losses-empty",
    ),
    pytest.param(
        lambda: eq.correction_loss(torch.ones(3)),
        TypeError,
        "losses must be a list or tuple of scalar tensors, one per state, got Tensor",
        id="losses-tensor",
    ),
    pytest.param(
        lambda: eq.correction_loss(torch.ones(()) for _ in range(2)),
        TypeError,
        "losses must be a list or tuple of scalar tensors, one per state, got generator",
        id="losses-generator",
    ),
    pytest.param(
        lambda: eq.fixed_point(lambda z: 0.5 * z, Z, compact=True),
        TypeError,
        "with compact=True, f is called as f(z, index)",
        id="compact-one-argument-f",
    ),
    pytest.param(
        lambda: eq.solve(lambda z: 0.5 * z, Z, compact=True),
        TypeError,
        "but f takes no second argument",
        id="compact-one-argument-f-solve",
    ),
    pytest.param(
        lambda: eq.fixed_point_states(f, Z, 3, backward="unrolled"),
        TypeError,
        "backward for fixed-point correction must be eq.Implicit(), eq.Neumann(), "
        "eq.Phantom(...) or eq.JFB(), got eq.Unrolled()",
        id="states-unrolled-name",
    ),
    pytest.param(
        lambda: eq.fixed_point_states(f, Z, 3, backward="phantm"),
        ValueError,
        "unknown backward 'phantm': " + VALID_BACKWARDS,
        id="states-unknown-name",
    ),
    pytest.param(
        lambda: eq.correction_loss([torch.ones(()), 2.0]),
        ValueError,
        "losses[1] must be a scalar (0-d) tensor, got 2.0",
        id="losses-float",
    ),
    pytest.param(
        lambda: eq.correction_loss([torch.ones(3)]),
        ValueError,
        "losses[0] must be a scalar (0-d) tensor, got a tensor of shape (3,)",
        id="losses-vector",
    ),
    pytest.param(
        lambda: eq.correction_loss([torch.ones(())], gamma=0.0),
        ValueError,
        "gamma must be in (0.0, 1.0], got 0.0",
        id="gamma-0",
    ),
    pytest.param(
        lambda: eq.correction_loss([torch.ones(())], gamma=1.5),
        ValueError,
        "gamma must be in (0.0, 1.0], got 1.5",
        id="gamma-big",
    ),
    pytest.param(
        lambda: eq.jacobian_penalty(f, Z, generator=0),
        TypeError,
        "generator must be a torch.Generator or None, got int 0",
        id="penalty-generator",
    ),
    pytest.param(
        lambda: eq.spectral_radius(f, Z, generator="seed"),
        TypeError,
        "generator must be a torch.Generator or None, got str 'seed'",
        id="radius-generator",
    ),
]


@pytest.mark.parametrize(("thunk", "exc", "fragment"), BAD_INPUTS)
def test_bad_input(thunk, exc, fragment):
    with pytest.raises(exc, match=re.escape(fragment)):
        thunk()


def test_nonfinite_error_is_a_floating_point_error():
    assert issubclass(eq.NonFiniteError, FloatingPointError)


def test_nonfinite_solver_update_is_named():
    class NaNPicard(eq.Picard):
        def step(self, fn, x, fx, g, state):
            out = super().step(fn, x, fx, g, state)
            x = out.x.clone()
            x[0, 1] = math.nan
            fx = fn(x)
            return out._replace(x=x, fx=fx, g=fx - x)

    with pytest.raises(
        eq.NonFiniteError, match=re.escape("at iteration 2: the solver's update produced NaN")
    ):
        eq.solve(f, Z, solver=NaNPicard(), tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rel_residual_of_a_zero_image_is_not_an_overflow(dtype):
    # f(z) = 0 has the fixed point 0, reached exactly by one Picard step
    z0 = torch.full((2, 4), 3.0, dtype=dtype)
    sol = eq.solve(lambda z: 0.0 * z, z0, solver="picard", stop="rel")
    assert sol.status is eq.Status.CONVERGED
    assert float(sol.value.abs().max()) == 0.0


def test_tiny_float32_state_does_not_converge_silently():
    # f(z) = 0.5 z + 1e-23: fixed point 2e-23; from z0 = 0 the relative residual is 1 (nothing is
    # converged), but ||f(z0) - z0||^2 = 1e-46 underflows in float32
    sol = eq.solve(lambda z: 0.5 * z + 1e-23, torch.zeros(2, 3), solver="picard", tol=1e-5)
    assert sol.nstep > 1
    torch.testing.assert_close(sol.value, torch.full((2, 3), 2e-23), rtol=1e-4, atol=0)


def test_unrolled_does_not_warn():
    # Regression: the unrolled solve once converted a residual that requires grad to a Python
    # float, and torch warned "Converting a tensor with requires_grad=True to a scalar". torch
    # emits that warning once per process, so check it in a fresh interpreter.
    code = textwrap.dedent(
        """
        import warnings
        import torch
        import equilibria as eq
        warnings.simplefilter("error")
        w = (0.5 * torch.eye(3, dtype=torch.float64)).requires_grad_()
        z, sol = eq.fixed_point(lambda z: z @ w.T + 1.0, torch.zeros(2, 3, dtype=torch.float64),
                                backward="unrolled")
        z.sum().backward()
        assert sol.status is eq.Status.CONVERGED
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- running out of budget is a status, never silent ----------------------------------------


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_out_of_budget_is_reported(name):
    p = BatchAffine.make([1e-4, 0.99, 1e-4, 0.999], d=16, seed=1)
    sol = eq.solve(p.f, p.z0(), solver=name, tol=1e-8, max_iter=6)
    assert sol.status is eq.Status.MAX_ITER
    assert not sol.all_converged
    assert sol.converged.tolist() == [True, False, True, False]
    assert bool((sol.residual[~sol.converged] >= 1e-8).all())
    assert "max_iter" in repr(sol) and "2/4" in repr(sol)


def test_out_of_budget_warns_when_asked():
    p = BatchAffine.make([1e-4, 0.99, 1e-4, 0.999], d=16, seed=1)
    match = re.escape("the solve ended with status 'max_iter' after 3 iterations: 2 of 4 samples")
    with pytest.warns(RuntimeWarning, match=match):
        eq.solve(p.f, p.z0(), solver="picard", tol=1e-8, max_iter=3, warn_unconverged=True)
    # no warning unless asked (warnings are errors in this test suite), none when converged
    eq.solve(p.f, p.z0(), solver="picard", tol=1e-8, max_iter=3)
    eq.solve(p.f, p.z0(), solver="broyden", tol=1e-3, max_iter=400, warn_unconverged=True)


def test_fixed_point_and_deq_warn_when_asked():
    p = Affine.make(radius=0.95, seed=2)
    with pytest.warns(RuntimeWarning, match="the forward solve ended with status 'max_iter'"):
        _, sol = eq.fixed_point(p.f, p.z0(), max_iter=2, warn_unconverged=True)
    assert not bool(sol.converged.any())
    layer = eq.DEQ(lambda z, x: z @ p.A.T + x, max_iter=2, warn_unconverged=True)
    with pytest.warns(RuntimeWarning, match="the forward solve ended"):
        layer(p.b)
    assert layer.last_solution.status is eq.Status.MAX_ITER


def test_implicit_backward_out_of_budget_warns_and_reports():
    p = Affine.make(radius=0.95, seed=3, symmetric=False)
    a = p.A.clone().requires_grad_()
    backward = eq.Implicit(solver="picard", max_iter=3, warn_unconverged=True)
    z, sol = eq.fixed_point(lambda z: z @ a.T + p.b, p.z0(), backward=backward, tol=1e-10)
    assert sol.status is eq.Status.CONVERGED
    with pytest.warns(RuntimeWarning, match="the implicit backward solve ended with status"):
        z.sum().backward()
    assert sol.backward.nstep == 3
    assert not bool(sol.backward.converged.all())
    assert sol.backward.solution.status is eq.Status.MAX_ITER


def _divergence_step(f, z0, dtype=F64, max_iter=100):
    """The step at which a Picard solve of ``f`` from ``z0`` must stop as DIVERGED, by a hand loop:
    the first whose abs residual ||f(z) - z|| exceeds DIVERGENCE_FACTOR times the lowest that
    sample has had, the lowest floored at eps times the batch's largest ||f(z0)|| or first
    residual, whichever is larger."""
    z, lowest, floor = z0, None, None
    for nstep in range(1, max_iter + 1):
        r = torch.linalg.vector_norm(f(z) - z, dim=1)
        if lowest is None:
            scale = max(float(r.max()), float(torch.linalg.vector_norm(f(z), dim=1).max()))
            lowest, floor = r, torch.finfo(dtype).eps * scale
        elif bool((r > DIVERGENCE_FACTOR * lowest.clamp_min(floor)).any()):
            return nstep
        lowest = torch.minimum(lowest, r)
        z = f(z)
    raise AssertionError("no divergence within the budget")


def test_divergence_is_reported_in_the_rel_norm_too():
    # in the rel norm this map's residual tends to 0.9, but ||f(z) - z|| grows 10x per step
    z0 = torch.zeros(3, 2, dtype=F64)
    sol = eq.solve(lambda z: 10.0 * z + 1.0, z0, solver="picard", tol=1e-8, max_iter=100)
    want = _divergence_step(lambda z: 10.0 * z + 1.0, z0)
    assert want == math.floor(math.log10(DIVERGENCE_FACTOR)) + 2
    assert sol.status is eq.Status.DIVERGED and sol.nstep == want, (sol.nstep, want)


def test_divergence_is_per_sample_with_a_floored_lowest_residual():
    # sample 0 grows 10x per step from a residual far below the round-off floor (eps times the
    # largest ||f(z0)||, sample 2's), so its growth counts from the floor; sample 1 has a
    # constant residual of 1 and sample 2 one of 1e12 (never a blow-up: a rule on the batch's
    # largest residual would not fire until sample 0 passed 1e12 * DIVERGENCE_FACTOR)
    shift = torch.tensor([[1e-25], [1.0], [1e12]], dtype=F64)
    grow = torch.tensor([[10.0], [1.0], [1.0]], dtype=F64)

    def f(z):
        return grow * z + shift

    z0 = torch.zeros(3, 1, dtype=F64)
    want = _divergence_step(f, z0)
    # with the floor and per sample: 1e-25 * 10^k > FACTOR * eps * 1e12
    k = math.floor(math.log10(DIVERGENCE_FACTOR * torch.finfo(F64).eps * 1e12 / 1e-25)) + 1
    assert want == k + 1, (want, k)
    sol = eq.solve(f, z0, solver="picard", tol=1e-8, max_iter=100, stop="abs")
    assert sol.status is eq.Status.DIVERGED and sol.nstep == want, (sol.status, sol.nstep, want)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_a_sample_whose_image_is_zero_is_not_divergence(name):
    # z -> relu(0.5 z + b): sample 1 is started at 4 and its fixed point is 0, where f(z) = 0 and
    # the rel residual is undefined; the solve converges instead of stopping as DIVERGED
    b = torch.tensor([[0.5, 0.5], [-1.0, -1.0]], dtype=F64)

    def f(z):
        return torch.relu(0.5 * z + b)

    z0 = torch.tensor([[0.0, 0.0], [4.0, 4.0]], dtype=F64)
    sol = eq.solve(f, z0, solver=name, tol=1e-8, max_iter=200)
    assert sol.status is eq.Status.CONVERGED, (sol.status, sol.nstep)
    torch.testing.assert_close(sol.value, torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_a_residual_of_exactly_zero_is_not_followed_by_divergence(name, dtype):
    # tol=0 runs the whole budget: once the residual hits exactly 0, the round-off noise of the
    # next iterations must not count as a blow-up (an affine map Anderson solves exactly)
    a = torch.tensor([[0.5, 0.1], [0.0, 0.3]], dtype=dtype)
    sol = eq.solve(lambda z: z @ a.T + 1.0, torch.zeros(1, 2, dtype=dtype), solver=name, tol=0.0)
    assert sol.status is eq.Status.MAX_ITER and sol.nstep == 50, (sol.status, sol.nstep)
    want = torch.linalg.solve(torch.eye(2, dtype=F64) - a.double(), torch.ones(2, dtype=F64))
    torch.testing.assert_close(sol.value[0].double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_a_warm_start_at_the_fixed_point_is_not_divergence(name):
    # re-solving from a converged float32 solution with tol=0 (the whole budget): the first
    # residuals are already round-off, and the noise of the next iterations is not a blow-up
    torch.manual_seed(0)
    w, x = 0.3 * torch.randn(3, 3), torch.randn(64, 3)

    def f(z):
        return torch.tanh(z @ w.T + x)

    first = eq.solve(f, torch.zeros(64, 3), solver=name, tol=0.0, max_iter=200)
    again = eq.solve(f, first.value.clone(), solver=name, tol=0.0, max_iter=50)
    assert again.status is eq.Status.MAX_ITER and again.nstep == 50, (again.status, again.nstep)
    assert float(again.residual.max()) < 1e-5


def test_divergence_is_reported():
    # f(z) = 10 z + 1: Picard moves away from the fixed point -1/9 by a factor 10 per step
    z0 = torch.zeros(3, 2, dtype=F64)
    sol = eq.solve(
        lambda z: 10.0 * z + 1.0, z0, solver="picard", tol=1e-8, max_iter=100, stop="abs"
    )
    assert sol.status is eq.Status.DIVERGED
    # ||f(z) - z|| = sqrt(2) 10^(n-1) at step n: the first step past DIVERGENCE_FACTOR times the
    # first (the lowest) residual
    want = _divergence_step(lambda z: 10.0 * z + 1.0, z0)
    assert want == math.floor(math.log10(DIVERGENCE_FACTOR)) + 2
    assert sol.nstep == want, (sol.nstep, want)
    assert not bool(sol.converged.any())
    torch.testing.assert_close(sol.value, z0, rtol=0, atol=0)  # the best iterate
    torch.testing.assert_close(
        sol.residual, torch.full((3,), 2**0.5, dtype=F64), rtol=1e-15, atol=0
    )
    with pytest.warns(RuntimeWarning, match="status 'diverged'"):
        eq.solve(lambda z: 10.0 * z + 1.0, z0, solver="picard", stop="abs", warn_unconverged=True)
    # in the rel norm the residual of this map tends to 0.9: not converged, never silently
    sol = eq.solve(lambda z: 10.0 * z + 1.0, z0, solver="picard", tol=1e-8, max_iter=100)
    assert sol.status is not eq.Status.CONVERGED and not bool(sol.converged.any())


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize("max_iter", [1, 2, 5, 2000])
def test_status_agrees_with_per_sample_flags(name, max_iter):
    # max_iter=2000 is plenty for every solver: the converging case
    p = Affine.make(batch=5, d=8, radius=0.95, seed=4, symmetric=False)
    sol = eq.solve(p.f, p.z0(), solver=name, tol=1e-6, max_iter=max_iter)
    converges = max_iter == 2000
    if converges:
        assert sol.nstep < max_iter
        assert sol.status is eq.Status.CONVERGED
    else:
        assert sol.nstep == max_iter
        assert sol.status is eq.Status.MAX_ITER
    assert (sol.status is eq.Status.CONVERGED) == bool(sol.converged.all()) is converges
    torch.testing.assert_close(sol.converged, sol.residual < 1e-6, rtol=0, atol=0)
