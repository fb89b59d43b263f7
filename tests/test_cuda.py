"""CUDA: the same problems on the CPU and on a GPU give the same answers.

Skipped without CUDA (CI has none). On a GPU machine run ``pytest tests/test_cuda.py`` without
``EQUILIBRIA_TEST_DEVICE``; the rest of the suite runs there with ``EQUILIBRIA_TEST_DEVICE=cuda``
(tests/conftest.py), which skips this file: it builds its CPU side with the shared problem
helpers, whose device-less factories that mode would send to the GPU.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _cells import TanhCell, dense_implicit
from _problems import (
    BACKWARD_NAMES,
    F64,
    SOLVER_NAMES,
    Affine,
    Tanh,
    assert_grads_close,
    gen,
    loss,
)

import equilibria as eq
from equilibria.layers import Hamburger, HamburgerTokens, StopGradientAttention, nmf, random_bases

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.no_device_mode,
]

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def on(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().to(device) for t in tensors]


@pytest.mark.parametrize("stop", ["abs", "rel"])
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_every_solver_agrees_across_devices(solver, stop):
    p = Affine.make(batch=5, d=12, radius=0.9, seed=3)
    sols = {}
    for dev in (CPU, GPU):
        a, b = on(dev, p.A, p.b)
        sols[dev.type] = eq.solve(
            lambda z, a=a, b=b: z @ a.T + b,
            torch.zeros_like(b),
            solver=solver,
            stop=stop,
            tol=1e-10,
            max_iter=800,
        )
    cpu, gpu = sols["cpu"], sols["cuda"]
    assert cpu.status is gpu.status is eq.Status.CONVERGED
    assert abs(cpu.nstep - gpu.nstep) <= 1
    assert gpu.value.device.type == "cuda"
    # the per-sample statistics stay on the host, where the solver loop computes them
    assert gpu.residual.device.type == gpu.converged.device.type == gpu.trace.device.type == "cpu"
    exact = torch.linalg.solve(torch.eye(12, dtype=F64) - p.A.cpu(), p.b.cpu().T).T
    torch.testing.assert_close(gpu.value.cpu(), exact, rtol=0, atol=1e-8)
    torch.testing.assert_close(gpu.value.cpu(), cpu.value, rtol=0, atol=1e-8)


@pytest.mark.parametrize("backward", BACKWARD_NAMES)
def test_deq_gradients_on_cuda_match_the_cpu_and_the_dense_solution(backward):
    cell = TanhCell(d=6, dx=4, seed=2).to(CPU)
    x = torch.randn(3, 4, generator=gen(5), dtype=F64)
    grads = {}
    for dev in (CPU, GPU):
        c = copy.deepcopy(cell).to(dev)
        xd = x.to(dev).requires_grad_()
        tight = eq.Implicit(tol=1e-12, max_iter=400) if backward == "implicit" else backward
        layer = eq.DEQ(c, backward=tight, tol=1e-11, max_iter=300)
        z = layer(xd, torch.zeros(3, 6, dtype=F64, device=dev))
        params = [*c.parameters(), xd]
        grads[dev.type] = [g.cpu() for g in torch.autograd.grad(loss(z), params)]
    assert_grads_close(grads["cuda"], grads["cpu"], rtol=1e-8)
    if backward in ("implicit", "unrolled"):  # exact methods: the dense IFT gradient
        xd = x.clone().requires_grad_()
        _, ref = dense_implicit(lambda z: cell(z, xd), torch.zeros(3, 6, dtype=F64),
                                [*cell.parameters(), xd], loss)  # fmt: skip
        assert_grads_close(grads["cuda"], [g.cpu() for g in ref], rtol=1e-7)


def test_implicit_backward_gradcheck_on_cuda():
    p = Tanh.make(batch=2, d=4, norm=0.6, seed=1)
    w0, x0 = on(GPU, p.W, p.x)

    def fn(w, x):
        z, _ = eq.fixed_point(
            lambda z: torch.tanh(z @ w.T + x),
            torch.zeros_like(x),
            tol=1e-13,
            max_iter=400,
            backward=eq.Implicit(tol=1e-13, max_iter=400),
        )
        return z

    assert torch.autograd.gradcheck(
        fn, (w0.requires_grad_(), x0.requires_grad_()), eps=1e-6, atol=1e-7
    )


def test_float32_training_step_on_cuda_follows_the_cpu():
    torch.manual_seed(0)
    cell = TanhCell(d=32, dx=16, dtype=torch.float32, seed=4, norm=0.9)
    x = torch.randn(8, 16, generator=gen(6))
    losses = {}
    for dev in (CPU, GPU):
        c = copy.deepcopy(cell).to(dev)
        layer = eq.DEQ(c, solver="anderson", backward="implicit", tol=1e-5, max_iter=100)
        opt = torch.optim.SGD(c.parameters(), lr=0.5)
        trace = []
        for _ in range(5):
            opt.zero_grad()
            out = loss(layer(x.to(dev), torch.zeros(8, 32, device=dev)))
            out.backward()
            opt.step()
            trace.append(float(out.detach()))
        losses[dev.type] = trace
        assert layer.last_solution.all_converged
    torch.testing.assert_close(torch.tensor(losses["cuda"]), torch.tensor(losses["cpu"]),
                               rtol=1e-4, atol=1e-6)  # fmt: skip


def test_mixed_devices_are_refused_with_the_devices_named():
    w = torch.eye(3, device=GPU) * 0.5
    with pytest.raises(ValueError, match="device"):
        eq.solve(lambda z: z.to(GPU) @ w, torch.zeros(2, 3, device=CPU))


def test_cpu_generator_draws_the_same_numbers_on_every_device():
    bases = [random_bases(2, 8, 3, generator=gen(1), device=dev, dtype=F64) for dev in (CPU, GPU)]
    # the same draws; the column normalisation rounds differently on the GPU (measured: 1e-16)
    torch.testing.assert_close(bases[1].cpu(), bases[0], rtol=1e-14, atol=0)
    p = Tanh.make(batch=3, d=5, seed=2)
    pens, radii = [], []
    for dev in (CPU, GPU):
        w, x = on(dev, p.W, p.x)
        w.requires_grad_()
        z = torch.zeros_like(x)
        f = lambda z, w=w, x=x: torch.tanh(z @ w.T + x)  # noqa: E731
        pens.append(eq.jacobian_penalty(f, z, samples=4, reduction="none", generator=gen(3)).cpu())
        radii.append(eq.spectral_radius(f, z, iters=20, generator=gen(3)).cpu())
    torch.testing.assert_close(pens[1], pens[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(radii[1], radii[0], rtol=1e-12, atol=0)
    cuda_gen = torch.Generator(device=GPU).manual_seed(0)
    assert random_bases(2, 8, 3, generator=cuda_gen, device=GPU).device.type == "cuda"


@pytest.mark.parametrize("ham", ["nmf", "vq", "cd"])
def test_hamburger_on_cuda_matches_the_cpu(ham):
    torch.manual_seed(0)
    block = Hamburger(16, ham=ham, dim=16, rank=4, init="online", dtype=F64)
    x = torch.rand(2, 16, 6, 6, generator=gen(2), dtype=F64)
    out, grads = {}, {}
    for dev in (CPU, GPU):
        b = copy.deepcopy(block).to(dev)
        b.eval()  # the online bases: no random draw, the same start on both devices
        xd = x.to(dev).requires_grad_()
        y = b(xd)
        out[dev.type] = y.detach().cpu()
        grads[dev.type] = [
            g.cpu() for g in torch.autograd.grad(y.square().sum(), [xd, *b.parameters()])
        ]
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-9, atol=1e-11)
    assert_grads_close(grads["cuda"], grads["cpu"], rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hamburger_tokens_under_cuda_autocast(dtype):
    block = HamburgerTokens(32, ham="nmf", dim=32, rank=8, device=GPU)
    x = torch.randn(2, 64, 32, device=GPU, requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


def test_nmf_one_step_memory_on_cuda_does_not_grow_with_steps():
    x = torch.rand(4, 128, 1024, device=GPU)
    peaks = []
    for steps in (4, 32):
        w = torch.ones(128, device=GPU, requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        d, c = nmf(x * w[:, None], rank=16, steps=steps, grad="one_step", generator=gen(0))
        (d.sum() + c.sum()).backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[1] <= 1.05 * peaks[0], peaks


def test_stop_gradient_attention_on_cuda_matches_the_cpu():
    block = StopGradientAttention(8, dtype=F64)
    q = torch.randn(2, 5, 8, generator=gen(1), dtype=F64)
    kv = torch.randn(2, 7, 8, generator=gen(2), dtype=F64)
    outs = []
    for dev in (CPU, GPU):
        b = copy.deepcopy(block).to(dev)
        outs.append(b(q.to(dev), kv.to(dev)).detach().cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_host_synchronisations_per_iteration_on_cuda(solver):
    """torch's sync debug mode flags every blocking transfer between device and host. The loop
    reads the residuals back once per iteration; a second, host-to-device copy of a mask is made
    only in iterations where some but not all samples improved on their best residual (never for
    Picard on a symmetric contraction, whose abs residual falls every step). Measured on an H200
    (torch 2.11): 8 and 27 flagged synchronisations for 5 and 25 Picard iterations, i.e. 19 for
    20 more iterations (the short solve has one more of its fixed costs), so the bound is at most
    one per added iteration and the lower bound shows the counting works."""
    p = Affine.make(batch=4, d=64, radius=0.99, seed=0)
    a, b = on(GPU, p.A, p.b)

    def f(z):
        return z @ a.T + b

    eq.solve(f, torch.zeros_like(b), solver=solver, max_iter=3)  # one-time set-up not counted
    counts = []
    for max_iter in (5, 25):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sol = eq.solve(
                    f, torch.zeros_like(b), solver=solver, stop="abs", tol=1e-30, max_iter=max_iter
                )
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert sol.nstep == max_iter
        counts.append(sum("synchroniz" in str(item.message) for item in seen))
    extra = counts[1] - counts[0]
    if solver == "picard":
        assert 15 <= extra <= 20, counts
    else:
        assert 15 <= extra <= 40, counts
