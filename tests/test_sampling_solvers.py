"""The accelerated sampling solvers (equilibria/sampling/_anderson.py, _default.py): fixed points,
the safeguard, the default against Picard, no host synchronisation, bad options (float64)."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, ClassVar

import pytest
import torch

from equilibria import sampling
from equilibria.sampling._anderson import Anderson, Triangular, order_picard
from equilibria.sampling._default import Default, Secant, _secant
from equilibria.sampling._picard import cumulative_picard
from equilibria.sampling._system import Block, SamplingSolver

N_TRAIN = 1000


def _alphas() -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, N_TRAIN, dtype=torch.float64), 0)


def _ddim(T: int, **kw: Any) -> sampling.DDIM:
    return sampling.DDIM(_alphas(), torch.arange(T).flip(0) * (N_TRAIN // T), **kw)


class _Mixture:
    """Exact ε of a Gaussian mixture with diagonal covariances (the benchmark's model, small)."""

    def __init__(self, d: int = 8, k: int = 4, spread: float = 2.0, std: float = 0.1,
                 seed: int = 0) -> None:  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        self.ac = _alphas()
        self.mu = torch.randn(k, d, generator=g, dtype=torch.float64) * spread
        self.var = (std * (0.5 + torch.rand(k, d, generator=g, dtype=torch.float64))) ** 2
        self.logw = torch.log_softmax(0.5 * torch.randn(k, generator=g, dtype=torch.float64), 0)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.ac[t].to(x.dtype)[:, None, None]
        v = a * self.var.to(x.dtype) + (1 - a)
        diff = x.flatten(1)[:, None, :] - a.sqrt() * self.mu.to(x.dtype)
        logp = self.logw.to(x.dtype) - 0.5 * (diff.pow(2) / v + v.log()).sum(-1)
        score = -(torch.softmax(logp, -1).unsqueeze(-1) * diff / v).sum(1)
        return (-(1 - a[:, 0]).sqrt() * score).reshape(x.shape)


def _x(n: int = 3, d: int = 8, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


SOLVERS = [
    Anderson(),
    Anderson(weights="timestep"),
    Anderson(m=3, beta=0.5),
    Anderson(accumulate="input"),
    Triangular(),
    Triangular(order=None),
    Triangular(order=3, m=3),
    Triangular(rule="parataa"),
    Triangular(accumulate="input"),
    Secant(),
    Secant(gate=False),
    Default(),
]


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
def test_fixed_point_is_the_sequential_trajectory(solver):
    # started on the sequential trajectory, every proposal is that trajectory (its fixed point)
    model, sched, x = _Mixture(), _ddim(12), _x()
    _, seq = sampling.sample(model, x, sched, solver="sequential")
    X = seq.trajectory.clone()
    state = solver.init(None)
    active = torch.ones(12, 3, dtype=torch.bool)
    lo = torch.zeros(3, dtype=torch.long)
    sys_ = _system(model, sched, x)
    for _ in range(3):  # several rounds: the histories are used too
        f = sys_.evaluate(X, active, 0)
        block = Block(0, X, f, f - X[1:], active, lo, None)
        proposal, state = solver.update(sys_, block, state)
        torch.testing.assert_close(proposal, X[1:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
@pytest.mark.parametrize("window", [None, 4])
def test_converges_to_the_sequential_sample(solver, window):
    model, sched, x = _Mixture(), _ddim(20), _x()
    ref, _ = sampling.sample(model, x, sched, solver="sequential")
    tol = 1e-12 if not (isinstance(solver, Triangular) and solver.rule == "parataa") else 1e-13
    x0, sol = sampling.sample(model, x, sched, solver=solver, tol=tol, window=window)
    assert bool(sol.converged.all()) and sol.rounds <= 20
    torch.testing.assert_close(x0, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("solver", [Anderson(), Triangular(), Default()], ids=repr)
def test_float32_states(solver):
    model, sched = _Mixture(), _ddim(20)
    x = _x(dtype=torch.float32)
    ref, _ = sampling.sample(model, x.double(), sched, solver="sequential")
    x0, sol = sampling.sample(model, x, sched, solver=solver, tol=1e-5)
    assert x0.dtype == torch.float32 and bool(sol.converged.all())
    assert float(((x0.double() - ref).norm(dim=1) / ref.norm(dim=1)).max()) < 1e-3


def test_m1_is_picard_and_first_round_is_picard():
    # Anderson with one iterate, triangular Anderson with m = 1 and full order, and the secant's
    # first round all propose cumulative Picard
    model, sched, x = _Mixture(), _ddim(10), _x()
    sys_ = _system(model, sched, x)
    X = x.unsqueeze(0).repeat(11, 1, 1)
    X[1:] += 0.1 * torch.randn(X[1:].shape, generator=torch.Generator().manual_seed(3),
                               dtype=torch.float64)  # fmt: skip
    active = torch.ones(10, 3, dtype=torch.bool)
    active[:2, 1] = False  # sample 1 accepted its first two steps
    lo = torch.tensor([0, 2, 0])
    f = sys_.evaluate(X, active, 0)
    block = Block(0, X, f, f - X[1:], active, lo, None)
    want = cumulative_picard(block)
    for solver in (Anderson(m=1), Anderson(), Triangular(m=1, order=None), Secant()):
        got, _ = solver.update(sys_, block, solver.init(sys_))
        live = active.unsqueeze(-1).expand_as(want)
        torch.testing.assert_close(got[live], want[live], rtol=0, atol=1e-13)


def test_order_picard():
    # order 1: the plain step X[k+1] = step_k(X[k]); order >= L: cumulative Picard; in between
    # the drifts of the last p steps on top of the state p steps back
    g = torch.Generator().manual_seed(0)
    L, N = 6, 2
    x = torch.randn(L + 1, N, 3, generator=g, dtype=torch.float64)
    f = torch.randn(L, N, 3, generator=g, dtype=torch.float64)
    active = torch.ones(L, N, dtype=torch.bool)
    active[0, 1] = False
    lo = torch.tensor([0, 1])
    block = Block(0, x, f, f - x[1:], active, lo, None)
    torch.testing.assert_close(order_picard(block, 1)[active], f[active])
    torch.testing.assert_close(order_picard(block, None), cumulative_picard(block))
    torch.testing.assert_close(order_picard(block, L), cumulative_picard(block))
    got = order_picard(block, 2)
    k, n = 4, 1  # row k+1 = 5 = x[3] + (f[3] - x[3]) + (f[4] - x[4])
    torch.testing.assert_close(got[k, n], f[3, n] + f[4, n] - x[4, n])
    k, n = 1, 1  # never before the accepted state x[lo] = x[1]: x[1] + drift of step 1
    torch.testing.assert_close(got[k, n], f[1, n])


def test_secant_gate_uses_a_secant_only_where_it_predicted_better():
    # one scalar row per sample; inputs move 0 -> 1 -> 2. Sample 0: f = 2x (linear: the secant
    # of the first pair predicts the third image exactly); sample 1: images 0, 9, 0 (the
    # secant predicted 18, the identity 10, the truth is 0): the identity wins, no secant
    from equilibria.sampling._anderson import _Entry

    xs = [torch.full((1, 2, 1), float(v), dtype=torch.float64) for v in (0, 1, 2)]
    fs = [
        torch.tensor([[[2.0 * v], [w]]], dtype=torch.float64) for v, w in ((0, 0), (1, 9), (2, 0))
    ]
    valid = torch.ones(1, 2, dtype=torch.bool)
    hist = tuple(_Entry(0, a, b, valid) for a, b in zip(xs, fs, strict=True))
    _, coef = _secant(hist, 0, xs[-1], fs[-1], gate=True)
    assert coef is not None
    assert float(coef[0, 0, 0]) == pytest.approx(1.0)  # J = 1 + 1 = 2, f's true slope
    assert float(coef[0, 1, 0]) == 0.0  # falls back to Picard's J = I
    _, ungated = _secant(hist, 0, xs[-1], fs[-1], gate=False)
    assert ungated is not None and float(ungated[0, 1, 0]) != 0.0
    _, early = _secant(hist[:2], 0, xs[1], fs[1], gate=True)
    assert early is None  # second round: nothing to check the secant against yet


@pytest.mark.parametrize("T", [40, 60])
def test_safeguard_default_converges_where_anderson_stalls(T):
    # DEQ-DDIM's Anderson mixes the triangular structure away: on this mixture it needs (nearly)
    # all T rounds, while the safeguarded default needs no more than cumulative Picard
    model, sched, x = _Mixture(), _ddim(T), _x(seed=1)
    ref, _ = sampling.sample(model, x, sched, solver="sequential")
    r = {}
    for name, solver in (("picard", "picard"), ("anderson", Anderson()), ("default", "default")):
        x0, sol = sampling.sample(model, x, sched, solver=solver, tol=1e-9)
        torch.testing.assert_close(x0, ref, rtol=0, atol=1e-8)
        r[name] = sol.rounds
    assert r["anderson"] >= 1.4 * r["picard"]
    assert r["default"] <= r["picard"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("T", [10, 30])
def test_default_never_worse_than_picard(seed, T):
    model = _Mixture(d=6, k=3, spread=1.0 + seed, std=0.3 / (1 + seed), seed=seed)
    sched, x = _ddim(T), _x(4, 6, seed)
    _, pic = sampling.sample(model, x, sched, solver="picard", tol=1e-8)
    _, dft = sampling.sample(model, x, sched, solver="default", tol=1e-8)
    assert dft.solver == "default" and bool(dft.converged.all())
    assert dft.rounds <= pic.rounds
    assert dft.nfe <= 2 * pic.nfe  # the bound on the NFE


@contextmanager
def _no_host_sync():
    """Make every Tensor -> Python conversion (a device-to-host synchronisation on a GPU) raise."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def f(self, *a, **k):
            raise AssertionError(f"host synchronisation: Tensor.{name}")

        return f

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@dataclasses.dataclass(frozen=True)
class _Guarded(SamplingSolver):
    inner: Any = None
    name: ClassVar[str] = "guarded"

    def residual(self, system, block):
        with _no_host_sync():
            return self.inner.residual(system, block)

    def init(self, system):
        return self.inner.init(system)

    def update(self, system, block, state):
        with _no_host_sync():
            return self.inner.update(system, block, state)


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
def test_no_host_synchronisation_per_round(solver):
    model, sched, x = _Mixture(), _ddim(15), _x()
    ref, _ = sampling.sample(model, x, sched, solver="sequential")
    x0, sol = sampling.sample(model, x, sched, solver=_Guarded(solver), tol=1e-12, window=6)
    assert sol.rounds >= 3
    torch.testing.assert_close(x0, ref, rtol=0, atol=1e-9)
    with pytest.raises(AssertionError, match="host synchronisation"), _no_host_sync():
        bool(torch.ones(()))  # the guard itself works


def test_histories_are_bounded_by_the_block():
    # the histories hold m blocks (the driver's rows of one round: bounded by the window and the
    # spread of the samples' accepted steps), not the whole trajectory
    model, sched, x = _Mixture(), _ddim(40), _x()
    seen, blocks = [], []

    @dataclasses.dataclass(frozen=True)
    class Spy(Triangular):
        def update(self, system, block, state):
            out, state = super().update(system, block, state)
            blocks.append(block.f.shape[0])
            seen.append(max(e.x.shape[0] for e in state))
            return out, state

    sampling.sample(model, x, sched, solver=Spy(m=3), tol=1e-10, window=5)
    assert max(seen) <= max(blocks) < 20


@pytest.mark.parametrize(
    "make, exc, fragment",
    [
        (lambda: Anderson(m=0), ValueError, "m must be"),
        (lambda: Anderson(lam=-1.0), ValueError, "lam must be"),
        (lambda: Anderson(beta=0.0), ValueError, "beta must be"),
        (lambda: Anderson(beta=1.5), ValueError, "beta must be"),
        (lambda: Anderson(weights="row"), ValueError, "weights"),
        (lambda: Anderson(accumulate="float16"), ValueError, "accumulate"),
        (lambda: Anderson(m=2.5), TypeError, "m must be"),
        (lambda: Triangular(m=0), ValueError, "m must be"),
        (lambda: Triangular(order=0), ValueError, "order must be"),
        (lambda: Triangular(lam=float("nan")), ValueError, "lam must be"),
        (lambda: Triangular(rule="rms"), ValueError, "rule"),
        (lambda: Secant(gate=1), TypeError, "gate must be"),
        (
            lambda: sampling.sample(_Mixture(), _x(), _ddim(5), solver="anderson", mm=3),
            TypeError,
            "unknown option",
        ),
    ],
)
def test_bad_options(make, exc, fragment):
    with pytest.raises(exc, match=fragment):
        make()


def test_by_name_with_options():
    model, sched, x = _Mixture(), _ddim(10), _x()
    ref, _ = sampling.sample(model, x, sched, solver="sequential")
    for name, opts in (("anderson", {"m": 3}), ("triangular", {"order": None}),
                       ("secant", {"gate": False}), ("default", {})):  # fmt: skip
        x0, sol = sampling.sample(model, x, sched, solver=name, tol=1e-12, **opts)
        assert sol.solver == name
        torch.testing.assert_close(x0, ref, rtol=0, atol=1e-9)


def _system(model, sched, x):
    from equilibria.sampling._system import System

    return System(model, sched, None, None, None, len(sched), x.shape[0], tuple(x.shape[1:]))
