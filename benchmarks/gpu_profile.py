"""Where a solver iteration's time goes on a GPU (behind the README's GPU overhead notes).

On the solver benchmark's tanh map (batch 64, width 256, float32), with the device synchronised
only at the ends of each timed stretch:

1. Per iteration: one map call (40 in a row), and Picard, Anderson and Broyden solves that run a
   fixed 40 iterations (tol 0), round-robin.
2. Anderson's own update (``_push``, ``_mixing`` and the mixing product) timed alone, eagerly and
   replayed from a CUDA graph captured once: what launches cost next to the arithmetic.
3. ``torch.profiler`` over Anderson solves: CUDA kernels per iteration and the operators with the
   most host time.

Run: ``python benchmarks/gpu_profile.py [--device cuda] [--out DIR]``; writes
``gpu_profile.json``. Also runs on the CPU (without the CUDA graph part, about 10 s); no
automated test runs it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import equilibria as eq
from equilibria._solvers import anderson as anderson_module

from common import RESULTS, machine, sync, write_result
from solvers import build

ITERS = 40


def per_iteration(device: torch.device, rounds: int) -> dict[str, float]:
    problem = build("tanh", device)
    z0 = problem.z0()
    names = ("picard", "anderson", "broyden")
    times: dict[str, list[float]] = {k: [] for k in ("map", *names)}
    with torch.no_grad():
        for _ in range(3):
            for name in names:
                eq.solve(problem, z0, solver=name, tol=0.0, max_iter=ITERS)
        for _ in range(rounds):
            sync()
            t0 = time.perf_counter()
            for _ in range(ITERS):
                problem(z0)
            sync()
            times["map"].append((time.perf_counter() - t0) / ITERS)
            for name in names:
                sync()
                t0 = time.perf_counter()
                eq.solve(problem, z0, solver=name, tol=0.0, max_iter=ITERS)
                sync()
                times[name].append((time.perf_counter() - t0) / ITERS)
    return {f"{k}_us": 1e6 * statistics.median(v) for k, v in times.items()}


def anderson_update(device: torch.device, calls: int = 400) -> dict[str, Any]:
    """The update alone (no map): eager vs one CUDA graph replay per call."""
    gen = torch.Generator().manual_seed(0)
    b, d, m = 64, 256, 5
    solver = eq.Anderson(m=m)
    fx = torch.randn(b, d, generator=gen).to(device)
    x = torch.randn(b, d, generator=gen).to(device)
    with torch.no_grad():
        state = solver.init(x, fx, fx - x)
        for _ in range(m):  # fill the history
            state = anderson_module._push(state, fx + 0.1 * torch.randn_like(fx), fx - x)

        def update() -> torch.Tensor:
            s = anderson_module._push(state, fx, x)  # fixed slot: the state's count does not move
            alpha = anderson_module._mixing(s)
            return torch.bmm(alpha, s.images).squeeze(1)

        def timed(fn: Any) -> float:
            for _ in range(20):
                fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            return 1e6 * (time.perf_counter() - t0) / calls

        out: dict[str, Any] = {"eager_us": timed(update)}
        if device.type == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    update()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                update()
            out["graph_replay_us"] = timed(graph.replay)
            out["graph_vs_eager"] = out["graph_replay_us"] / out["eager_us"]
    return out


def profiled(device: torch.device, solves: int = 5) -> dict[str, Any]:
    problem = build("tanh", device)
    z0 = problem.z0()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    result: dict[str, Any] = {}
    with torch.no_grad():
        for name in ("picard", "anderson", "broyden"):
            eq.solve(problem, z0, solver=name, tol=0.0, max_iter=ITERS)
            with profile(activities=activities) as prof:
                for _ in range(solves):
                    eq.solve(problem, z0, solver=name, tol=0.0, max_iter=ITERS)
                sync()
            events = prof.key_averages()
            iters = solves * ITERS
            ops = sorted(
                (e for e in events if e.key.startswith("aten::")),
                key=lambda e: e.self_cpu_time_total,
                reverse=True,
            )
            row: dict[str, Any] = {
                "aten_calls_per_iteration": sum(e.count for e in ops) / iters,
                "top_host_us_per_iteration": {
                    e.key: round(e.self_cpu_time_total / iters, 2) for e in ops[:15]
                },
            }
            if device.type == "cuda":
                kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
                row["kernels_per_iteration"] = sum(e.count for e in kernels) / iters
                row["top_kernels_us_per_iteration"] = {
                    e.key[:80]: round(e.self_device_time_total / iters, 2)
                    for e in sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[
                        :10
                    ]
                }
            result[name] = row
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    results: dict[str, Any] = {"machine": machine(), "device": str(device)}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    results["per_iteration"] = per_iteration(device, args.rounds)
    print("per iteration (us):", results["per_iteration"], flush=True)
    results["anderson_update"] = anderson_update(device)
    print("Anderson update alone (us):", results["anderson_update"], flush=True)
    results["profile"] = profiled(device)
    for name, row in results["profile"].items():
        print(name, row, flush=True)
    write_result("gpu_profile" if device.type == "cuda" else "gpu_profile-cpu", results, args.out)


if __name__ == "__main__":
    main()
