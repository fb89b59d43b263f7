"""Solver benchmark: equilibria against TorchDEQ 0.1.0, measured in the same run.

Problems (float32, rel tolerance 1e-4):
* ``tanh``: z -> tanh(z W^T + x), batch 64, width 256, W symmetric with eigenvalues in [0, 0.95];
* ``conv``: an MDEQ-style residual conv block (batch 16, 32 channels, 16x16) whose Jacobian at the
  fixed point has spectral radius about 0.9;
* ``conv-1e-3``: the same block rescaled, g(z) = 1e-3 f(z / 1e-3).

For each: iterations (map evaluations), median wall time and the solver overhead
(solve time / the time spent inside the map during that solve, median over solves) of
equilibria's Anderson and Broyden with their defaults,
TorchDEQ's Anderson with its defaults and with its best lam from {1e-4, 1e-6, 1e-8, 1e-10} (fewest
iterations, then least time), and TorchDEQ's Broyden (at the common budget and at its solver's
default budget of 50: it allocates and multiplies max_iter history pairs, so its cost grows with the
budget). All contenders run round-robin in one loop,
and time ratios are medians of per-round ratios, so that the speed drifts of a shared machine hit
every side alike. Then forward + implicit backward of both
libraries at equal gradient accuracy (TorchDEQ twice: with the tuned lam in its backward Anderson
too, registered as a solver since ``solver_kwargs`` reach only its forward solver, and with its
default backward solver, fixed-point iteration; the ratio is against the faster of the two): each
side uses the loosest backward tolerance (from 1e-3 down
to 1e-8) whose gradient is within ``--grad-error`` (relative, over all parameters and the input) of
a float64 reference solved to 1e-11. The forward tolerance (1e-4) bounds the reachable accuracy:
where either side cannot reach ``--grad-error`` at any backward tolerance, both are held to 1.1x the
larger of their best errors instead (the target used is in the results).

The overhead is measured inside the solve because a map's cost depends on its input and on what the
cache holds: timed on its own, on one input over and over, a conv map ran up to 20% faster than the
same calls inside a solve, which made even plain Picard iteration look 1.5x "overhead". The
JSON also keeps solve time / (iterations x one standalone call near the equilibrium).

Run: ``make bench`` or ``python benchmarks/solvers.py [--quick] [--device cuda]``. Writes
``benchmarks/results/solvers.json`` and ``benchmarks/results/solvers.md`` (``solvers-cuda.*`` with
``--device cuda``; every timing synchronises the device, and ``--out`` picks another folder). On
CUDA the in-loop overhead is an upper bound: the map calls it times are bracketed by device
synchronisations, which the solve timed for the ms column does not have.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import equilibria as eq

from common import (
    RESULTS,
    Counted,
    ResBlock,
    interleaved_samples,
    machine,
    median_ms,
    paired_ratio,
    sync,
    write_result,
)

TOL = 1e-4
MAX_ITER = 300
LAMS = (1e-4, 1e-6, 1e-8, 1e-10)
TD_BROYDEN_DEFAULT_BUDGET = 50  # torchdeq.solver.broyden_solver's default max_iter
B_TOLS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)


# ------------------------------------------------------------------------------------------------
# Problems: each gives a parametrised map f(z) (parameters and input require grad for the backward
# benchmark), z0, and a float64 copy for the reference gradient.


class TanhAffine(torch.nn.Module):
    def __init__(self, batch: int = 64, width: int = 256, radius: float = 0.95, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(width, width, generator=g))
        w = q @ torch.diag(torch.linspace(0.0, radius, width)) @ q.T
        self.weight = torch.nn.Parameter(w)
        self.x = torch.nn.Parameter(0.1 * torch.randn(batch, width, generator=g))
        self.scale = 1.0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        s = self.scale
        return s * torch.tanh(torch.addmm(self.x, z / s if s != 1.0 else z, self.weight.T))

    def z0(self) -> torch.Tensor:
        return torch.zeros_like(self.x)


class ConvProblem(torch.nn.Module):
    def __init__(self, batch: int = 16, channels: int = 32, size: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.block = ResBlock(channels)
        self.x = torch.nn.Parameter(torch.randn(batch, channels, size, size))
        self.scale = 1.0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        s = self.scale
        return s * self.block(z / s if s != 1.0 else z, self.x)

    def z0(self) -> torch.Tensor:
        return torch.zeros_like(self.x)


def tune_radius(problem: ConvProblem, radius: float = 0.9, steps: int = 14) -> float:
    """Set the block's conv2 scale so that the spectral radius at the equilibrium is ~radius."""
    lo, hi, rho = 0.05, 8.0, 0.0
    for _ in range(steps):
        problem.block.scale = (lo * hi) ** 0.5
        with torch.no_grad():
            z = eq.solve(problem, problem.z0(), solver="broyden", tol=1e-6, max_iter=300).value
        rho = float(eq.spectral_radius(problem, z, iters=40).max())
        lo, hi = (lo, problem.block.scale) if rho > radius else (problem.block.scale, hi)
    return rho


