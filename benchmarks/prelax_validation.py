"""Choosing the prelax recipe's options on the validation split (never on the held-out test split).

Trains SimSiam, SimSiam + rotation and Prelax at several weightings (alpha, gamma) for the same
number of steps and scores every probe with ``eval_split="val"``: the probes are trained on 1150
training images and scored on the other 287 (carved once, stratified, from the training split;
the self-supervised training sees the same unlabelled training images as for the test numbers).
Every run's metrics and process CPU seconds go into ``benchmarks/results/prelax_validation.json``
under the key ``steps=<N>`` (one block per training budget, with the command that wrote it; a
rerun with the same budget replaces its block, other budgets are kept).

The criterion, fixed before the runs: among the Prelax weightings whose rotation accuracy from
the residual reaches 90% on the validation split, the highest mean probe accuracy with 2 labels
per class (the metric that separates the representations; the full probe on 287 images moves in
steps of 0.35 points and the untrained encoder already scores about 96%), the full probe breaking
ties. Each block lists the Prelax weightings in that order (``ranking``).

Usage::

    python benchmarks/prelax_validation.py --steps 1000 --seeds 0 1 \\
        --settings 0.3,0.1 1,1 [--no-baselines] [--run-dir DIR [--resume]]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from equilibria.zoo.prelax import PrelaxTask
from equilibria.zoo.runs import RunFolder, read_json
from equilibria.zoo.sweep import SweepConfig, run_sweep, slug

from common import RESULTS, write_result

METRICS = ("probe_acc", "few_acc", "knn_acc", "probe10_acc", "orientation_acc", "rotated_acc",
           "rotation_acc")  # fmt: skip
BASELINES = {"SimSiam": {"method": "simsiam"}, "SimSiam + rotation": {"method": "simsiam_rotation"}}


def setting(text: str) -> tuple[float, float]:
    """``"A,G"`` -> (alpha, gamma)."""
    try:
        alpha, gamma = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a setting is 'alpha,gamma', got {text!r}") from None
    return alpha, gamma


def prelax_name(alpha: float, gamma: float) -> str:
    return f"Prelax, alpha = {alpha:g}, gamma = {gamma:g}"


def rows(runs: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Mean and sample std over seeds of every metric, per variant (percent)."""
    out = {}
    for name in names:
        mine = [r for r in runs if r["variant"] == name]
        row: dict[str, Any] = {"seeds": [r["seed"] for r in mine]}
        for key in METRICS:
            values = [100 * r[key] for r in mine]
            row[f"{key}_mean"] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        cpu = [r["cpu_s"] for r in mine if r.get("cpu_s") is not None]
        row["cpu_s_mean"] = statistics.fmean(cpu) if cpu else None
        out[name] = row
    return out


def ranking(table: dict[str, dict[str, Any]]) -> list[str]:
    """The Prelax rows by the criterion of the module docstring (rotation >= 90% first)."""
    prelax = [n for n in table if n.startswith("Prelax")]
    return sorted(
        prelax,
        key=lambda n: (
            table[n]["rotation_acc_mean"] >= 90.0,
            table[n]["few_acc_mean"],
            table[n]["probe_acc_mean"],
        ),
        reverse=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, required=True, help="training steps of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--settings", type=setting, nargs="*", default=[],
                        help="Prelax weightings 'alpha,gamma'")  # fmt: skip
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                        help="also train SimSiam and SimSiam + rotation")  # fmt: skip
    parser.add_argument("--eval-every", type=int, default=None,
                        help="steps per epoch (default: half the steps)")  # fmt: skip
    parser.add_argument("--run-dir", default="", help="sweep folder (default: a temporary one)")
    parser.add_argument("--resume", action="store_true", help="read finished runs back")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the result file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    variants: dict[str, dict[str, Any]] = dict(BASELINES) if args.baselines else {}
    for alpha, gamma in args.settings:
        variants[prelax_name(alpha, gamma)] = {"method": "prelax", "alpha": alpha, "gamma": gamma}
    if not variants:
        parser.error("nothing to train: give --settings or --baselines")
    eval_every = args.eval_every or max(1, args.steps // 2)
    overrides = {"threads": 1, "eval_split": "val", "steps": args.steps, "eval_every": eval_every}
    clock: dict[str, Any] = {}

    def progress(variant: str, seed: int) -> None:
        folder = RunFolder(Path(root) / "runs" / f"{slug(variant)}-seed{seed}")
        clock["read_back"] = folder.finished() is not None
        clock["start"] = time.process_time()

    def after_run(variant: str, seed: int, config: object, summary: dict) -> dict:
        cpu = None if clock["read_back"] else time.process_time() - clock["start"]
        print(f"{variant:>34} seed {seed}: probe {100 * summary['probe_acc']:.2f}%, "
              f"2 labels/class {100 * summary['few_acc']:.2f}%, "
              f"kNN {100 * summary['knn_acc']:.2f}%, "
              f"rotation from residual {100 * summary['rotation_acc']:.2f}%, "
              f"{'read back' if cpu is None else f'{cpu:.1f} CPU s'}", flush=True)  # fmt: skip
        return {"cpu_s": cpu}

    with tempfile.TemporaryDirectory() as tmp:
        root = args.run_dir or str(Path(tmp) / "sweep")
        sweep = SweepConfig(seeds=tuple(args.seeds), run_dir=root, resume=args.resume)
        result = run_sweep(PrelaxTask, sweep, overrides, variants=variants, after_run=after_run,
                           progress=progress)  # fmt: skip
    table = rows(result.runs, list(variants))
    command = "python benchmarks/prelax_validation.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    block = {"command": command.strip(), "overrides": overrides, "seeds": args.seeds,
             "variants": variants, "rows": table, "ranking": ranking(table),
             "runs": result.runs}  # fmt: skip
    out = Path(args.out)
    path = out / "prelax_validation.json"
    previous = read_json(path) if path.is_file() else {}
    blocks = dict(previous.get("budgets", {}))
    blocks[f"steps={args.steps}"] = block
    criterion = " ".join(__doc__.split("The criterion, ")[1].split("\n\n")[0].split())
    payload = {"eval_split": "val", "criterion": criterion,
               "budgets": dict(sorted(blocks.items(), key=lambda kv: int(kv[0][6:])))}  # fmt: skip
    write_result("prelax_validation", payload, out)

    print()
    print("| variant | linear probe | 2 labels / class | kNN | rotation from the residual |")
    print("|---|---|---|---|---|")
    for name, row in table.items():
        cells = [f"{row[k + '_mean']:.2f} ± {row[k + '_std']:.2f}"
                 for k in ("probe_acc", "few_acc", "knn_acc", "rotation_acc")]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("ranking:", block["ranking"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
