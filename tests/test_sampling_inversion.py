"""Inversion through the equilibrium: gradients against finite differences and backprop through
the sequential chain (float64), the phantom step's formula, memory flat in T, and invert()."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor, nn

from equilibria import NonFiniteError, sampling
from equilibria.sampling import _inversion as inv
from equilibria.zoo.memory import PeakMemory

D = 6
ALPHAS = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 100, dtype=torch.float64), 0)


class Net(nn.Module):
    """A tiny time-conditioned MLP ``model(x, t)`` on (N, D) states."""

    def __init__(self, width: int = 16, dim: int = D) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim + 1, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.body(torch.cat([x, t[:, None].to(x.dtype) / 100], 1))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def _sched(T: int = 5, **kwargs) -> sampling.DDIM:
    timesteps = torch.arange(T, dtype=torch.int64).flip(0) * (100 // T)
    return sampling.DDIM(ALPHAS, timesteps, **kwargs)


def _loss(model, sched, x_T, target) -> Tensor:
    x0, _ = sampling.sample(model, x_T, sched, solver="sequential")
    return (x0 - target).flatten(1).square().mean(1).sum()


def _finite_differences(model, sched, x_T, target, eps=1e-6) -> Tensor:
    grad = torch.zeros_like(x_T)
    for idx in range(x_T.numel()):
        d = torch.zeros_like(x_T).flatten()
        d[idx] = eps
        d = d.view_as(x_T)
        up, down = _loss(model, sched, x_T + d, target), _loss(model, sched, x_T - d, target)
        grad.view(-1)[idx] = (up - down) / (2 * eps)
    return grad


PREDICTIONS = [
    {"prediction_type": "epsilon"},
    {"prediction_type": "v_prediction", "final_alpha_cumprod": float(ALPHAS[0])},
    {"prediction_type": "sample"},
    {"prediction_type": "epsilon", "clip_sample": 1.5},
]


@pytest.mark.parametrize("options", PREDICTIONS)
def test_implicit_gradient_matches_finite_differences_and_bptt(net, options) -> None:
    sched = _sched(5, **options)
    x_T = torch.randn(2, D, dtype=torch.float64)
    target = torch.randn(2, D, dtype=torch.float64)
    x0, sol = sampling.sample(net, x_T, sched, solver="sequential")
    _, g0 = inv._loss_grad(x0, target)
    implicit = inv.implicit_sweep(net, sched, sol.trajectory, g0)
    torch.testing.assert_close(implicit, _finite_differences(net, sched, x_T, target),
                               rtol=1e-6, atol=1e-8)  # fmt: skip
    _, _, bptt = inv.bptt(net, sched, x_T, target)
    torch.testing.assert_close(implicit, bptt, rtol=1e-12, atol=1e-14)


def test_implicit_gradient_on_the_parallel_solution(net) -> None:
    """The sweep runs on the trajectory a parallel solver found (tol near round-off)."""
    sched = _sched(10)
    x_T, target = torch.randn(3, D, dtype=torch.float64), torch.randn(3, D, dtype=torch.float64)
    x0, sol = sampling.sample(net, x_T, sched, solver="picard", tol=1e-10)
    _, g0 = inv._loss_grad(x0, target)
    _, _, bptt = inv.bptt(net, sched, x_T, target)
    torch.testing.assert_close(inv.implicit_sweep(net, sched, sol.trajectory, g0), bptt,
                               rtol=1e-7, atol=1e-10)  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [*PREDICTIONS[:2],
     {"prediction_type": "sample", "final_alpha_cumprod": 0.9999}],  # not 1: see the next test
)  # fmt: skip
def test_phantom_gradient_is_exact_when_the_model_ignores_x(options) -> None:
    """With a model output independent of x every step is affine, x_0 = P x_T + const, so the
    undamped phantom step's gradient is the exact one."""
    sched = _sched(6, **options)
    const = torch.randn(2, D, dtype=torch.float64)

    def model(x: Tensor, t: Tensor) -> Tensor:
        return const + 0 * x

    x_T, target = torch.randn(2, D, dtype=torch.float64), torch.randn(2, D, dtype=torch.float64)
    x0, _ = sampling.sample(model, x_T, sched, solver="sequential")
    _, g0 = inv._loss_grad(x0, target)
    exact = inv.bptt(model, sched, x_T, target)[2]
    torch.testing.assert_close(inv.phantom_gradient(model, sched, x_T, g0, 1.0), exact,
                               rtol=1e-12, atol=1e-14)  # fmt: skip


