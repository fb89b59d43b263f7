"""Where Anderson's per-iteration cost goes (the numbers behind the README's overhead notes).

1. Per iteration on the tanh benchmark's map (batch 64, width 256): a map call (40 in a row),
   and the wall time per iteration of Picard (map + driver) and of Anderson (map + driver +
   solver) over solves that run a fixed 40 iterations, all round-robin.
2. In the loop: ``torch.profiler`` over Anderson solves of the benchmark's conv block, reporting
   the mean time of the two batched products that read the history (the Gram row and the mixing,
   ``aten::bmm``), against the same products timed on their own with a warm cache.
3. Fusion: the library's Anderson update (``_push``: ring-buffer writes and Gram row;
   ``_mixing``: relative ridge, normalised bordered solve; then the mixing product) at the tanh
   sizes, eager against the same function compiled by inductor.

Run: ``python benchmarks/anderson_cost.py``; writes ``benchmarks/results/anderson_cost.json``.
"""

from __future__ import annotations

import argparse
import statistics
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


def per_iteration_tanh(rounds: int = 200, iters: int = 40) -> dict[str, float]:
    problem = build("tanh", torch.device("cpu"))
    z0 = problem.z0()
    times: dict[str, list[float]] = {"map": [], "picard": [], "anderson": []}
    with torch.no_grad():
        for _ in range(rounds):  # round-robin, so that drifts of the machine hit all alike
            t0 = time.perf_counter()
            for _ in range(iters):
                problem(z0)
            times["map"].append((time.perf_counter() - t0) / iters)
            for name in ("picard", "anderson"):
                t0 = time.perf_counter()
                eq.solve(problem, z0, solver=name, tol=0.0, max_iter=iters)
                times[name].append((time.perf_counter() - t0) / iters)
    return {f"{k}_us": 1e6 * statistics.median(v) for k, v in times.items()}


def history_products_in_the_loop() -> dict[str, float]:
    problem = build("conv", torch.device("cpu"))
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


def update(state: anderson_module.AndersonState, fx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """One Anderson update from the library's own pieces, as one function for inductor to fuse."""
    state = anderson_module._push(state, fx, g)
    alpha = anderson_module._mixing(state)
    return torch.bmm(alpha, state.images).squeeze(1)


def fused_update() -> dict[str, float]:
    batch, dim = 64, 256
    x, fx = torch.randn(batch, dim), torch.randn(batch, dim)
    g = fx - x
    solver = eq.Anderson()
    with torch.no_grad():
        state = solver.init(x, fx, g)
        for _ in range(solver.m + 1):
            state = anderson_module._push(state, fx, g)
        eager = per_call_us(lambda: update(state, fx, g))
        compiled = torch.compile(update, dynamic=False)
        t0 = time.perf_counter()
        compiled(state, fx, g)
        compile_s = time.perf_counter() - t0
        fused = per_call_us(lambda: compiled(state, fx, g))
    return {"eager_us": eager, "inductor_us": fused, "compile_s": compile_s}


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    tanh = per_iteration_tanh()
    print(
        f"tanh map: one call {tanh['map_us']:.0f} us; per iteration: Picard "
        f"{tanh['picard_us']:.0f} us, Anderson {tanh['anderson_us']:.0f} us"
    )
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
    result = {"tanh_per_iteration": tanh, "in_the_loop": loop, "fused_update": fused}
    path = write_result("anderson_cost", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