def build(name: str, device: torch.device) -> torch.nn.Module:
    if name == "tanh":
        return TanhAffine().to(device)
    # tuned on the CPU, then moved: the same block on every device (tuned on a GPU, the radius
    # estimate's random start and round-off gave another conv2 scale, hence another problem)
    problem = ConvProblem()
    problem.rho = tune_radius(problem)
    problem = problem.to(device)
    if name == "conv-1e-3":
        problem.scale = 1e-3
    return problem


# ------------------------------------------------------------------------------------------------
# Forward solvers


def td_solvers() -> dict[str, Callable]:
    from torchdeq.solver import get_solver

    return {"anderson": get_solver("anderson"), "broyden": get_solver("broyden")}


def forward_rows(problem: torch.nn.Module, repeats: int) -> dict[str, Any]:
    td = td_solvers()
    z0 = problem.z0()
    with torch.no_grad():
        # one map call on its own, near the equilibrium (an all-zero z0 can be markedly cheaper,
        # e.g. through ReLU and normalisation fast paths)
        z_star = eq.solve(problem, z0, solver="anderson", tol=1e-6, max_iter=MAX_ITER).value
        t_f = median_ms(lambda: problem(z_star), repeats=max(50, repeats * 5), warmup=5)
        t_f0 = median_ms(lambda: problem(z0), repeats=max(50, repeats * 5), warmup=5)

        def ours(solver: eq.Solver) -> tuple[Callable, int, bool]:
            def run(fmap: Callable) -> Any:
                return eq.solve(fmap, z0, solver=solver, tol=TOL, max_iter=MAX_ITER)

            counted = Counted(problem)
            sol = run(counted)
            return run, counted.calls, bool(sol.converged.all())

        def theirs(kind: str, budget: int = MAX_ITER, **kw: Any) -> tuple[Callable, int, bool]:
            def run(fmap: Callable) -> Any:
                return td[kind](fmap, z0, max_iter=budget, tol=TOL, stop_mode="rel", **kw)

            counted = Counted(problem)
            info = run(counted)[2]
            return run, counted.calls, bool((info["rel_lowest"] < TOL).all())

        runs = {
            "equilibria anderson": ours(eq.Anderson()),
            "equilibria broyden": ours(eq.Broyden()),
            "equilibria picard": ours(eq.Picard()),
            "torchdeq anderson (default)": theirs("anderson"),
            "torchdeq broyden": theirs("broyden"),
            # TorchDEQ's Broyden allocates and multiplies max_iter history pairs: its cost grows
            # with the budget, so it also runs at its solver's default budget
            f"torchdeq broyden (max_iter={TD_BROYDEN_DEFAULT_BUDGET})": theirs(
                "broyden", budget=TD_BROYDEN_DEFAULT_BUDGET
            ),
        }
        tuned = {lam: theirs("anderson", lam=lam) for lam in LAMS}

        def timer(run: Callable) -> Callable:
            return lambda: run(problem)

        # every contender, TorchDEQ's lam sweep included, in one round-robin: drifts in the speed
        # of the machine hit them alike, and ratios are taken per round
        tuned_keys = {lam: f"torchdeq anderson (lam={lam:g})" for lam in LAMS}
        fns = {k: timer(v[0]) for k, v in runs.items()}
        fns.update({tuned_keys[lam]: timer(v[0]) for lam, v in tuned.items()})
        samples = interleaved_samples(fns, repeats=repeats)
        median = {k: statistics.median(v) for k, v in samples.items()}
        best = min(
            LAMS, key=lambda lam: (not tuned[lam][2], tuned[lam][1], median[tuned_keys[lam]])
        )
        best_key = f"torchdeq anderson (tuned lam={best:g})"
        runs[best_key] = tuned[best]
        samples[best_key] = samples[tuned_keys[best]]
        median[best_key] = median[tuned_keys[best]]
        overheads = {k: in_loop_overhead(problem, v[0], repeats) for k, v in runs.items()}
    rows = {
        k: {
            "iterations": v[1],
            "converged": v[2],
            "ms": median[k],
            "samples_ms": samples[k],
            "overhead": overheads[k],
            "overhead_vs_standalone_map": median[k] / (v[1] * t_f),
        }
        for k, v in runs.items()
    }
    return {
        "map_ms": t_f,
        "map_ms_at_z0": t_f0,
        "rows": rows,
        "tuned_lam": best,
        "all_lams": _lam_table(tuned),
    }


