"""What scale invariance over the dtype's range costs: per-iteration time of each solver on the
tanh benchmark map (batch 64, width 256, float32) at scale 1e3, inside the band where the driver
changes nothing, against scale 1e30, where it iterates in per-sample power-of-two units (two
extra elementwise passes per map call), all round-robin in one run.

With ``--baseline-tree DIR`` (a folder holding an older ``equilibria`` package, e.g. from
``git archive <rev> equilibria | tar -x -C DIR``) it also times the common path, scale 1, with
that package and with this checkout's (or ``--tree``'s), in alternating subprocesses: the
before/after ratio of a change to the driver or the solvers.

Run: ``python benchmarks/scales.py [--baseline-tree DIR]``; writes
``benchmarks/results/scales.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SOLVER_NAMES = ("picard", "anderson", "broyden")
ITERS = 40
HERE = Path(__file__).resolve().parent


def per_iteration_us(scales: tuple[float, ...], rounds: int) -> dict[str, dict[str, float]]:
    """Median wall time per iteration (us) of each solver at each scale, round-robin."""
    import equilibria as eq

    from solvers import build

    problem = build("tanh", torch.device("cpu"))
    z0 = problem.z0()
    times: dict[str, list[float]] = {f"{n}@{s:g}": [] for n in SOLVER_NAMES for s in scales}
    with torch.no_grad():
        for _ in range(rounds):
            for s in scales:
                problem.scale = s
                for name in SOLVER_NAMES:
                    t0 = time.perf_counter()
                    sol = eq.solve(problem, s * z0, solver=name, tol=0.0, max_iter=ITERS)
                    times[f"{name}@{s:g}"].append((time.perf_counter() - t0) / ITERS)
                    assert sol.nstep == ITERS
    out: dict[str, dict[str, float]] = {}
    for key, values in times.items():
        name, scale = key.split("@")
        out.setdefault(name, {})[scale] = 1e6 * statistics.median(values)
    return out


def worker(tree: str, rounds: int) -> None:
    """One subprocess: time scale 1 with the package under ``tree``; print JSON."""
    sys.path.insert(0, tree)
    sys.path.insert(1, str(HERE))
    import equilibria

    assert Path(equilibria.__file__).resolve().is_relative_to(Path(tree).resolve())
    torch.set_num_threads(1)
    print(json.dumps({n: t["1"] for n, t in per_iteration_us((1.0,), rounds).items()}))


def before_after(
    baseline: str, this: str, rounds: int, repeats: int = 5
) -> dict[str, dict[str, float]]:
    """Medians over ``repeats`` alternating subprocess runs of the baseline and this tree."""
    trees = {"baseline": baseline, "this": this}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    for _ in range(repeats):
        for key, tree in trees.items():
            args = [sys.executable, __file__, "--worker", tree, "--rounds", str(rounds)]
            out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
            runs[key].append(json.loads(out.strip().splitlines()[-1]))
    return {
        name: {key: statistics.median(r[name] for r in runs[key]) for key in trees}
        for name in SOLVER_NAMES
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-tree", help="folder holding an older equilibria package")
    parser.add_argument(
        "--tree", default=str(HERE.parent), help="the package compared with the baseline"
    )
    parser.add_argument("--rounds", type=int, default=30, help="solves per solver and scale")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.rounds)
        return 0
    sys.path.insert(0, str(HERE))
    torch.set_num_threads(1)
    result: dict = {
        "iterations": ITERS,
        "per_iteration_us": per_iteration_us((1e3, 1e30), args.rounds),
    }
    for name, t in result["per_iteration_us"].items():
        print(f"{name:9s} scale 1e3 {t['1000']:7.1f} us, 1e30 (units) {t['1e+30']:7.1f} us: "
              f"x{t['1e+30'] / t['1000']:.2f}")  # fmt: skip
    if args.baseline_tree:
        ba = before_after(args.baseline_tree, args.tree, args.rounds)
        result["before_after_scale_1_us"] = ba
        result["trees"] = {"baseline": args.baseline_tree, "this": args.tree}
        for name, t in ba.items():
            print(f"{name:9s} scale 1: baseline {t['baseline']:7.1f} us, this tree "
                  f"{t['this']:7.1f} us: x{t['this'] / t['baseline']:.3f}")  # fmt: skip
    from common import write_result

    print(f"wrote {write_result('scales', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
