"""Broyden iterations on the solver benchmark's conv block across conv2 scales, against TorchDEQ.

The block of ``benchmarks/solvers.py`` is tuned to spectral radius 0.9; a solver whose iteration
count on it happens to be good could be worse next to it. This sweeps the conv2 scale from 0.9x to
1.1x of the tuned one and counts map calls to rel tol 1e-4 for equilibria's Broyden (default
memory 20, so the solves of about 30 iterations restart once) and TorchDEQ 0.1.0's Broyden (which
keeps every pair). Iteration counts only: deterministic, no timing.

Run: ``python benchmarks/broyden_scales.py`` (about 30 s); writes
``benchmarks/results/broyden_scales.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import equilibria as eq

from common import RESULTS, Counted, write_result
from solvers import MAX_ITER, TOL, ConvProblem, td_solvers, tune_radius

FACTORS = (0.9, 0.95, 0.98, 1.0, 1.02, 1.05, 1.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the result file")
    args = parser.parse_args(argv)
    problem = ConvProblem()
    rho = tune_radius(problem)
    tuned = problem.block.scale
    theirs = td_solvers()["broyden"]
    rows = []
    with torch.no_grad():
        for factor in FACTORS:
            problem.block.scale = tuned * factor
            z0 = problem.z0()
            ours, td = Counted(problem), Counted(problem)
            sol = eq.solve(ours, z0, solver="broyden", tol=TOL, max_iter=MAX_ITER)
            info = theirs(td, z0, max_iter=MAX_ITER, tol=TOL, stop_mode="rel")[2]
            converged = bool(sol.converged.all()) and bool((info["rel_lowest"] < TOL).all())
            rows.append(
                {
                    "scale_factor": factor,
                    "equilibria": ours.calls,
                    "torchdeq": td.calls,
                    "converged": converged,
                }
            )
            print(f"conv2 scale x{factor:<5} equilibria {ours.calls:3d}  torchdeq {td.calls:3d}")
    extra = [r["equilibria"] - r["torchdeq"] for r in rows]
    print(f"extra iterations of equilibria's Broyden: {min(extra):+d} to {max(extra):+d}")
    result = {"spectral_radius_at_tuned_scale": rho, "tol": TOL, "rows": rows}
    print(f"wrote {write_result('broyden_scales', result, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