def in_loop_overhead(problem: torch.nn.Module, run: Callable, repeats: int) -> float:
    """Median over solves of (solve time) / (time spent inside the map during that solve)."""
    ratios = []
    for i in range(repeats + 2):
        timed = TimedMap(problem)
        sync()
        t0 = time.perf_counter()
        run(timed)
        sync()
        if i >= 2:  # warm-up
            ratios.append((time.perf_counter() - t0) / timed.seconds)
    return statistics.median(ratios)


class TimedMap:
    """Wraps a map and adds up the wall time spent in its calls."""

    def __init__(self, f: Callable) -> None:
        self.f = f
        self.seconds = 0.0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        sync()
        t0 = time.perf_counter()
        out = self.f(z)
        sync()
        self.seconds += time.perf_counter() - t0
        return out


def _lam_table(tuned: dict) -> dict[str, Any]:
    return {f"{lam:g}": {"iterations": v[1], "converged": v[2]} for lam, v in tuned.items()}


# ------------------------------------------------------------------------------------------------
# Forward + implicit backward at equal gradient accuracy


def reference_grads(problem: torch.nn.Module) -> list[torch.Tensor]:
    import copy

    p64 = copy.deepcopy(problem).double()
    z0 = p64.z0()
    z, _ = eq.fixed_point(
        p64,
        z0,
        solver=eq.Anderson(),
        tol=1e-11,
        max_iter=2000,
        backward=eq.Implicit(tol=1e-11, max_iter=2000),
    )
    grad_out = _upstream(z)
    return [g.float() for g in torch.autograd.grad(z, list(p64.parameters()), grad_out)]


def _upstream(z: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(z.shape, generator=g) / z.numel() ** 0.5).to(z.device, z.dtype)


def _rel_error(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(grads, ref))
    den = sum(float(b.pow(2).sum()) for b in ref)
    return (num / den) ** 0.5


