"""Where Anderson's per-iteration cost goes (the numbers behind the README's overhead notes).

1. In the loop: ``torch.profiler`` over Anderson solves of the benchmark's conv block, reporting
   the mean time of the two batched products that read the history (the Gram row and the mixing,
   ``aten::bmm``), against the same products timed on their own with a warm cache.
2. Fusion: the Anderson update (ring-buffer writes, Gram row, relative ridge, bordered solve,
   mixing product) at the tanh benchmark's sizes (batch 64, width 256, m = 5), eager against the
   same function compiled by inductor.

Run: ``python benchmarks/anderson_cost.py``; writes ``benchmarks/results/anderson_cost.json``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.profiler import profile

import equilibria as eq
from equilibria._solvers import anderson as anderson_module

from common import write_result
from solvers import build


def per_call_us(fn: Any, repeats: int = 2000, warmup: int = 50) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1e6 * (time.perf_counter() - t0) / repeats


def history_products_in_the_loop() -> dict[str, float]:
    problem = build("conv")
    z0 = problem.z0()
    with torch.no_grad():
        for _ in range(3):
            sol = eq.solve(problem, z0, solver=eq.Anderson(), tol=1e-4, max_iter=300)
        with profile() as prof:
            for _ in range(5):
                eq.solve(problem, z0, solver=eq.Anderson(), tol=1e-4, max_iter=300)
    bmm = next(e for e in prof.key_averages() if e.key == "aten::bmm")
    batch, dim, m = z0.shape[0], z0[0].numel(), eq.Anderson().m
    g = torch.randn(batch, dim)
    history = torch.randn(batch, m, dim)
    alpha = torch.randn(batch, 1, m)
    warm_row = per_call_us(lambda: torch.bmm(g.unsqueeze(1), history.mT), repeats=300)
    warm_mix = per_call_us(lambda: torch.bmm(alpha, history), repeats=300)
    return {
        "iterations": sol.nstep,
        "history_mb": 2 * history.numel() * 4 / 1e6,
        "bmm_in_loop_us": bmm.cpu_time_total / bmm.count,
        "bmm_warm_gram_row_us": warm_row,
        "bmm_warm_mixing_us": warm_mix,
    }


def update(images, residuals, system, rhs, ridge_eye, weights, fx, g, slot: int):
    """One Anderson update written as one function, so that inductor can fuse it."""
    images[:, slot] = fx
    residuals[:, slot] = g
    row = torch.bmm(g.unsqueeze(1), residuals.mT).squeeze(1)
    system[:, slot + 1, 1:] = row
    system[:, 1:, slot + 1] = row
    ridge = (system.diagonal(dim1=1, dim2=2) @ weights).clamp_min(1e-38)
    solution = torch.linalg.solve_ex(system + ridge.view(-1, 1, 1) * ridge_eye, rhs)[0]
    return torch.bmm(solution[:, 1:].mT, images).squeeze(1)


def fused_update() -> dict[str, float]:
    batch, dim = 64, 256
    x, fx = torch.randn(batch, dim), torch.randn(batch, dim)
    g = fx - x
    solver = eq.Anderson()
    with torch.no_grad():
        state = solver.init(x, fx, g)
        for _ in range(solver.m + 1):
            state = anderson_module._push(state, fx, g)
        args = (
            state.images,
            state.residuals,
            state.system,
            state.rhs,
            state.ridge_eye,
            state.ridge_weights[2],
            fx,
            g,
            2,
        )
        eager = per_call_us(lambda: update(*args))
        compiled = torch.compile(update, dynamic=False)
        t0 = time.perf_counter()
        compiled(*args)
        compile_s = time.perf_counter() - t0
        fused = per_call_us(lambda: compiled(*args))
    return {"eager_us": eager, "inductor_us": fused, "compile_s": compile_s}


def main() -> int:
    loop = history_products_in_the_loop()
    print(
        f"conv block, {loop['iterations']} Anderson iterations, {loop['history_mb']:.1f} MB of "
        f"history: aten::bmm {loop['bmm_in_loop_us']:.0f} us per call in the loop; warm cache: "
        f"Gram row {loop['bmm_warm_gram_row_us']:.0f} us, "
        f"mixing {loop['bmm_warm_mixing_us']:.0f} us"
    )
    fused = fused_update()
    print(
        f"Anderson update at batch 64 x width 256: eager {fused['eager_us']:.0f} us, "
        f"inductor {fused['inductor_us']:.0f} us per call (compiled in {fused['compile_s']:.1f} s)"
    )
    path = write_result("anderson_cost", {"in_the_loop": loop, "fused_update": fused})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
