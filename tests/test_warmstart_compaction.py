"""Warm starts (z0, the cache_key cache, the adjoint warm start) and per-sample compaction.

Warm starts must save iterations without changing the answer: every warm-started result is compared
with a cold solve. Compaction must give the uncompacted equilibria and gradients to solver
tolerance while passing fewer rows to the cell; the cell records the batch sizes it sees and checks
that every batch-first tensor of its input matches the state's batch.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import pytest
import torch
from _cells import backward_reference, dense_implicit
from _problems import F64, SOLVER_NAMES, gen, loss, rel_err
from torch import nn

import equilibria as eq

TIGHT = {"tol": 1e-11, "max_iter": 300}
ADJ = eq.Implicit(tol=1e-11, max_iter=200)


class Cell(nn.Module):
    """f(z, x) = tanh(W z + U x + c), ||W||_2 = 0.9; records the batch sizes of its calls."""

    def __init__(self, d=6, dx=3, seed=0):
        super().__init__()
        g = gen(seed)
        w = torch.randn(d, d, generator=g, dtype=F64)
        self.W = nn.Parameter(0.9 * w / torch.linalg.matrix_norm(w, ord=2))
        self.U = nn.Parameter(torch.randn(d, dx, generator=g, dtype=F64))
        self.c = nn.Parameter(0.1 * torch.randn(d, generator=g, dtype=F64))
        self.sizes = []

    def forward(self, z, x):
        self.sizes.append(z.shape[0])
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.c)


def _init(x):
    x = _features(x)
    return x.new_zeros(x.shape[0], 6)


def _features(x):
    if isinstance(x, dict):
        return x["x"]
    if isinstance(x, (tuple, list)):
        return x[0]
    return x


def _x(batch=4, seed=1, hard=None):
    """Inputs; all samples but the ``hard`` ones saturate tanh (J ~ 0) and converge fast."""
    x = torch.randn(batch, 3, generator=gen(seed), dtype=F64)
    if hard is not None:
        scale = torch.full((batch, 1), 30.0, dtype=F64)
        scale[list(hard)] = 0.3
        x = x * scale
    return x


def _dense(cell, x, params):
    """Dense z* and implicit gradients of loss(z*) (independent of the library)."""
    return dense_implicit(lambda z: cell(z, x), _init(x), params, loss, iters=400)


def _layer(cell, **kwargs):
    options = {"init": _init, "backward": ADJ, **TIGHT}
    options.update(kwargs)
    return eq.DEQ(cell, **options)


# --- warm start from z0 ------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_z0_warm_start_converges_at_once(solver):
    cell = Cell()
    x = _x()
    layer = _layer(cell, solver=solver)
    z = layer(x)
    cold = layer.last_solution.nstep
    assert cold > 5
    z_warm = layer(x, z0=z.detach())
    assert layer.last_solution.nstep <= 2 and layer.last_solution.all_converged
    torch.testing.assert_close(z_warm.detach(), z.detach(), rtol=1e-10, atol=1e-10)
    # gradients at the warm-started equilibrium are the cold ones
    params = list(cell.parameters())
    cold_g = torch.autograd.grad(loss(layer(x)), params)
    warm_g = torch.autograd.grad(loss(layer(x, z0=z.detach())), params)
    for a, b in zip(warm_g, cold_g):
        assert rel_err(a, b) < 1e-8
    # ... and both are the dense implicit-function-theorem gradients
    z_ref, dense = _dense(cell, x, params)
    torch.testing.assert_close(z_warm.detach(), z_ref, rtol=1e-9, atol=1e-9)
    for a, b in zip(warm_g, dense):
        assert rel_err(a, b) < 1e-8


# --- the cache_key cache -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys", [[0, 1, 2, 3], (10, 11, 12, 13), torch.tensor([5, 6, 7, 8]), torch.arange(4)]
)
def test_cache_key_second_call_starts_at_the_cached_states(keys):
    cell = Cell()
    x = _x()
    layer = _layer(cell)
    z_cold = layer(x, cache_key=keys)
    cold = layer.last_solution
    assert cold.nstep > 5
    z = layer(x, cache_key=keys)
    warm = layer.last_solution
    assert warm.nstep <= 2
    assert bool((warm.residuals[0] < TIGHT["tol"]).all())  # started at the equilibria
    torch.testing.assert_close(z.detach(), z_cold.detach(), rtol=1e-10, atol=1e-10)


def test_cache_key_unknown_keys_start_from_init():
    layer = _layer(Cell())
    x = _x()
    layer(x, cache_key=[0, 1, 2, 3])
    cold = layer.last_solution
    layer(x, cache_key=[4, 5, 6, 7])
    fresh = layer.last_solution
    assert fresh.nstep == cold.nstep
    torch.testing.assert_close(fresh.residuals, cold.residuals, rtol=0, atol=0)


def test_cache_key_mixes_known_and_unknown_keys():
    cell = Cell()
    x = _x(6, seed=2)
    layer = _layer(cell)
    z_cold = layer(x[:3], cache_key=[0, 1, 2]).detach()
    # ids 1 and 0 come back (with their inputs) in rows 1 and 4; the other ids are new
    keys = [30, 1, 40, 50, 0, 60]
    z = layer(x[[3, 1, 4, 5, 0, 2]], cache_key=keys)
    sol = layer.last_solution
    first = sol.residuals[0]
    known = torch.tensor([k in (0, 1) for k in keys], device=first.device)
    assert bool((first[known] < TIGHT["tol"]).all())
    torch.testing.assert_close(first[~known], torch.ones(4, dtype=F64))  # rel residual of f(0)
    assert sol.all_converged
    torch.testing.assert_close(z.detach()[1], z_cold[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z.detach()[4], z_cold[0], rtol=1e-10, atol=1e-10)


def test_cache_key_with_a_dict_state_and_clear_cache():
    cell = Cell()

    def dict_cell(z, x):
        out = cell(torch.cat([z["h"], z["s"]], 1), x)
        return {"h": out[:, :4], "s": out[:, 4:]}

    def init(x):
        return {"h": x.new_zeros(x.shape[0], 4), "s": x.new_zeros(x.shape[0], 2)}

    layer = _layer(dict_cell, init=init)
    x = _x()
    layer(x, cache_key=[0, 1, 2, 3])
    cold = layer.last_solution.nstep
    z = layer(x, cache_key=[0, 1, 2, 3])
    assert layer.last_solution.nstep <= 2 and set(z) == {"h", "s"}
    layer.clear_cache()
    layer(x, cache_key=[0, 1, 2, 3])
    assert layer.last_solution.nstep == cold


def test_cache_key_in_eval_mode_and_without_grad():
    layer = _layer(Cell()).eval()
    x = _x()
    with torch.no_grad():
        layer(x, cache_key=[0, 1, 2, 3])
        assert layer.last_solution.nstep > 5
        layer(x, cache_key=[0, 1, 2, 3])
    assert layer.last_solution.nstep <= 2


def test_implicit_backward_is_warm_started_by_the_cache():
    cell = Cell()
    x = _x()
    params = list(cell.parameters())
    layer = _layer(cell)
    reference = _layer(cell)  # no cache
    steps = []
    for _ in range(2):
        z = layer(x, cache_key=[0, 1, 2, 3])
        grads = torch.autograd.grad(loss(z), params)
        steps.append(layer.last_solution.backward.nstep)
        want = torch.autograd.grad(loss(reference(x)), params)
        for a, b in zip(grads, want):
            assert rel_err(a, b) < 1e-8
        for a, b in zip(grads, _dense(cell, x, params)[1]):  # the warm one is the dense one
            assert rel_err(a, b) < 1e-8
    assert steps[0] > 5 and steps[1] <= 2
    # after a parameter update the cached adjoint is only a guess: still the cold gradients,
    # from a start much closer to the solution
    with torch.no_grad():
        cell.W.mul_(0.99)
        cell.c.add_(1e-3)
    z = layer(x, cache_key=[0, 1, 2, 3])
    grads = torch.autograd.grad(loss(z), params)
    want = torch.autograd.grad(loss(reference(x)), params)
    for a, b in zip(grads, want):
        assert rel_err(a, b) < 1e-8
    warm, cold = layer.last_solution.backward, reference.last_solution.backward
    assert float(warm.solution.trace[0]) < 0.1 * float(cold.solution.trace[0])
    assert warm.nstep <= cold.nstep


def test_adjoint_cache_rows_without_an_entry_start_cold():
    """Ids without a cached adjoint start from the upstream gradient (the NaN rows of the warm
    start), the others from their cached adjoint; both give the cold gradients."""
    cell = Cell()
    x = _x()
    params = list(cell.parameters())
    layer = _layer(cell)
    cold_grads = torch.autograd.grad(loss(layer(x, cache_key=[0, 1, 2, 3])), params)
    assert layer.last_solution.backward.nstep > 5
    grads = torch.autograd.grad(loss(layer(x, cache_key=[9, 1, 2, 3])), params)  # id 9 is new
    residual_0 = layer.last_solution.backward.solution.residuals[0]
    assert float(residual_0[0]) > 1e-3 and bool((residual_0[1:] < ADJ.tol).all())
    for a, b in zip(grads, cold_grads):
        assert rel_err(a, b) < 1e-8


def test_adjoint_cache_under_a_permuted_batch_maps_rows_by_id():
    """The cache must map each cached adjoint to the row of its id, not to its old position:
    the same samples in another order start at their own adjoints (a wrong row mapping would
    start them elsewhere, with large first residuals)."""
    cell = Cell()
    x = _x(batch=5, seed=3)
    params = list(cell.parameters())
    layer = _layer(cell)
    ids = [10, 11, 12, 13, 14]
    torch.autograd.grad(loss(layer(x, cache_key=ids)), params)
    perm = [3, 0, 4, 1, 2]
    back = torch.tensor(perm).argsort()  # each sample's loss term (and so its g) is unchanged
    xp = x[perm]
    zp = layer(xp, cache_key=[ids[i] for i in perm])
    grads = torch.autograd.grad(loss(zp[back]), params)
    info = layer.last_solution.backward
    assert bool((info.solution.residuals[0] < ADJ.tol).all()) and info.nstep <= 2
    want = torch.autograd.grad(loss(_layer(cell)(xp)[back]), params)
    for a, b in zip(grads, want):
        assert rel_err(a, b) < 1e-8
    # and the forward cache too: every permuted sample starts at its own equilibrium
    assert bool((layer.last_solution.residuals[0] < TIGHT["tol"]).all())


def test_adjoint_warm_start_of_a_sample_without_upstream_gradient():
    # sample 0 gets no gradient this step: its adjoint is exactly 0, so its warm start is ignored
    # and the solve converges as fast as with the others warm (not a geometric crawl towards 0)
    cell = Cell()
    x = _x()
    params = list(cell.parameters())
    layer = _layer(cell)
    torch.autograd.grad(loss(layer(x, cache_key=[0, 1, 2, 3])), params)
    u = layer.last_solution.backward.solution.value
    z = layer(x, cache_key=[0, 1, 2, 3])
    mask = torch.ones_like(z)
    mask[0] = 0.0
    grads = torch.autograd.grad((loss(z * mask)), params)
    adjoint = layer.last_solution.backward.solution
    assert adjoint.status is eq.Status.CONVERGED and adjoint.nstep <= 3
    assert torch.equal(adjoint.value[0], torch.zeros_like(u[0]))
    z, _ = eq.fixed_point(lambda z: cell(z, x), _init(x), backward=ADJ, **TIGHT)
    want = torch.autograd.grad(loss(z * mask), params)
    for a, b in zip(grads, want):
        assert rel_err(a, b) < 1e-8


def test_adjoint_cache_rows_of_another_shape_are_not_used():
    """A state of another size under the same ids (the cached rows no longer fit) starts cold,
    forward and adjoint, and still gives the exact gradients."""
    cell = Cell()
    x = _x()
    layer = _layer(cell)
    loss(layer(x, cache_key=[0, 1, 2, 3])).backward()
    wide = nn.Linear(8, 8).double()

    def cell8(z, x):
        return torch.tanh(0.5 * wide(z) + x.sum(1, keepdim=True))

    other = _layer(cell8, init=lambda x: x.new_zeros(x.shape[0], 8))
    other._state_cache, other._adjoint_cache = layer._state_cache, layer._adjoint_cache
    grads = torch.autograd.grad(loss(other(x, cache_key=[0, 1, 2, 3])), list(wide.parameters()))
    assert other.last_solution.nstep > 5
    want = torch.autograd.grad(loss(_layer(cell8, init=other.init)(x)), list(wide.parameters()))
    for a, b in zip(grads, want):
        assert rel_err(a, b) < 1e-8


X4 = torch.zeros(4, 3, dtype=F64)

CACHE_BAD = [
    (dict(cache_key=torch.tensor([0.0, 1, 2, 3])), TypeError, "cache_key must be a 1-D integer"),
    (dict(cache_key=torch.zeros(2, 2, dtype=torch.long)), TypeError, r"shape \(2, 2\)"),
    (dict(cache_key=[0.0, 1.0, 2.0, 3.0]), TypeError, "cache_key must be a 1-D integer"),
    (dict(cache_key=[True, False, True, False]), TypeError, "sequence of ints"),
    (dict(cache_key=torch.tensor([True, False, True, False])), TypeError, "dtype torch.bool"),
    (dict(cache_key="abcd"), TypeError, "cache_key must be a 1-D integer"),
    (dict(cache_key=3), TypeError, "cache_key must be a 1-D integer"),
    (dict(cache_key=[0, 1, 2]), ValueError, r"one id per sample \(4\), got 3"),
    (dict(cache_key=[0, 1, 1, 2]), ValueError, "must not repeat an id"),
    (dict(cache_key=[0, 1, 2, 3], z0=torch.zeros(4, 6, dtype=F64)), ValueError, "either z0 or"),
]


@pytest.mark.parametrize(("kwargs", "exc", "fragment"), CACHE_BAD)
def test_cache_key_bad_input(kwargs, exc, fragment):
    layer = _layer(Cell())
    with pytest.raises(exc, match=fragment):
        layer(X4, **kwargs)
    layer(X4, cache_key=[0, 1, 2, 3])  # nothing was cached by the failed call: a cold start
    assert layer.last_solution.nstep > 5


# --- per-sample compaction ---------------------------------------------------------------------

HARD = (2, 5)  # two hard samples in a batch of eight


@pytest.mark.parametrize("backward", ["implicit", "phantom", "neumann", "jfb"])
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_compaction_gives_the_uncompacted_equilibria_and_gradients(solver, backward):
    backward = ADJ if backward == "implicit" else backward
    x = _x(8, hard=HARD).requires_grad_()
    results = {}
    for compact in (False, True):
        cell = Cell()
        layer = _layer(cell, solver=solver, backward=backward, compact=compact)
        z = layer(x)
        params = [*cell.parameters(), x]
        results[compact] = (z.detach(), torch.autograd.grad(loss(z), params), layer.last_solution)
    (z_full, g_full, s_full), (z_cmp, g_cmp, s_cmp) = results[False], results[True]
    assert s_full.all_converged and s_cmp.all_converged
    torch.testing.assert_close(z_cmp, z_full, rtol=1e-9, atol=1e-9)
    for a, b in zip(g_cmp, g_full):
        assert rel_err(a, b) < 1e-8
    # anchored to the method's gradient from a dense z* (dense IFT solve, or explicit loops)
    ref = Cell()
    params = [*ref.parameters(), x]
    want = backward_reference(lambda z: ref(z, x), _init(x), params, loss, backward, iters=400)
    for a, b in zip(g_cmp, want):
        assert rel_err(a, b) < 1e-8
    assert s_cmp.evaluations < 0.6 * s_full.evaluations
    assert s_full.evaluations == 8 * s_full.nfev


def _tensor_x(x):
    return x


def _tuple_x(x):
    return (x, 2 * x[:, :1], "not a tensor")


def _list_x(x):
    return [x, 2 * x[:, :1]]


def _dict_x(x):
    return {"x": x, "scale": 2 * x[:, :1], "name": "cell"}


@pytest.mark.parametrize("make", [_tensor_x, _tuple_x, _list_x, _dict_x])
def test_compaction_indexes_every_batch_tensor_of_the_input(make):
    base = Cell()

    def cell(z, x):
        feats = _features(x)
        if not isinstance(x, torch.Tensor):
            extra = x["scale"] if isinstance(x, dict) else x[1]
            assert extra.shape == (z.shape[0], 1)  # indexed like the state
            torch.testing.assert_close(extra, 2 * feats[:, :1])
        assert feats.shape[0] == z.shape[0]
        return base(z, feats)

    x0 = _x(8, hard=HARD).requires_grad_()
    results = {}
    for compact in (False, True):
        base.sizes.clear()
        layer = _layer(cell, compact=compact)
        z = layer(make(x0))
        grads = torch.autograd.grad(loss(z), [*base.parameters(), x0])
        results[compact] = (z.detach(), grads, layer.last_solution, list(base.sizes))
    (z_full, g_full, _, sizes_full), (z_cmp, g_cmp, sol, sizes) = results[False], results[True]
    assert set(sizes_full) == {8}
    # the cell sees a batch that shrinks to the hard samples; the last call is the backward's
    # evaluation on the full batch
    solve_sizes = sizes[: sol.nfev]
    assert solve_sizes[0] == 8 and min(solve_sizes) <= len(HARD)
    assert all(a >= b for a, b in itertools.pairwise(solve_sizes))
    assert sizes[sol.nfev :] == [8]
    assert sol.evaluations == sum(solve_sizes)
    torch.testing.assert_close(z_cmp, z_full, rtol=1e-9, atol=1e-9)
    for a, b in zip(g_cmp, g_full):
        assert rel_err(a, b) < 1e-8


def test_compaction_reports_dropped_samples_as_nan():
    cell = Cell()
    layer = _layer(cell, compact=True)
    layer(_x(8, hard=HARD))
    sol = layer.last_solution
    res = sol.residuals
    assert res.shape == (sol.nstep, 8)
    for b in range(8):
        finite = res[:, b][~torch.isnan(res[:, b])]
        assert float(finite[-1]) < TIGHT["tol"]  # each sample's last residual is below tol
        n = finite.numel()
        assert bool(torch.isnan(res[n:, b]).all())  # ... then it left the batch
    easy = [b for b in range(8) if b not in HARD]
    assert bool(torch.isnan(res[-1, easy]).all())
    assert not bool(torch.isnan(res[-1, list(HARD)]).any())
    torch.testing.assert_close(sol.trace, res.nan_to_num(-1.0).amax(1))


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_functional_compaction_passes_the_sample_positions(solver):
    cell = Cell()
    x = _x(8, hard=HARD)
    seen = []

    def f(z, index):
        seen.append(None if index is None else index.tolist())
        return cell(z, x if index is None else x[index])

    sol = eq.solve(f, _init(x), solver=solver, compact=True, **TIGHT)
    full = eq.solve(lambda z: cell(z, x), _init(x), solver=solver, **TIGHT)
    torch.testing.assert_close(sol.value, full.value, rtol=1e-9, atol=1e-9)
    # the positions shrink to (part of) the hard samples
    indices = [list(range(8)) if index is None else index for index in seen]
    assert seen[0] is None and indices[-1] and set(indices[-1]) <= set(HARD)
    for before, after in itertools.pairwise(indices):
        assert after == sorted(after) and set(after) <= set(before)
    assert sol.evaluations < full.evaluations


def test_compaction_with_the_cache_warm_start():
    layer = _layer(Cell(), compact=True)
    x = _x(8, hard=HARD)
    layer(x, cache_key=list(range(8)))
    layer(x, cache_key=list(range(8)))
    assert layer.last_solution.nstep <= 2 and layer.last_solution.evaluations <= 16


def test_compaction_with_unrolled_backward_raises():
    with pytest.raises(
        ValueError, match="compact=True cannot be combined with backward='unrolled'"
    ):
        eq.DEQ(Cell(), compact=True, backward="unrolled")
    with pytest.raises(
        ValueError, match="compact=True cannot be combined with backward='unrolled'"
    ):
        eq.fixed_point(lambda z, i: z * 0.5, X4, compact=True, backward="unrolled")
    layer = _layer(Cell(), compact=True)
    with layer.using("unrolled"), pytest.raises(ValueError, match="compact=True cannot be"):
        layer(_x())
    assert isinstance(layer.backward, eq.Implicit)


@pytest.mark.parametrize(
    "shared", [torch.tensor(0.9, dtype=F64), torch.full((6,), 0.1, dtype=F64)], ids=["0d", "vec"]
)
def test_compaction_leaves_non_batch_tensors_of_the_input_alone(shared):
    base = Cell()

    def cell(z, x):
        feats, extra = x
        return base(z, feats) * (1 - extra) + extra * 0.5

    x = _x(5, hard=(4,))
    full = _layer(cell)((x, shared)).detach()
    z = _layer(cell, compact=True)((x, shared)).detach()
    torch.testing.assert_close(z, full, rtol=1e-9, atol=1e-9)


# --- review findings: folded dropout rows, NamedTuple inputs, nested DEQs, cache memory ---------


def test_dropout_on_rows_folded_into_the_batch_is_a_clear_error_under_compaction():
    """A cell that applies dropout to (B*T, C) token rows: under compaction the mask rows were
    picked by sample position (a silently different function with one hard sample left, a
    broadcasting error with two)."""
    torch.manual_seed(0)
    lin, drop = nn.Linear(5, 5, dtype=F64), eq.VariationalDropout(0.5)

    def cell(z, x):
        b = z.shape[0]
        return torch.tanh(0.5 * drop(lin(z).reshape(b * 3, 5)).reshape(b, 3, 5) + x)

    x = torch.randn(4, 3, 5, dtype=F64)
    x[:3] *= 1e4  # three samples converge at once, one stays
    eq.DEQ(cell, tol=1e-12, max_iter=200)(x)  # without compaction: fine
    with pytest.raises(RuntimeError, match=r"needs one row per sample.*shape \(3, 5\)"):
        eq.DEQ(cell, compact=True, tol=1e-12, max_iter=200)(x)


class _Inputs(NamedTuple):
    feats: torch.Tensor
    scale: torch.Tensor


def test_compaction_keeps_named_tuple_inputs():
    lin = nn.Linear(4, 4, dtype=F64)
    g = gen(2)
    scale = torch.ones(6, 1, dtype=F64)
    scale[5] = 3.0  # one slow sample, so compaction drops the others
    x = _Inputs(torch.randn(6, 4, generator=g, dtype=F64), scale)

    def cell(z, x):
        return torch.tanh(0.5 * lin(z) * x.scale + x.feats)  # attribute access: needs the class

    outs = []
    for compact in (False, True):
        layer = eq.DEQ(cell, compact=compact, init=lambda x: torch.zeros_like(x.feats), **TIGHT)
        outs.append(layer(x).detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-9)


class _InnerCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.drop = nn.Linear(4, 4, dtype=F64), eq.VariationalDropout(0.2)

    def forward(self, h, u):
        return torch.tanh(0.5 * self.drop(self.lin(h)) + u)


class _OuterCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = eq.DEQ(_InnerCell(), tol=1e-10, max_iter=100)  # resets its dropout per call
        self.lin = nn.Linear(4, 4, dtype=F64)

    def forward(self, z, x):
        return torch.tanh(0.5 * self.lin(self.inner(z + x)) + x)


def test_a_deq_inside_a_compacting_deq_sees_its_own_whole_batch():
    """The outer compaction index leaked into the inner DEQ's dropout (it raised 'no mask for
    the full batch')."""
    torch.manual_seed(0)
    outer = eq.DEQ(_OuterCell(), compact=True, tol=1e-8, max_iter=60)
    x = torch.randn(6, 4, dtype=F64)
    x[:4] *= 50
    z = outer(x)
    z.sum().backward()
    assert bool(torch.isfinite(outer.cell.inner.cell.lin.weight.grad).all())
    assert int(outer.last_solution.converged.sum()) >= 4  # compaction dropped samples


def test_warm_start_cache_holds_one_row_per_id():
    """The cached rows were views of the whole batch, keeping B times the documented memory."""
    lin = nn.Linear(16, 16)
    layer = eq.DEQ(lambda z, x: torch.tanh(0.3 * lin(z) + x), tol=1e-3, max_iter=20)
    frames = torch.randn(40, 16)
    for t in range(0, 24, 4):
        loss(layer(frames[t : t + 16], cache_key=list(range(t, t + 16)))).backward()
    for cache in (layer._state_cache, layer._adjoint_cache):
        assert len(cache)
        assert all(row.untyped_storage().nbytes() == 16 * 4 for row in cache.rows.values())
