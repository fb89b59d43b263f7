"""Mixed precision, torch.compile, and host synchronisations per iteration.

Precision: under ``torch.autocast(device, dtype=torch.bfloat16)`` the cell runs in bfloat16 while
the state stays in its own dtype (float32) and the solver's arithmetic (Anderson's bordered
least-squares system included) runs with autocast off, in float32 or better.

Compile: one compiled cell (module scope, so dynamo compiles a few graphs once) runs inside every
solver and backward method; a counting backend proves that the compiled graph, not an eager
fallback, did the work. The fast tests use ``backend="aot_eager"`` (AOTAutograd, no code
generation); the inductor test is marked slow.

Host synchronisations: every solver iteration moves the per-sample residual norms to the host once
(``equilibria._iterate.to_host``); any other host sync (``.item()``, ``bool(tensor)``, ...) must not
depend on the number of iterations.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _cells import backward_reference
from _problems import BACKWARD_NAMES, DEVICE, F64, SOLVER_NAMES, Tanh, gen, loss, rel_err
from torch import nn

import equilibria as eq
import equilibria._iterate as iterate_module
from equilibria._solvers import anderson as anderson_module

BF16 = torch.bfloat16
SOLVERS_LS = [*SOLVER_NAMES, eq.Broyden(line_search=True)]


class LinearCell(nn.Module):
    """f(z, x) = tanh(lin(z) + inj(x)), ||lin.weight||_2 = 0.5, float32 parameters; records the
    dtype of its pre-activation and whether autocast was on."""

    def __init__(self, d=16, seed=0, dtype=torch.float32):
        super().__init__()
        g = gen(seed)
        self.lin = nn.Linear(d, d, dtype=dtype)
        self.inj = nn.Linear(d, d, dtype=dtype)
        with torch.no_grad():
            w = torch.randn(d, d, generator=g, dtype=dtype)
            self.lin.weight.copy_(0.5 * w / torch.linalg.matrix_norm(w, ord=2))
            self.inj.weight.copy_(torch.randn(d, d, generator=g, dtype=dtype) / d**0.5)
            self.lin.bias.zero_()
            self.inj.bias.copy_(torch.randn(d, generator=g, dtype=dtype))
        self.seen = []

    def forward(self, z, x):
        u = self.lin(z) + self.inj(x)
        self.seen.append((u.dtype, torch.is_autocast_enabled(DEVICE.type)))
        return torch.tanh(u)


def _x(batch=8, d=16, seed=1, dtype=torch.float32):
    return torch.randn(batch, d, generator=gen(seed), dtype=dtype)


def _loss64(z):
    """``loss`` of a float32 state evaluated in float64 (its targets drawn in float32)."""
    g = gen(123)
    target = torch.randn(z.shape, generator=g, dtype=torch.float32).to(z.dtype)
    weight = torch.randn(z.shape, generator=g, dtype=torch.float32).to(z.dtype)
    return 0.5 * ((z - target) ** 2).sum() + (weight * z).sum()


def _reference64(cell, x, backward, loss_fn):
    """The gradients ``backward`` computes w.r.t. the cell's parameters, from a float64 copy of the
    cell with a dense z* (dense IFT solve for implicit, explicit loops for the phantom methods)."""
    cell64 = copy.deepcopy(cell).double()
    x64 = x.double()
    params = list(cell64.parameters())
    z0 = torch.zeros(x.shape[0], 16, dtype=F64)
    return backward_reference(lambda z: cell64(z, x64), z0, params, loss_fn, backward)


@pytest.fixture
def anderson_systems(monkeypatch):
    """Record (dtype of the bordered system, autocast on?) at every Anderson mixing step."""
    seen = []
    real = anderson_module._mixing

    def recording(state):
        seen.append((state.system.dtype, torch.is_autocast_enabled(DEVICE.type)))
        return real(state)

    monkeypatch.setattr(anderson_module, "_mixing", recording)
    return seen


# --- mixed precision ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS_LS)
def test_autocast_solves_converge_in_float32_state(solver):
    cell = LinearCell()
    x = _x()
    z0 = torch.zeros(8, 16)
    with torch.autocast(DEVICE.type, dtype=BF16):
        sol = eq.solve(lambda z: cell(z, x), z0, solver=solver, tol=1e-2, max_iter=50)
    assert sol.all_converged
    assert sol.value.dtype == torch.float32
    # the per-sample statistics stay on the host, where the solver loop computes them
    assert sol.residual.dtype == torch.float64 and sol.residual.device.type == "cpu"
    assert cell.seen and all(s == (BF16, True) for s in cell.seen)  # the cell ran in bfloat16
    reference = eq.solve(lambda z: cell(z, x), z0, solver=solver, tol=1e-6, max_iter=100)
    assert reference.all_converged
    assert rel_err(sol.value, reference.value) < 2e-2
    # the residual the library reports is the float32 residual of the bfloat16 map
    assert float(sol.residual.max()) < 1e-2


def test_anderson_system_is_float32_under_autocast(anderson_systems):
    cell = LinearCell()
    x = _x()
    with torch.autocast(DEVICE.type, dtype=BF16):
        sol = eq.solve(lambda z: cell(z, x), torch.zeros(8, 16), tol=1e-3, max_iter=30)
    assert sol.nstep > 2 and anderson_systems
    # float32 system, solved with autocast off (autocast would run it in bfloat16)
    assert set(anderson_systems) == {(torch.float32, False)}


@pytest.mark.parametrize(
    ("dtype", "system"), [(BF16, torch.float32), (torch.float32, torch.float32), (F64, F64)]
)
def test_anderson_system_dtype_follows_the_state(dtype, system, anderson_systems):
    prob = Tanh.make(batch=4, d=6, norm=0.5, dtype=torch.float32)
    w, x = prob.W.to(dtype), prob.x.to(dtype)
    sol = eq.solve(lambda z: torch.tanh(z @ w.T + x), torch.zeros(4, 6, dtype=dtype), tol=2e-2)
    assert sol.all_converged and sol.value.dtype == dtype
    assert {s for s, _ in anderson_systems} == {system}
    assert rel_err(sol.value.double(), prob.solution().double()) < 2e-2


@pytest.mark.parametrize("backward", ["implicit", "phantom", "neumann", "jfb"])
def test_autocast_fixed_point_gradients_are_close_to_float32(backward):
    cell = LinearCell()
    x = _x()
    params = list(cell.parameters())
    bwd = eq.Implicit(tol=1e-3) if backward == "implicit" else backward

    def grads(autocast):
        with torch.autocast(DEVICE.type, dtype=BF16, enabled=autocast):
            z, sol = eq.fixed_point(
                lambda z: cell(z, x), torch.zeros(8, 16), backward=bwd, tol=1e-2, max_iter=50
            )
            value = loss(z)
        return z, sol, torch.autograd.grad(value, params)

    z, sol, low = grads(True)
    _, _, high = grads(False)
    assert z.dtype == torch.float32 and sol.all_converged
    for a, b in zip(low, high):
        assert a.dtype == torch.float32 and bool(torch.isfinite(a).all())
        assert rel_err(a, b) < 5e-2
    # both against a float64 dense reference (forward tolerance 1e-2 bounds the accuracy)
    assert float(_loss64(z.detach().double())) == pytest.approx(float(loss(z.detach())), rel=1e-5)
    want = _reference64(cell, x, backward, _loss64)
    for a, h, b in zip(low, high, want):
        assert rel_err(a.double(), b) < 2e-2
        assert rel_err(h.double(), b) < 1e-2
    if backward == "implicit":
        assert sol.backward.solution.all_converged


def test_no_grad_iterations_do_not_fill_the_autocast_cast_cache():
    # before torch 2.5 the cast cache kept no-grad low-precision copies of the parameters and the
    # differentiable call after the solve reused them: the parameter gradients vanished (found on
    # torch 2.4.1). The no-grad map calls must run with the cache off, the recorded one with it on.
    cell, x = LinearCell(), _x()
    calls = []

    def f(z):
        calls.append((torch.is_grad_enabled(), torch.is_autocast_cache_enabled()))
        return cell(z, x)

    with torch.autocast(DEVICE.type, dtype=BF16):
        z, _ = eq.fixed_point(f, torch.zeros_like(x), backward="implicit", tol=1e-3)
    no_grad = [cache for grad, cache in calls if not grad]
    with_grad = [cache for grad, cache in calls if grad]
    assert no_grad and not any(no_grad)
    assert with_grad == [True]
    grads = torch.autograd.grad(loss(z), list(cell.parameters()))
    assert all(float(g.abs().sum()) > 0 for g in grads)


def test_autocast_deq_with_a_tuple_state():
    cell = LinearCell()

    def pair_cell(z, x):
        out = cell(torch.cat(z, 1), x)
        return out[:, :10], out[:, 10:]

    def init(x):
        return x.new_zeros(x.shape[0], 10), x.new_zeros(x.shape[0], 6)

    layer = eq.DEQ(pair_cell, init=init, tol=1e-2, backward=eq.Implicit(tol=1e-3))
    x = _x()
    with torch.autocast(DEVICE.type, dtype=BF16):
        a, b = layer(x)
    assert a.dtype == b.dtype == torch.float32 and layer.last_solution.all_converged
    (a.sum() + b.sum()).backward()
    assert bool(torch.isfinite(cell.lin.weight.grad).all())
    # the gradient of sum(z*) by a float64 dense IFT reference on the concatenated state
    want = _reference64(cell, x, "implicit", lambda z: z.sum())
    for name, p, w in zip(
        ["lin.weight", "lin.bias", "inj.weight", "inj.bias"], cell.parameters(), want
    ):
        assert rel_err(p.grad.double(), w) < 2e-2, name


# --- torch.compile -----------------------------------------------------------------------------


class CompileCell(nn.Module):
    """A tiny Linear + tanh cell, float64."""

    def __init__(self, d=6, seed=0):
        super().__init__()
        g = gen(seed)
        self.lin = nn.Linear(d, d, dtype=F64)
        with torch.no_grad():
            w = torch.randn(d, d, generator=g, dtype=F64)
            self.lin.weight.copy_(0.6 * w / torch.linalg.matrix_norm(w, ord=2))
            self.lin.bias.copy_(0.1 * torch.randn(d, generator=g, dtype=F64))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


class Counting:
    """A dynamo backend that wraps another one and counts compilations and compiled-graph runs."""

    def __init__(self, inner):
        self.inner = torch._dynamo.lookup_backend(inner)
        self.compiles = 0
        self.runs = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        compiled = self.inner(gm, example_inputs)

        def run(*args):
            self.runs += 1
            return compiled(*args)

        return run


@pytest.fixture(scope="module")
def compiled():
    torch._dynamo.reset()
    cell = CompileCell()
    backend = Counting("aot_eager")
    yield cell, torch.compile(cell, backend=backend, fullgraph=True), backend
    torch._dynamo.reset()


# dynamo itself reads ``.grad`` of the non-leaf states of the phantom and unrolled backward paths
# while tracing, which makes torch warn; the warning is torch's, not the library's
DYNAMO_GRAD_WARNING = "ignore:The .grad attribute of a Tensor that is not a leaf"


def _run(cell, x, solver, backward, **kwargs):
    layer = eq.DEQ(cell, solver=solver, backward=backward, tol=1e-10, max_iter=100, **kwargs)
    z = layer(x)
    grads = torch.autograd.grad(loss(z), [*cell.parameters(), x])
    return z.detach(), grads, layer.last_solution


@pytest.mark.no_device_mode
@pytest.mark.filterwarnings(DYNAMO_GRAD_WARNING)
@pytest.mark.parametrize("backward", BACKWARD_NAMES)
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_compiled_cell_in_every_solver_and_backward(compiled, solver, backward):
    eager, fast, backend = compiled
    x = torch.randn(4, 6, generator=gen(1), dtype=F64).requires_grad_()
    z_ref, g_ref, sol_ref = _run(eager, x, solver, backward)
    runs = backend.runs
    z, g, sol = _run(fast, x, solver, backward)
    assert backend.runs - runs >= sol.nfev  # every solver call ran the compiled graph
    assert sol.all_converged and sol.nstep == sol_ref.nstep
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert backend.compiles <= 4  # no recompilation per call or per test


@pytest.mark.no_device_mode
@pytest.mark.filterwarnings(DYNAMO_GRAD_WARNING)
@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_compiled_cell_under_compaction(compiled, backward):
    # the batch shrinks: dynamo marks the batch dimension dynamic instead of compiling per size
    eager, fast, backend = compiled
    x = torch.randn(8, 6, generator=gen(2), dtype=F64)
    x[:6] *= 30  # six saturated samples leave the batch early
    x.requires_grad_()
    z_ref, g_ref, sol_ref = _run(eager, x, "anderson", backward, compact=True)
    runs = backend.runs
    z, g, sol = _run(fast, x, "anderson", backward, compact=True)
    assert sol.evaluations == sol_ref.evaluations < 8 * sol.nfev
    assert backend.runs - runs >= sol.nfev
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert backend.compiles <= 8  # below dynamo's recompile limit, so never an eager fallback


@pytest.mark.no_device_mode
@pytest.mark.filterwarnings(DYNAMO_GRAD_WARNING)
@pytest.mark.parametrize(
    ("backward", "compact"),
    # compaction does not combine with the unrolled backward (a documented error)
    [(b, c) for b in BACKWARD_NAMES for c in (False, True) if not (c and b == "unrolled")],
)
def test_compiling_the_whole_deq_runs_the_solver_loop_eagerly(backward, compact):
    # torch.compile on a module that contains a DEQ: the solver loop is not traced (it would
    # recompile on every ring-buffer slot and residual read-back), the results are exact, and
    # later calls compile nothing new
    torch._dynamo.reset()
    layer = eq.DEQ(CompileCell(), backward=backward, tol=1e-10, max_iter=100, compact=compact)
    x = torch.randn(8, 6, generator=gen(3), dtype=F64)
    x[:5] *= 30  # easy samples, so that compaction shrinks the batch
    x.requires_grad_()
    z_ref = layer(x)
    g_ref = torch.autograd.grad(loss(z_ref), [*layer.parameters(), x])
    backend = Counting("aot_eager")
    fast = torch.compile(layer, backend=backend)
    compiles = []
    for _ in range(3):
        z = fast(x)
        g = torch.autograd.grad(loss(z), [*layer.parameters(), x])
        compiles.append(backend.compiles)
    torch._dynamo.reset()
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert compiles[0] == compiles[-1] <= 10, compiles


def test_autocast_with_compaction():
    cell = LinearCell()
    x = _x()
    x[:5] *= 20  # saturated, easy samples
    out = {}
    for compact in (False, True):
        layer = eq.DEQ(cell, tol=1e-2, compact=compact)
        with torch.autocast(DEVICE.type, dtype=BF16):
            out[compact] = (layer(x).detach(), layer.last_solution)
    (z_full, s_full), (z_cmp, s_cmp) = out[False], out[True]
    assert s_cmp.all_converged and s_cmp.evaluations < s_full.evaluations
    assert z_cmp.dtype == torch.float32 and rel_err(z_cmp, z_full) < 2e-2


@pytest.mark.no_device_mode
@pytest.mark.slow
@pytest.mark.filterwarnings(DYNAMO_GRAD_WARNING)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_compiled_cell_in_every_solver_and_backward():
    torch._dynamo.reset()
    eager = CompileCell()
    backend = Counting("inductor")
    fast = torch.compile(eager, backend=backend, fullgraph=True)
    x = torch.randn(4, 6, generator=gen(1), dtype=F64).requires_grad_()
    try:
        for solver in SOLVER_NAMES:
            for backward in BACKWARD_NAMES:
                z_ref, g_ref, _ = _run(eager, x, solver, backward)
                runs = backend.runs
                z, g, sol = _run(fast, x, solver, backward)
                assert backend.runs - runs >= sol.nfev
                torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-10)
                for a, b in zip(g, g_ref):
                    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    finally:
        torch._dynamo.reset()


# --- host synchronisations ---------------------------------------------------------------------

SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def host_syncs(monkeypatch):
    """Count calls of ``to_host`` and, separately, every other tensor-to-host conversion."""
    counts = {"to_host": 0, "other": 0}
    inside = [False]
    real_to_host = iterate_module.to_host

    def to_host(tensors):
        counts["to_host"] += 1
        inside[0] = True
        try:
            return real_to_host(tensors)
        finally:
            inside[0] = False

    monkeypatch.setattr(iterate_module, "to_host", to_host)
    for name in SYNC_METHODS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            if not inside[0]:
                counts["other"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reset():
        counts["to_host"] = counts["other"] = 0

    counts["reset"] = reset
    return counts


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("stop", ["abs", "rel"])
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_one_host_transfer_per_iteration(solver, stop, compact, host_syncs):
    prob = Tanh.make(batch=4, d=6, norm=0.95)

    def f(z, *index):  # with compaction: f(z, index)
        x = prob.x if not index or index[0] is None else prob.x[index[0]]
        return torch.tanh(z @ prob.W.T + x)

    others = []
    for max_iter in (5, 20):
        host_syncs["reset"]()
        sol = eq.solve(
            f, prob.z0(), solver=solver, stop=stop, tol=1e-30, max_iter=max_iter, compact=compact
        )
        assert sol.nstep == max_iter
        assert host_syncs["to_host"] == sol.nstep  # exactly one transfer per iteration
        others.append(host_syncs["other"])
    assert others[0] == others[1] <= 2  # other syncs do not grow with the iterations


def test_one_host_transfer_per_adjoint_iteration(host_syncs):
    prob = Tanh.make(batch=4, d=6, norm=0.95)
    w = prob.W.clone().requires_grad_()
    z, sol = eq.fixed_point(
        lambda z: torch.tanh(z @ w.T + prob.x), prob.z0(), backward=eq.Implicit(tol=1e-10)
    )
    host_syncs["reset"]()
    torch.autograd.grad(loss(z), w)
    assert host_syncs["to_host"] == sol.backward.nstep > 5
    assert host_syncs["other"] <= 2


def test_autocast_float32_cell_output_is_cast_to_a_low_precision_state():
    """A bfloat16 state (z0 = zeros_like(x) of an autocast stem) with a cell whose last op
    autocast keeps in float32 (norms, pooling; here explicit): the output is cast to the state's
    dtype, as documented, instead of a TypeError."""
    cell = LinearCell()
    x = _x()
    layer = eq.DEQ(lambda z, x: cell(z, x).float(), tol=1e-2)
    with torch.autocast(DEVICE.type, dtype=BF16):
        z = layer(x.to(BF16))
    assert z.dtype == BF16 and layer.last_solution.all_converged
    z.float().sum().backward()
    assert bool(torch.isfinite(cell.lin.weight.grad).all())