def test_phantom_is_refused_where_it_is_identically_zero(net) -> None:
    """With prediction_type "sample" and final ᾱ = 1 the last step returns the model's output:
    its linear part is 0, so P = Q_0 = 0 and the phantom gradient is 0 whatever x_T (invert
    returned init unchanged, every loss equal); the exact gradient is not 0."""
    sched = _sched(5, prediction_type="sample")
    x_T, target = torch.randn(2, D, dtype=torch.float64), torch.randn(2, D, dtype=torch.float64)
    x0, _ = sampling.sample(net, x_T, sched, solver="sequential")
    _, g0 = inv._loss_grad(x0, target)
    assert not bool((inv.phantom_gradient(net, sched, x_T, g0, 1.0) != 0).any())
    assert bool((inv.bptt(net, sched, x_T, target)[2] != 0).any())
    with pytest.raises(ValueError, match=re.escape("gradient='phantom' is identically zero for "
                                                   "this schedule: step 4's output")):  # fmt: skip
        sampling.invert(net, target, sched, gradient="phantom", steps=3, init=x_T)
    for gradient in ("implicit", "bptt"):  # the exact gradients move it
        found, _ = sampling.invert(net, target, sched, gradient=gradient, steps=3, init=x_T)
        assert not torch.equal(found, x_T)
    # below 1 the last step keeps a linear part and the phantom gradient is not 0
    below = _sched(5, prediction_type="sample", final_alpha_cumprod=0.9999)
    found, _ = sampling.invert(net, target, below, gradient="phantom", steps=3, init=x_T)
    assert not torch.equal(found, x_T)


def test_phantom_gradient_formula(net) -> None:
    """τ (P g + J_{h_0}ᵀ Q_0 g) against autograd through the damped cumulative step written out,
    with later rows detached; τ scales it."""
    sched = _sched(4)
    x_T, g = torch.randn(2, D, dtype=torch.float64), torch.randn(2, D, dtype=torch.float64)
    at, ap = inv._at_ap(sched)
    A = ap.sqrt() / at.sqrt()  # the linear part of an epsilon-DDIM step
    x = x_T.clone().requires_grad_(True)
    t0 = sched.timesteps[0].expand(2)
    h0 = sched.step(x, net(x, t0), 0) - A[0] * x
    tilde = 0.3 * (A.prod() * x + A[1:].prod() * h0)  # + detached terms
    (expected,) = torch.autograd.grad(tilde, x, g)
    torch.testing.assert_close(inv.phantom_gradient(net, sched, x_T, g, 0.3), expected)


def _backward_peak(gradient: str, T: int) -> int:
    torch.manual_seed(0)
    model = Net(width=256, dim=32).double()
    sched = _sched(T)
    x_T, target = torch.randn(4, 32, dtype=torch.float64), torch.randn(4, 32, dtype=torch.float64)
    x0, sol = sampling.sample(model, x_T, sched, solver="sequential")
    _, g0 = inv._loss_grad(x0, target)
    with PeakMemory("cpu") as mem:
        if gradient == "implicit":
            inv.implicit_sweep(model, sched, sol.trajectory, g0)
        elif gradient == "phantom":
            inv.phantom_gradient(model, sched, x_T, g0)
        else:
            inv.bptt(model, sched, x_T, target)
    assert mem.peak_bytes is not None
    return mem.peak_bytes


def test_memory_of_the_gradient_is_flat_in_T_unlike_bptt() -> None:
    """Peak bytes of tensor storages created by the gradient computation (counted, not timed)."""
    for gradient in ("implicit", "phantom"):
        small, large = _backward_peak(gradient, 10), _backward_peak(gradient, 40)
        assert large <= 1.05 * small, (gradient, small, large)
    small, large = _backward_peak("bptt", 10), _backward_peak("bptt", 40)
    assert large >= 3 * small, (small, large)


