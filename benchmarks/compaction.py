"""Per-sample compaction: a batch of 64 where 8 samples are much harder than the rest.

An MDEQ-style conv cell (16 channels, 16x16) whose per-sample gain sets how contractive each
sample's map is: 56 easy samples converge in a few iterations, 8 hard ones need many. Without
compaction every iteration evaluates the cell on all 64 samples; with ``DEQ(compact=True)`` the
converged samples leave the batch. Reported: total cell-sample evaluations, median wall time of the
forward solve, the largest difference between the two equilibria, and the ratios.

Targets (issue 3): >= 40% fewer sample-evaluations and >= 25% less wall time at equal results.

Run: ``python benchmarks/compaction.py [--quick]``; writes ``benchmarks/results/compaction.json``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import equilibria as eq

from common import ResBlock, interleaved_ms, write_result


class GainCell(ResBlock):
    """The benchmarks' residual cell with a per-sample gain on conv2: its input is (x, gain)."""

    def __init__(self) -> None:
        super().__init__(channels=16, hidden=32)

    def forward(self, z: torch.Tensor, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, gain = inputs  # (B, C, H, W), (B, 1, 1, 1)
        return self.block(z, x, gain)


def problem(batch: int = 64, hard: int = 8, size: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    cell = GainCell().requires_grad_(False)
    x = torch.randn(batch, 16, size, size)
    gain = torch.full((batch, 1, 1, 1), 0.2)
    gain[torch.randperm(batch)[:hard]] = 1.6
    return cell, (x, gain)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--solver", default="anderson", choices=list(eq.SOLVERS))
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=150)
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 9
    cell, inputs = problem()
    z0 = torch.zeros_like(inputs[0])
    layers = {
        name: eq.DEQ(
            cell, solver=args.solver, tol=args.tol, max_iter=args.max_iter, compact=compact
        ).eval()
        for name, compact in (("full batch", False), ("compacted", True))
    }
    results: dict[str, Any] = {"solver": args.solver, "tol": args.tol, "batch": 64, "hard": 8}
    values = {}
    with torch.no_grad():
        for name, layer in layers.items():
            values[name] = layer(inputs, z0)
            sol = layer.last_solution
            results[name] = {
                "iterations": sol.nstep,
                "sample_evaluations": sol.evaluations,
                "converged": int(sol.converged.sum()),
                "max_residual": float(sol.residual.max()),
            }
        times = interleaved_ms(
            {name: (lambda layer=layer: layer(inputs, z0)) for name, layer in layers.items()},
            repeats=repeats,
        )
    full, comp = results["full batch"], results["compacted"]
    for name in layers:
        results[name]["ms"] = times[name]
    scale = float(values["full batch"].abs().max())
    results["max_difference"] = float((values["full batch"] - values["compacted"]).abs().max())
    results["max_relative_difference"] = results["max_difference"] / scale
    # the difference is a solver-tolerance effect: it shrinks with the tolerance
    with torch.no_grad():
        tight = {
            name: eq.DEQ(cell, solver=args.solver, tol=1e-7, max_iter=1000, compact=c).eval()(
                inputs, z0
            )
            for name, c in (("full batch", False), ("compacted", True))
        }
    results["max_relative_difference_at_tol_1e-7"] = (
        float((tight["full batch"] - tight["compacted"]).abs().max()) / scale
    )
    results["evaluation_saving"] = 1 - comp["sample_evaluations"] / full["sample_evaluations"]
    results["time_saving"] = 1 - comp["ms"] / full["ms"]
    results["targets"] = {
        "evaluations_at_least_40pct_fewer": results["evaluation_saving"] >= 0.40,
        "time_at_least_25pct_less": results["time_saving"] >= 0.25,
        "same_results": comp["converged"] == full["converged"] == 64,
    }
    for name in layers:
        r = results[name]
        print(
            f"{name:11s} it {r['iterations']:4d}  sample-evals {r['sample_evaluations']:6d}  "
            f"{r['ms']:8.1f} ms  converged {r['converged']}/64  max res {r['max_residual']:.1e}"
        )
    print(
        f"saving: {100 * results['evaluation_saving']:.0f}% sample-evaluations, "
        f"{100 * results['time_saving']:.0f}% wall time; "
        f"max |difference| {results['max_difference']:.1e} "
        f"(relative {results['max_relative_difference']:.1e}; "
        f"{results['max_relative_difference_at_tol_1e-7']:.1e} when both solve to tol 1e-7)"
    )
    print(f"wrote {write_result('compaction', results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