def backward_rows(problem: torch.nn.Module, repeats: int, target: float, lam: float) -> dict:
    from torchdeq import get_deq
    from torchdeq.solver import register_solver
    from torchdeq.solver.anderson import anderson_solver

    params = list(problem.parameters())
    ref = reference_grads(problem)
    z0 = problem.z0()

    def ours(b_tol: float) -> Callable[[], list[torch.Tensor]]:
        def run() -> list[torch.Tensor]:
            z, _ = eq.fixed_point(
                problem,
                z0,
                tol=TOL,
                max_iter=MAX_ITER,
                backward=eq.Implicit(tol=b_tol, max_iter=MAX_ITER),
            )
            return list(torch.autograd.grad(z, params, _upstream(z)))

        return run

    def theirs(b_tol: float, b_solver: str) -> Callable[[], list[torch.Tensor]]:
        deq = get_deq(
            f_solver="anderson",
            b_solver=b_solver,
            f_max_iter=MAX_ITER,
            b_max_iter=MAX_ITER,
            f_tol=TOL,
            b_tol=b_tol,
            f_stop_mode="rel",
            b_stop_mode="rel",
            ift=True,
        )

        def run() -> list[torch.Tensor]:
            z_out, _ = deq(problem, z0, solver_kwargs={"lam": lam})
            z = z_out[-1]
            return list(torch.autograd.grad(z, params, _upstream(z)))

        return run

    # TorchDEQ passes solver_kwargs to the forward solver only; its backward solver is built from
    # the registry with max_iter, tol and stop_mode. A user who tuned lam registers an Anderson
    # with that lam for the backward too; its default backward solver is plain fixed-point
    # iteration. Both are measured, and the faster is the one compared with.
    tuned_name = f"anderson_lam_{lam:g}"
    register_solver(tuned_name, functools.partial(anderson_solver, lam=lam))
    makers = {
        "equilibria": ours,
        "torchdeq": lambda b_tol: theirs(b_tol, tuned_name),
        "torchdeq (default backward)": lambda b_tol: theirs(b_tol, "fixed_point_iter"),
    }
    errors = {
        name: {b_tol: _rel_error(make(b_tol)(), ref) for b_tol in B_TOLS}
        for name, make in makers.items()
    }
    # The forward tolerance bounds how accurate any backward can be. When the requested accuracy is
    # out of reach for either side, compare at the accuracy both can reach: 10% above the larger of
    # the two sides' best errors.
    reachable = max(min(e.values()) for e in errors.values())
    effective = target if reachable <= target else 1.1 * reachable
    out: dict[str, Any] = {"requested_target": target, "target": effective}
    chosen: dict[str, Callable] = {}
    for name, make in makers.items():
        b_tol = next((t for t in B_TOLS if errors[name][t] <= effective), B_TOLS[-1])
        chosen[name] = make(b_tol)
        out[name] = {
            "b_tol": b_tol,
            "grad_error": errors[name][b_tol],
            "errors": {f"{t:g}": e for t, e in errors[name].items()},
            "reached_target": errors[name][b_tol] <= effective,
        }
    samples = interleaved_samples(chosen, repeats=repeats)
    for name in chosen:
        out[name]["ms"] = statistics.median(samples[name])
    theirs_keys = [k for k in chosen if k.startswith("torchdeq")]
    ratios = {k: paired_ratio(samples["equilibria"], samples[k]) for k in theirs_keys}
    out["ratios"] = ratios
    out["ratio"] = max(ratios.values())  # against the faster TorchDEQ configuration
    return out


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--grad-error", type=float, default=1e-3, help="gradient accuracy target")
    parser.add_argument("--problems", nargs="*", default=["tanh", "conv", "conv-1e-3"])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the result files")
    parser.add_argument(
        "--no-tf32",
        action="store_true",
        help="on CUDA, turn off TF32 in cuDNN convolutions (on by PyTorch's default) and in "
        "matrix products (already off by default)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 25
    results: dict[str, Any] = {"tol": TOL, "max_iter": MAX_ITER, "problems": {}}
    results["device"] = _device_name(device)
    if device.type == "cuda":
        results["tf32"] = {
            "cudnn_conv": torch.backends.cudnn.allow_tf32,
            "matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    for name in args.problems:
        problem = build(name, device)
        fwd = forward_rows(problem, 4 * repeats if name == "tanh" else max(3, repeats // 3))
        bwd = backward_rows(problem, max(3, repeats // 3), args.grad_error, fwd["tuned_lam"])
        entry = {"forward": fwd, "implicit": bwd}
        if hasattr(problem, "rho"):
            entry["spectral_radius"] = problem.rho
        results["problems"][name] = entry
        _print_problem(name, entry)
    results["targets"] = _targets(results["problems"])
    stem = "solvers" if device.type == "cpu" else f"solvers-{device.type}"
    path = write_result(stem, results, args.out)
    md = _markdown(results)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {path} and {args.out / f'{stem}.md'}")
    return 0


def _find(rows: dict, prefix: str) -> dict:
    return next(v for k, v in rows.items() if k.startswith(prefix))


def _targets(problems: dict) -> dict[str, Any]:
    t: dict[str, Any] = {}
    for name, entry in problems.items():
        rows = entry["forward"]["rows"]
        ours_a, ours_b = rows["equilibria anderson"], rows["equilibria broyden"]
        tuned = _find(rows, "torchdeq anderson (tuned")
        td_b = rows["torchdeq broyden"]
        td_b50 = rows[f"torchdeq broyden (max_iter={TD_BROYDEN_DEFAULT_BUDGET})"]
        t[name] = {
            "anderson_iterations_vs_tuned": f"{ours_a['iterations']} vs {tuned['iterations']}",
            "anderson_no_more_iterations": ours_a["iterations"] <= tuned["iterations"],
            "anderson_time_ratio_vs_tuned": paired_ratio(ours_a["samples_ms"], tuned["samples_ms"]),
            "broyden_time_ratio": paired_ratio(ours_b["samples_ms"], td_b["samples_ms"]),
            "broyden_time_ratio_td_budget_50": paired_ratio(
                ours_b["samples_ms"], td_b50["samples_ms"]
            ),
            "broyden_extra_iterations": ours_b["iterations"] - td_b["iterations"],
            "anderson_overhead": ours_a["overhead"],
            "anderson_converged": ours_a["converged"],
            "implicit_time_ratio": entry["implicit"]["ratio"],
        }
    return t


def _print_problem(name: str, entry: dict) -> None:
    fwd = entry["forward"]
    print(
        f"\n== {name}: one map call {fwd['map_ms']:.3f} ms near the equilibrium "
        f"({fwd['map_ms_at_z0']:.3f} ms at z0)",
        end="",
    )
    if "spectral_radius" in entry:
        print(f", spectral radius {entry['spectral_radius']:.3f}", end="")
    print()
    for k, v in fwd["rows"].items():
        print(
            f"  {k:38s} it {v['iterations']:4d}  {v['ms']:9.2f} ms  overhead {v['overhead']:5.2f}"
            f"  {'converged' if v['converged'] else 'NOT converged'}"
        )
    imp = entry["implicit"]
    for side in [k for k in imp if k.startswith(("equilibria", "torchdeq"))]:
        v = imp[side]
        print(
            f"  fwd+implicit bwd {side:27s} b_tol {v['b_tol']:g}  grad err {v['grad_error']:.1e}"
            f"  {v['ms']:9.2f} ms"
        )
    print(
        f"  implicit time ratio equilibria/faster torchdeq: {imp['ratio']:.2f} at gradient error "
        f"<= {imp['target']:.1e} (requested {imp['requested_target']:.1e})"
    )


def _markdown(results: dict) -> str:
    lines = [
        "| problem | method | iterations | ms | overhead | converged |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, entry in results["problems"].items():
        for k, v in entry["forward"]["rows"].items():
            lines.append(
                f"| {name} | {k} | {v['iterations']} | {v['ms']:.2f} | {v['overhead']:.2f} | "
                f"{'yes' if v['converged'] else 'no'} |"
            )
    lines += [
        "",
        "| problem | forward + implicit backward | accuracy target | backward tol | grad error "
        "| ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, entry in results["problems"].items():
        for side in [k for k in entry["implicit"] if k.startswith(("equilibria", "torchdeq"))]:
            v = entry["implicit"][side]
            lines.append(
                f"| {name} | {side} | {entry['implicit']['target']:.1e} | {v['b_tol']:g} | "
                f"{v['grad_error']:.1e} | {v['ms']:.2f} |"
            )
    lines += [
        "",
        "| problem | Anderson it (ours vs tuned) | Anderson time | Broyden time (TorchDEQ "
        f"budget {MAX_ITER} / {TD_BROYDEN_DEFAULT_BUDGET}) | Broyden extra it | overhead | "
        "implicit time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in results["targets"].items():
        lines.append(
            f"| {name} | {t['anderson_iterations_vs_tuned']} | "
            f"{t['anderson_time_ratio_vs_tuned']:.2f}x | {t['broyden_time_ratio']:.2f}x / "
            f"{t['broyden_time_ratio_td_budget_50']:.2f}x | "
            f"{t['broyden_extra_iterations']:+d} | {t['anderson_overhead']:.2f} | "
            f"{t['implicit_time_ratio']:.2f}x |"
        )
    m = machine()
    lines.append("")
    lines.append(
        f"Measured with torch {m['torch']} on {results['device']} ({m['cores']} {m['cpu']} "
        f"cores, {m['threads']} threads); overhead = solve time / time spent inside the map "
        "during the solve (median over solves)."
    )
    return "\n".join(lines) + "\n"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


if __name__ == "__main__":
    raise SystemExit(main())