def test_invert_with_exact_forward_follows_bptt(net) -> None:
    """With the sequential forward the implicit gradient is BPTT's: the same Adam iterates."""
    sched = _sched(8)
    target = sampling.sample(net, torch.randn(3, D, dtype=torch.float64), sched,
                             solver="sequential")[0]  # fmt: skip
    start = torch.randn(3, D, dtype=torch.float64)
    x_i, res_i = sampling.invert(net, target, sched, gradient="implicit", steps=15, lr=0.05,
                                 init=start, solver="sequential")  # fmt: skip
    x_b, res_b = sampling.invert(net, target, sched, gradient="bptt", steps=15, lr=0.05,
                                 init=start)  # fmt: skip
    torch.testing.assert_close(x_i, x_b, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(res_i.losses, res_b.losses, rtol=1e-9, atol=1e-14)
    assert res_i.steps == res_b.steps == 15 and res_b.rounds == 15 * 8


@pytest.mark.parametrize("gradient", ["implicit", "phantom", "bptt"])
def test_invert_reduces_the_reconstruction_error(net, gradient: str) -> None:
    sched = _sched(10)
    target = sampling.sample(net, torch.randn(4, D, dtype=torch.float64), sched,
                             solver="sequential")[0]  # fmt: skip
    x_T, res = sampling.invert(net, target, sched, gradient=gradient, steps=40, lr=0.05,
                               solver="picard", tol=1e-6)  # fmt: skip
    assert isinstance(res, sampling.InversionResult) and res.gradient == gradient
    assert res.losses.shape == (40,) and res.error.shape == (4,)
    assert float(res.error.mean()) < 0.5 * float(res.losses[0])
    x0, _ = sampling.sample(net, x_T, sched, solver="sequential")
    torch.testing.assert_close(res.sample, x0)
    assert res.nfe > 0 and res.rounds > 0


def test_encoding_inverts_the_sampler_when_the_model_output_is_constant() -> None:
    sched = _sched(10)
    const = torch.randn(3, D, dtype=torch.float64)

    def model(x: Tensor, t: Tensor) -> Tensor:
        return const + 0 * x

    x0 = torch.randn(3, D, dtype=torch.float64)
    x_T = inv.encode(model, x0, sched)
    torch.testing.assert_close(sampling.sample(model, x_T, sched, solver="sequential")[0], x0)


def test_callback_stops_the_iterations(net) -> None:
    sched = _sched(5)
    target = torch.randn(2, D, dtype=torch.float64)
    seen = []

    def stop_at_two(step: int, x_T: Tensor, per: Tensor) -> bool:
        seen.append(step)
        return step == 2

    _, res = sampling.invert(net, target, sched, steps=10, callback=stop_at_two)
    assert seen == [0, 1, 2] and res.steps == 3 and res.losses.shape == (3,)


def test_callback_gets_each_iterate_not_the_optimised_storage(net) -> None:
    """The x_T a callback keeps stays that iteration's x_T (it was Adam's parameter storage,
    changed in place by every later update)."""
    sched = _sched(5)
    target = torch.randn(2, D, dtype=torch.float64)
    init = torch.randn(2, D, dtype=torch.float64)
    kept = []
    x_T, _ = sampling.invert(net, target, sched, steps=3, init=init,
                             callback=lambda step, x, per: kept.append(x))  # fmt: skip
    torch.testing.assert_close(kept[0], init, rtol=0, atol=0)
    assert not torch.equal(kept[0], x_T) and not torch.equal(kept[1], kept[2])


def test_invert_reports_unconverged_forward_solves_instead_of_raising(net) -> None:
    """A forward solve that runs out of max_rounds is reported per sample (converged, the count
    of such iterations, the last solve's residuals), as SamplingSolution reports it."""
    sched = _sched(10)
    target = torch.randn(3, D, dtype=torch.float64)
    _, capped = sampling.invert(net, target, sched, steps=4, solver="picard", tol=1e-12,
                                max_rounds=1)  # fmt: skip
    assert capped.steps == 4 and capped.unconverged == 4
    assert capped.converged.dtype == torch.bool and capped.converged.device.type == "cpu"
    assert capped.converged.shape == (3,) and not bool(capped.converged.any())
    assert capped.residuals is not None and capped.residuals.shape == (3, 10)
    assert (capped.residuals[:, 0] == 0).all() and capped.residuals[:, 1:].isnan().all()
    _, full = sampling.invert(net, target, sched, steps=4, solver="picard", tol=1e-6)
    assert bool(full.converged.all()) and full.unconverged == 0
    assert full.residuals is not None and bool((full.residuals <= 1e-6).all())
    _, exact = sampling.invert(net, target, sched, steps=2, gradient="bptt")
    assert bool(exact.converged.all()) and exact.unconverged == 0
    assert exact.residuals is not None and bool((exact.residuals == 0).all())
    _, none = sampling.invert(net, target, sched, steps=0)
    assert bool(none.converged.all()) and none.unconverged == 0 and none.residuals is None


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_invert_moves_init_to_the_targets_device_and_dtype(device: str) -> None:
    """init (float32, on the CPU) goes to x0_target's device and dtype, as sample() moves init
    and noise to x_T's (it kept its device: on a GPU target Adam's parameter stayed on the CPU
    and the first forward failed; the cuda case runs only where a GPU is present)."""
    torch.manual_seed(0)
    model = Net().double().to(device)
    sched = _sched(5)
    target = torch.randn(2, D, dtype=torch.float64).to(device)
    init = torch.randn(2, D, dtype=torch.float32, device="cpu")
    x_T, res = sampling.invert(model, target, sched, steps=2, init=init, solver="picard")
    assert x_T.device == target.device and x_T.dtype == torch.float64
    assert res.sample.device == target.device
    moved, _ = sampling.invert(model, target, sched, steps=2, solver="picard",
                               init=init.to(device, torch.float64))  # fmt: skip
    torch.testing.assert_close(x_T, moved, rtol=0, atol=0)


BAD = [
    ({"gradient": "adjoint"}, ValueError, "gradient must be one of 'implicit', 'phantom', 'bptt'"),
    ({"steps": -1}, ValueError, "steps must be an int >= 0"),
    ({"lr": 0.0}, ValueError, "lr must be in (0.0, inf)"),
    ({"damping": 1.5}, ValueError, "damping must be in (0.0, 1.0]"),
    ({"warm_start": 1}, TypeError, "warm_start must be a bool"),
    ({"init": torch.zeros(3, D)}, ValueError,
     "init must be a floating-point tensor shaped like x0_target (2, 6), got shape (3, 6)"),
    ({"init": torch.zeros(2, D, dtype=torch.int64)}, ValueError,
     "init must be a floating-point tensor shaped like x0_target (2, 6), got shape (2, 6) "
     "torch.int64"),
    ({"init": [[0.0] * D] * 2}, ValueError, "init must be a floating-point tensor shaped like "
     "x0_target (2, 6), got list"),
    ({"init": torch.full((2, D), float("nan"), dtype=torch.float64)}, NonFiniteError,
     "init contains NaN or infinity"),
    ({"init": torch.full((2, D), float("inf"), dtype=torch.float64), "gradient": "bptt"},
     NonFiniteError, "init contains NaN or infinity"),
    ({"callback": 3}, TypeError, "callback must be None or callable"),
    ({"model": None}, TypeError, "model must be callable as model(x, t), got NoneType"),
    ({"sched": _sched(5, eta=0.5)}, ValueError, "deterministic sampler (sched.eta == 0)"),
    ({"sched": "ddim"}, TypeError, "sched must be a sampling.DDIM"),
    ({"target": torch.tensor([1, 2])}, ValueError, "x0_target must be a floating-point tensor"),
    ({"target": torch.full((2, D), float("nan"))}, NonFiniteError, "x0_target contains NaN"),
    ({"target": torch.zeros(0, D, dtype=torch.float64)}, ValueError, "non-empty, got shape (0,"),
    ({"steps": 0, "tol": -1.0}, ValueError, "tol must be in (0.0, inf), got -1.0"),
    ({"steps": 0, "window": 0}, ValueError, "window must be an int >= 1"),
    ({"steps": 0, "solver": "nope"}, ValueError, "unknown solver 'nope'"),
]  # fmt: skip


@pytest.mark.parametrize("bad, error, fragment", BAD)
def test_bad_arguments_are_refused(net, bad, error, fragment) -> None:
    kwargs = dict(bad)
    sched = kwargs.pop("sched", _sched(5))
    target = kwargs.pop("target", torch.randn(2, D, dtype=torch.float64))
    model = kwargs.pop("model", net)
    with pytest.raises(error, match=re.escape(fragment)):
        sampling.invert(model, target, sched, steps=kwargs.pop("steps", 1), **kwargs)
