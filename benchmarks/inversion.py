"""Inversion through the equilibrium vs backpropagation through the sequential sampler.

Find x_T whose DDIM sample (T = 100 steps) reconstructs held-out digits, with the trained ε-model
of the ``diffusion`` recipe, by Adam on x_T from the DDIM encoding, with three gradients:
``implicit`` (joint fixed-point forward, warm-started, + adjoint sweep), ``phantom`` (same forward
+ one damped step) and ``bptt`` (the baseline), each at every Adam learning rate of a small grid
and reported at its best. Every run gets the same budget of process CPU
time (``time.process_time``; the machine's cores are shared, so wall-clock is not a fair budget);
the reconstruction error is the per-image MSE of the *sequential* sample of the final x_T, and
the curve is each iteration's forward sample error against the CPU time spent. Peak memory of one
gradient (tensor storages created, ``equilibria/zoo/memory.py``) is measured for T = 10 .. 100.

Usage::

    python benchmarks/inversion.py                       # trains the recipe in runs/ if needed
    python benchmarks/inversion.py --run runs/diffusion/<run> --budget 30 --images 8

Writes ``benchmarks/results/inversion.json`` and ``inversion.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from equilibria import sampling
from equilibria.sampling import _inversion as inv
from equilibria.zoo.diffusion import ddim_schedule, trained_eps_model
from equilibria.zoo.diffusion_model import load_digits01
from equilibria.zoo.memory import PeakMemory

from common import RESULTS, write_result

METHODS = ("implicit", "phantom", "bptt")


def run_method(model, target, sched, method: str, lr: float, args) -> dict[str, Any]:
    curve: list[tuple[float, float]] = []
    start = time.process_time()

    def record(step: int, x_T: torch.Tensor, per: torch.Tensor) -> bool:
        spent = time.process_time() - start
        curve.append((spent, float(per.mean())))
        return spent >= args.budget

    _, res = sampling.invert(
        model, target, sched, gradient=method, steps=10**6, lr=lr, solver=args.solver,
        tol=args.tol, damping=0.1, callback=record,
    )  # fmt: skip
    return {
        "method": method,
        "lr": lr,
        "iterations": res.steps,
        "cpu_s": res.cpu_s,
        "rounds": res.rounds,
        "nfe": res.nfe,
        "error_start": curve[0][1],
        "error_final": float(res.error.mean()),
        "error_final_per_image": res.error.tolist(),
        "curve": curve,
    }


def gradient_peak(model, target, method: str, T: int, alphas) -> int:
    sched = ddim_schedule(alphas, T)
    x_T = inv.encode(model, target, sched)
    x0, sol = sampling.sample(model, x_T, sched, solver="sequential")
    _, g0 = inv._loss_grad(x0, target)
    with PeakMemory("cpu") as mem:
        if method == "implicit":
            inv.implicit_sweep(model, sched, sol.trajectory, g0)
        elif method == "phantom":
            inv.phantom_gradient(model, sched, x_T, g0)
        else:
            inv.bptt(model, sched, x_T, target)
    assert mem.peak_bytes is not None
    return mem.peak_bytes


def plot(results: list[dict[str, Any]], memory: dict[str, dict[int, int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in results:
        t, e = zip(*r["curve"])
        ax.plot(t, e, label=f"{r['method']} (lr {r['lr']:g}, {r['iterations']} it.)")
    ax.set(xlabel="process CPU time (s)", ylabel="reconstruction MSE (forward sample)",
           yscale="log", title="inversion at T = 100, equal CPU budget")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    for method, peaks in memory.items():
        ts = sorted(peaks)
        bx.plot(ts, [peaks[t] / 2**20 for t in ts], "o-", label=method)
    bx.set(xlabel="DDIM steps T", ylabel="peak MB of one gradient", yscale="log",
           title="memory of the gradient vs T")  # fmt: skip
    bx.grid(alpha=0.3, which="both")
    bx.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run",
        default="runs/diffusion/bench",
        help="diffusion run folder (trained there if it has no finished run)",
    )
    parser.add_argument("--steps", type=int, default=100, help="DDIM steps T")
    parser.add_argument("--images", type=int, default=8, help="test images to invert")
    parser.add_argument("--budget", type=float, default=30.0, help="CPU seconds per run")
    parser.add_argument(
        "--lr",
        type=float,
        nargs="+",
        default=[0.002, 0.005, 0.02],
        help="Adam learning rates; each method is reported at its best",
    )
    parser.add_argument("--solver", default="default", help="forward solver (implicit, phantom)")
    parser.add_argument("--tol", type=float, default=1e-3, help="forward tolerance")
    parser.add_argument("--memory-steps", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    # refused before the recipe is trained (CPU minutes), naming the option and what is allowed
    if not 1 <= args.images <= 360:
        parser.error(f"--images must be in [1, 360] (the test split), got {args.images}")
    for name in ("budget", "tol"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    if not all(lr > 0 for lr in args.lr):
        parser.error(f"--lr values must be > 0, got {args.lr}")
    for T in [args.steps, *args.memory_steps]:
        if not 1 <= T <= 1000:
            parser.error(f"--steps/--memory-steps must be in [1, 1000] (the schedule), got {T}")
    torch.set_num_threads(1)

    model, alphas = trained_eps_model(args.run)
    _, _, x_test, _ = load_digits01(torch.float32)
    target = x_test[: args.images]
    sched = ddim_schedule(alphas, args.steps)
    grid, results = [], []
    for method in METHODS:
        for lr in args.lr:
            r = run_method(model, target, sched, method, lr, args)
            grid.append(r)
            print(f"{method:>8} lr {lr:g}: {r['iterations']:4d} iterations in {r['cpu_s']:.1f} "
                  f"CPU s, MSE {r['error_start']:.2e} -> {r['error_final']:.2e} (rounds "
                  f"{r['rounds']}, NFE {r['nfe']})", flush=True)  # fmt: skip
        results.append(min((r for r in grid if r["method"] == method),
                           key=lambda r: r["error_final"]))  # fmt: skip
    base = results[-1]["error_final"]
    for r in results:
        r["error_vs_bptt"] = r["error_final"] / base
        print(
            f"{r['method']:>8} (best lr {r['lr']:g}): final MSE {r['error_final']:.2e}, "
            f"{r['error_vs_bptt']:.2f}x BPTT's at equal CPU time"
        )
    memory: dict[str, dict[int, int]] = {}
    for method in METHODS:
        memory[method] = {T: gradient_peak(model, target, method, T, alphas)
                          for T in args.memory_steps}  # fmt: skip
        row = ", ".join(f"T={T}: {b / 2**20:.2f} MB" for T, b in memory[method].items())
        print(f"{method:>8} peak memory of one gradient: {row}")
    out = Path(args.out)
    payload = {
        "command": "python benchmarks/inversion.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("out", "memory_steps")),
        "T": args.steps, "images": args.images, "budget_cpu_s": args.budget, "lr_grid": args.lr,
        "solver": args.solver, "tol": args.tol, "results": results,
        "grid": [{k: v for k, v in r.items() if k != "curve"} for r in grid],
        "peak_bytes": {m: {str(T): b for T, b in p.items()} for m, p in memory.items()},
        "memory_method": "tensor-storages",
    }  # fmt: skip
    print(write_result("inversion", payload, out))
    plot(results, memory, out / "inversion.png")


if __name__ == "__main__":
    main()
