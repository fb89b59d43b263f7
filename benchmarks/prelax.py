"""Prelax vs SimSiam vs SimSiam + rotation on scikit-learn digits: probes over seeds.

Runs the ``prelax`` recipe's sweep (every variant x every seed, the recipe's default options: the
same encoder, batch and number of steps) and scores an untrained encoder of every seed with the
same probes, then writes

* ``benchmarks/results/prelax.json``: ``{"seeds", "simsiam": {"probe_acc_mean",
  "probe_acc_std", ...}, "simsiam_rotation": {...}, "prelax": {"probe_acc_mean",
  "probe_acc_std", "rotation_acc", ...}}`` (held-out linear-probe accuracy, mean and sample std
  over seeds; Prelax's rotation accuracy from the residual, mean over seeds), with the other
  metrics of every method (``few_acc``: probe with ``few_labels`` random labels per class, mean
  over 10 labelled subsets; ``knn_acc``: cosine kNN; ``probe10_acc``: probe with the first 10
  labels per class; ``orientation_acc``: the four rotations told apart from the features;
  ``rotated_acc``: the digit probe on rotated images), ``prelax_equal_weights`` (Prelax with
  alpha = gamma = 1), ``random_init`` (the untrained encoders) and ``targets`` (the issue's
  three targets, checked on the numbers above);
* ``benchmarks/results/prelax_runs.json``: every run (its metrics and process CPU seconds), the
  options, the command and the machine.

Both record the ``command`` that wrote them. ``--from-runs prelax_runs.json`` trains nothing: it
rebuilds the summary (``prelax.json``, or ``prelax-val.json`` for a validation record) from the
runs of a record the script wrote, and keeps that record's command as ``runs_command``.

Prelax encodes three views per step where the baselines encode two, so the CPU seconds of every
run are recorded next to its accuracy. ``--eval-split val`` scores every probe on 287 training
images instead of the held-out split (for choosing options; it writes ``prelax-val.json`` and
``prelax_runs-val.json``).

Usage::

    python benchmarks/prelax.py [--seeds 0 1 2 3 4] [--steps N] [--run-dir DIR]
                                [--eval-split {test,val}]
    python benchmarks/prelax.py --from-runs benchmarks/results/prelax_runs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from equilibria.zoo.evaluation import seed_all
from equilibria.zoo.prelax import VARIANTS, PrelaxConfig, PrelaxTask
from equilibria.zoo.runs import write_json
from equilibria.zoo.sweep import SweepConfig, run_sweep

from common import RESULTS, write_result

KEYS = {
    "SimSiam": "simsiam",
    "SimSiam + rotation": "simsiam_rotation",
    "Prelax": "prelax",
    "Prelax, alpha = gamma = 1": "prelax_equal_weights",
}
METRICS = ("probe_acc", "few_acc", "knn_acc", "probe10_acc", "orientation_acc", "rotated_acc")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def stats(runs: list[dict[str, Any]], rotation: bool) -> dict[str, float]:
    """Mean and sample std over seeds of every metric of ``runs`` (one variant)."""
    out: dict[str, float] = {}
    for key in METRICS:
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std([r[key] for r in runs])
    if rotation:
        out["rotation_acc"], out["rotation_acc_std"] = mean_std([r["rotation_acc"] for r in runs])
    if all("cpu_s" in r for r in runs):
        out["cpu_s_mean"] = statistics.fmean(r["cpu_s"] for r in runs)
    return out


def above(a: dict[str, float], b: dict[str, float], key: str) -> dict[str, Any]:
    """Whether ``a`` is above ``b`` in ``key`` by more than the larger of their seed stds."""
    diff = a[f"{key}_mean"] - b[f"{key}_mean"]
    spread = max(a[f"{key}_std"], b[f"{key}_std"])
    return {"difference": diff, "spread": spread, "above_by_more_than_spread": diff > spread}


def random_init(seeds: list[int], overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """The probes of an untrained encoder (the trainer's seeding and initialisation)."""
    runs = []
    for seed in seeds:
        fields = {k: v for k, v in overrides.items() if k != "steps"}
        task = PrelaxTask(PrelaxConfig(**fields, seed=seed))
        seed_all(seed)
        model = task.build_model()
        task.setup(torch.device("cpu"))
        model.eval()
        with torch.no_grad():
            runs.append({"variant": "random init", "seed": seed, **task.evaluate(model)})
    return runs


def summarize(
    runs: list[dict[str, Any]], untrained: list[dict[str, Any]], seeds: int, eval_split: str
) -> dict[str, Any]:
    """The ``prelax.json`` summary of a sweep's ``runs`` and the untrained encoders' probes."""
    summary: dict[str, Any] = {"seeds": seeds}
    for variant, key in KEYS.items():
        summary[key] = stats([r for r in runs if r["variant"] == variant], key.startswith("prelax"))
    summary["random_init"] = stats(untrained, False)
    summary["eval_split"] = eval_split
    summary["few_labels"] = PrelaxConfig().few_labels
    simsiam, rotation, prelax = (summary[k] for k in ("simsiam", "simsiam_rotation", "prelax"))
    summary["targets"] = {
        "prelax_above_simsiam": {k: above(prelax, simsiam, k) for k in METRICS[:3]},
        "simsiam_rotation_below_simsiam": {k: above(simsiam, rotation, k) for k in METRICS[:3]},
        "rotation_from_residual_at_least_90": prelax["rotation_acc"] >= 0.9,
    }
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print("| metric (%) | " + " | ".join([*KEYS, "random init"]) + " |")
    print("|---" * (len(KEYS) + 2) + "|")
    for metric in METRICS:
        cells = [
            f"{100 * summary[k][metric + '_mean']:.2f} ± {100 * summary[k][metric + '_std']:.2f}"
            for k in [*KEYS.values(), "random_init"]
        ]
        print(f"| {metric} | " + " | ".join(cells) + " |")
    for name, checks in summary["targets"].items():
        print(name, checks)


def from_runs(path: Path, out: Path, command: str) -> int:
    """Rebuild the summary from the record ``path`` (a ``prelax_runs*.json``), training nothing.

    Raises:
        ValueError: ``path`` is not such a record (no ``runs``, ``random_init``, ``overrides``
            or ``command``), or it lacks a variant or the untrained encoders.
    """
    record = json.loads(path.read_text())
    missing = [k for k in ("command", "overrides", "runs", "random_init") if k not in record]
    if missing:
        raise ValueError(
            f"--from-runs {path}: not a record of benchmarks/prelax.py (no {missing}); "
            "expected a prelax_runs*.json written by this script"
        )
    runs, untrained = record["runs"], record["random_init"]
    absent = [v for v in KEYS if not any(r["variant"] == v for r in runs)]
    if absent or not untrained:
        raise ValueError(
            f"--from-runs {path}: the record lacks the runs of {absent or ['random init']}; "
            f"every variant of {list(KEYS)} and the untrained encoders are needed"
        )
    split = record["overrides"].get("eval_split", "test")
    seeds = len({r["seed"] for r in runs})
    summary = {"command": command, "runs_command": record["command"],
               **summarize(runs, untrained, seeds, split)}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if split == "test" else "-" + split
    print(write_json(out / f"prelax{suffix}.json", summary))
    print_summary(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of the sweep (default: 0 1 2 3 4)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument("--run-dir", default="", help="sweep folder (default: a temporary one)")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the result files")
    parser.add_argument("--eval-split", choices=("test", "val"), default=None,
                        help="split the probes are scored on (default: test)")  # fmt: skip
    parser.add_argument(
        "--from-runs",
        type=Path,
        default=None,
        metavar="RUNS_JSON",
        help="rebuild the summary from this prelax_runs*.json (no training)",
    )
    args = parser.parse_args(argv)
    command = "python benchmarks/prelax.py " + " ".join(sys.argv[1:] if argv is None else argv)
    command = command.strip()
    if args.from_runs is not None:
        sweep_options = {
            "--seeds": args.seeds,
            "--steps": args.steps,
            "--run-dir": args.run_dir or None,
            "--eval-split": args.eval_split,
        }
        given = [name for name, value in sweep_options.items() if value is not None]
        if given:
            parser.error(f"--from-runs takes the sweep from its record; drop {given}")
        return from_runs(args.from_runs, Path(args.out), command)
    args.seeds = [0, 1, 2, 3, 4] if args.seeds is None else args.seeds
    args.eval_split = args.eval_split or "test"
    torch.set_num_threads(1)
    overrides: dict[str, Any] = {"threads": 1, "eval_split": args.eval_split}
    if args.steps is not None:
        overrides["steps"] = args.steps
    clock = {"last": time.process_time()}

    def after_run(variant: str, seed: int, config: object, summary: dict) -> dict:
        now = time.process_time()
        cpu, clock["last"] = now - clock["last"], now
        print(f"{variant:>26} seed {seed}: probe {100 * summary['probe_acc']:.2f}%, "
              f"{config.few_labels} labels/class {100 * summary['few_acc']:.2f}%, "  # type: ignore[attr-defined]
              f"kNN {100 * summary['knn_acc']:.2f}%, rotation from residual "
              f"{100 * summary['rotation_acc']:.2f}%, {cpu:.1f} CPU s", flush=True)  # fmt: skip
        return {"cpu_s": cpu}

    with tempfile.TemporaryDirectory() as tmp:
        root = args.run_dir or str(Path(tmp) / "sweep")
        sweep = SweepConfig(seeds=tuple(args.seeds), run_dir=root)
        result = run_sweep(PrelaxTask, sweep, overrides, after_run=after_run)
    runs = result.runs
    untrained = random_init(args.seeds, overrides)

    summary = {"command": command, **summarize(runs, untrained, len(args.seeds), args.eval_split)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.eval_split == "test" else "-" + args.eval_split
    write_json(out / f"prelax{suffix}.json", summary)
    record = {"command": command, "overrides": overrides, "variants": VARIANTS,
              "runs": runs, "random_init": untrained, "rows": result.rows}  # fmt: skip
    write_result(f"prelax_runs{suffix}", record, out)

    print()
    print(result.markdown)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
