"""Solver benchmark: equilibria against TorchDEQ 0.1.0, measured in the same run.

Problems (float32, rel tolerance 1e-4):
* ``tanh``: z -> tanh(z W^T + x), batch 64, width 256, W symmetric with eigenvalues in [0, 0.95];
* ``conv``: an MDEQ-style residual conv block (batch 16, 32 channels, 16x16) whose Jacobian at the
  fixed point has spectral radius about 0.9;
* ``conv-1e-3``: the same block rescaled, g(z) = 1e-3 f(z / 1e-3).

For each: iterations (map evaluations), median wall time and the solver overhead
time / (iterations x time of one map call) of equilibria's Anderson and Broyden with their defaults,
TorchDEQ's Anderson with its defaults and with its best lam from {1e-4, 1e-6, 1e-8, 1e-10} (fewest
iterations, then least time), and TorchDEQ's Broyden. Then forward + implicit backward of both
libraries at equal gradient accuracy: each side uses the loosest backward tolerance (from 1e-3 down
to 1e-8) whose gradient is within ``--grad-error`` (relative, over all parameters and the input) of
a float64 reference solved to 1e-11.

Run: ``make bench`` or ``python benchmarks/solvers.py [--quick]``. Writes
``benchmarks/results/solvers.json`` and ``benchmarks/results/solvers.md``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

import equilibria as eq

from common import (
    RESULTS,
    Counted,
    ResBlock,
    interleaved_ms,
    median_ms,
    write_result,
)

TOL = 1e-4
MAX_ITER = 300
LAMS = (1e-4, 1e-6, 1e-8, 1e-10)
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


def build(name: str) -> torch.nn.Module:
    if name == "tanh":
        return TanhAffine()
    problem = ConvProblem()
    problem.rho = tune_radius(problem)
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
        t_f = median_ms(lambda: problem(z0), repeats=max(50, repeats * 5), warmup=5)

        def ours(solver: eq.Solver) -> tuple[Callable, int, bool]:
            counted = Counted(problem)
            sol = eq.solve(counted, z0, solver=solver, tol=TOL, max_iter=MAX_ITER)
            return (
                lambda: eq.solve(problem, z0, solver=solver, tol=TOL, max_iter=MAX_ITER),
                counted.calls,
                bool(sol.converged.all()),
            )

        def theirs(kind: str, **kw: Any) -> tuple[Callable, int, bool]:
            counted = Counted(problem)
            _, _, info = td[kind](counted, z0, max_iter=MAX_ITER, tol=TOL, stop_mode="rel", **kw)
            ok = bool((info["rel_lowest"] < TOL).all())
            return (
                lambda: td[kind](problem, z0, max_iter=MAX_ITER, tol=TOL, stop_mode="rel", **kw),
                counted.calls,
                ok,
            )

        runs = {
            "equilibria anderson": ours(eq.Anderson()),
            "equilibria broyden": ours(eq.Broyden()),
            "equilibria picard": ours(eq.Picard()),
            "torchdeq anderson (default)": theirs("anderson"),
            "torchdeq broyden": theirs("broyden"),
        }
        tuned = {lam: theirs("anderson", lam=lam) for lam in LAMS}
        times = interleaved_ms({k: v[0] for k, v in runs.items()}, repeats=repeats)
        tuned_times = interleaved_ms({lam: v[0] for lam, v in tuned.items()}, repeats=repeats)
    best = min(LAMS, key=lambda lam: (not tuned[lam][2], tuned[lam][1], tuned_times[lam]))
    runs[f"torchdeq anderson (tuned lam={best:g})"] = tuned[best]
    times[f"torchdeq anderson (tuned lam={best:g})"] = tuned_times[best]
    rows = {
        k: {
            "iterations": v[1],
            "converged": v[2],
            "ms": times[k],
            "overhead": times[k] / (v[1] * t_f),
        }
        for k, v in runs.items()
    }
    return {"map_ms": t_f, "rows": rows, "tuned_lam": best, "all_lams": _lam_table(tuned)}


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
    return (torch.randn(z.shape, generator=g) / z.numel() ** 0.5).to(z.dtype)


def _rel_error(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(grads, ref))
    den = sum(float(b.pow(2).sum()) for b in ref)
    return (num / den) ** 0.5


def backward_rows(problem: torch.nn.Module, repeats: int, target: float, lam: float) -> dict:
    from torchdeq import get_deq

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

    def theirs(b_tol: float) -> Callable[[], list[torch.Tensor]]:
        deq = get_deq(
            f_solver="anderson",
            b_solver="anderson",
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

    out: dict[str, Any] = {}
    chosen: dict[str, Callable] = {}
    for name, make in (("equilibria", ours), ("torchdeq", theirs)):
        errors = {}
        for b_tol in B_TOLS:
            errors[f"{b_tol:g}"] = _rel_error(make(b_tol)(), ref)
            if errors[f"{b_tol:g}"] <= target:
                chosen[name] = make(b_tol)
                out[name] = {"b_tol": b_tol, "grad_error": errors[f"{b_tol:g}"]}
                break
        else:
            chosen[name] = make(B_TOLS[-1])
            out[name] = {"b_tol": B_TOLS[-1], "grad_error": errors[f"{B_TOLS[-1]:g}"]}
        out[name]["errors"] = errors
        out[name]["reached_target"] = out[name]["grad_error"] <= target
    times = interleaved_ms(chosen, repeats=repeats)
    for name in chosen:
        out[name]["ms"] = times[name]
    out["ratio"] = times["equilibria"] / times["torchdeq"]
    return out


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--grad-error", type=float, default=1e-3, help="gradient accuracy target")
    parser.add_argument("--problems", nargs="*", default=["tanh", "conv", "conv-1e-3"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 25
    results: dict[str, Any] = {"tol": TOL, "max_iter": MAX_ITER, "problems": {}}
    for name in args.problems:
        problem = build(name)
        fwd = forward_rows(problem, repeats if name == "tanh" else max(3, repeats // 3))
        bwd = backward_rows(problem, max(3, repeats // 3), args.grad_error, fwd["tuned_lam"])
        entry = {"forward": fwd, "implicit": bwd}
        if hasattr(problem, "rho"):
            entry["spectral_radius"] = problem.rho
        results["problems"][name] = entry
        _print_problem(name, entry)
    results["targets"] = _targets(results["problems"])
    path = write_result("solvers", results)
    md = _markdown(results)
    (RESULTS / "solvers.md").write_text(md)
    print(md)
    print(f"wrote {path} and {RESULTS / 'solvers.md'}")
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
        t[name] = {
            "anderson_iterations_vs_tuned": f"{ours_a['iterations']} vs {tuned['iterations']}",
            "anderson_no_more_iterations": ours_a["iterations"] <= tuned["iterations"],
            "anderson_time_ratio_vs_tuned": ours_a["ms"] / tuned["ms"],
            "broyden_time_ratio": ours_b["ms"] / td_b["ms"],
            "broyden_extra_iterations": ours_b["iterations"] - td_b["iterations"],
            "anderson_overhead": ours_a["overhead"],
            "anderson_converged": ours_a["converged"],
            "implicit_time_ratio": entry["implicit"]["ratio"],
        }
    return t


def _print_problem(name: str, entry: dict) -> None:
    fwd = entry["forward"]
    print(f"\n== {name}: one map call {fwd['map_ms']:.3f} ms", end="")
    if "spectral_radius" in entry:
        print(f", spectral radius {entry['spectral_radius']:.3f}", end="")
    print()
    for k, v in fwd["rows"].items():
        print(
            f"  {k:38s} it {v['iterations']:4d}  {v['ms']:9.2f} ms  overhead {v['overhead']:5.2f}"
            f"  {'converged' if v['converged'] else 'NOT converged'}"
        )
    imp = entry["implicit"]
    for side in ("equilibria", "torchdeq"):
        v = imp[side]
        print(
            f"  fwd+implicit bwd {side:11s} b_tol {v['b_tol']:g}  grad err {v['grad_error']:.1e}"
            f"  {v['ms']:9.2f} ms"
        )
    print(f"  implicit time ratio equilibria/torchdeq: {imp['ratio']:.2f}")


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
        "| problem | forward + implicit backward | backward tol | grad error | ms |",
        "|---|---|---:|---:|---:|",
    ]
    for name, entry in results["problems"].items():
        for side in ("equilibria", "torchdeq"):
            v = entry["implicit"][side]
            lines.append(
                f"| {name} | {side} | {v['b_tol']:g} | {v['grad_error']:.1e} | {v['ms']:.2f} |"
            )
    lines += [
        "",
        "| problem | Anderson it (ours vs tuned) | Anderson time | Broyden time | "
        "Broyden extra it | overhead | implicit time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in results["targets"].items():
        lines.append(
            f"| {name} | {t['anderson_iterations_vs_tuned']} | "
            f"{t['anderson_time_ratio_vs_tuned']:.2f}x | {t['broyden_time_ratio']:.2f}x | "
            f"{t['broyden_extra_iterations']:+d} | {t['anderson_overhead']:.2f} | "
            f"{t['implicit_time_ratio']:.2f}x |"
        )
    m = results["machine"] if "machine" in results else {}
    lines.append("")
    lines.append(f"Measured with torch {torch.__version__}, {torch.get_num_threads()} threads. {m}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
