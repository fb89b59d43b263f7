"""Prelax vs SimSiam vs SimSiam + rotation on scikit-learn digits: linear probe over seeds.

Runs the ``prelax`` recipe's sweep (every method x every seed, the recipe's default options: the
same encoder, batch and number of steps) and writes

* ``benchmarks/results/prelax.json``: ``{"seeds", "simsiam": {"probe_acc_mean",
  "probe_acc_std"}, "simsiam_rotation": {...}, "prelax": {"probe_acc_mean", "probe_acc_std",
  "rotation_acc"}}`` (held-out linear-probe accuracy, mean and sample std over seeds; Prelax's
  rotation accuracy from the residual, mean over seeds);
* ``benchmarks/results/prelax_runs.json``: every run (probe accuracy with all labels and with 10
  per class, rotation accuracy, process CPU seconds of the run), the options and the machine.

The budget is equal in steps; Prelax encodes three views per step where the baselines encode two,
so the CPU seconds of every run are recorded next to its accuracy.

Usage::

    python benchmarks/prelax.py [--seeds 0 1 2 3 4] [--steps N] [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from equilibria.zoo.prelax import VARIANTS, PrelaxTask
from equilibria.zoo.runs import write_json
from equilibria.zoo.sweep import SweepConfig, run_sweep

from common import RESULTS, write_result

KEYS = {"SimSiam": "simsiam", "SimSiam + rotation": "simsiam_rotation", "Prelax": "prelax"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument("--run-dir", default="", help="sweep folder (default: a temporary one)")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the result files")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    overrides = {"threads": 1} if args.steps is None else {"threads": 1, "steps": args.steps}
    clock = {"last": time.process_time()}

    def after_run(variant: str, seed: int, config: object, summary: dict) -> dict:
        now = time.process_time()
        cpu, clock["last"] = now - clock["last"], now
        probe, rotation = 100 * summary["probe_acc"], 100 * summary["rotation_acc"]
        print(f"{variant:>20} seed {seed}: probe {probe:.2f}%, rotation from residual "
              f"{rotation:.2f}%, {cpu:.1f} CPU s", flush=True)  # fmt: skip
        return {"cpu_s": cpu}

    with tempfile.TemporaryDirectory() as tmp:
        root = args.run_dir or str(Path(tmp) / "sweep")
        sweep = SweepConfig(seeds=tuple(args.seeds), run_dir=root)
        result = run_sweep(PrelaxTask, sweep, overrides, after_run=after_run)
    runs = result.runs

    def of(variant: str, key: str) -> list[float]:
        return [r[key] for r in runs if r["variant"] == variant]

    def mean_std(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    summary: dict[str, object] = {"seeds": len(args.seeds)}
    for variant, key in KEYS.items():
        mean, std = mean_std(of(variant, "probe_acc"))
        summary[key] = {"probe_acc_mean": mean, "probe_acc_std": std}
    summary["prelax"]["rotation_acc"] = statistics.fmean(of("Prelax", "rotation_acc"))  # type: ignore[index]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "prelax.json", summary)
    command = "python benchmarks/prelax.py " + " ".join(sys.argv[1:] if argv is None else argv)
    record = {"command": command.strip(), "overrides": overrides, "variants": VARIANTS,
              "runs": runs, "rows": result.rows}  # fmt: skip
    write_result("prelax_runs", record, out)

    print()
    print(result.markdown)
    simsiam = summary["simsiam"]["probe_acc_mean"]  # type: ignore[index]
    for variant, key in KEYS.items():
        mean = summary[key]["probe_acc_mean"]  # type: ignore[index]
        std = summary[key]["probe_acc_std"]  # type: ignore[index]
        cpu = statistics.fmean(of(variant, "cpu_s"))
        few, few_std = mean_std(of(variant, "probe10_acc"))
        print(f"{variant:>20}: {100 * mean:.2f} ± {100 * std:.2f}%  ({100 * (mean - simsiam):+.2f} "
              f"points vs SimSiam; 10 labels per class {100 * few:.2f} ± {100 * few_std:.2f}%; "
              f"{cpu:.1f} CPU s per run)")  # fmt: skip
    rotation = summary["prelax"]["rotation_acc"]  # type: ignore[index]
    print(f"Prelax rotation accuracy from the residual: {100 * rotation:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
