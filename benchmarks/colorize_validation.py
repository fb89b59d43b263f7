"""Design choices of the colorize recipe tried on its validation split, with a saved record.

Trains named variants of :mod:`equilibria.zoo.colorize` (each a set of
:class:`~equilibria.zoo.colorize.ColorizeConfig` options applied to both fusions alike) on the
validation split (``validation=True``: the photograph ``rocket`` is held out of training and
its crops are scored; the held-out test photographs are never loaded) and records, for every
(variant, fusion, seed), the validation PSNR / SSIM, the cross map's entropy, the gradient
conflict at the fusion block (mean over training steps) and the run's CPU seconds. Training
and the reuse of finished run folders are :func:`benchmarks.colorize.run_one`'s (a folder
trained with other options is refused).

Writes ``results/colorize_validation.json``: one row per run with its options and the exact
command that produced it, and per variant the means over seeds and whether SGA is at least
standard attention in PSNR and SSIM on every seed. Rows of earlier invocations (other variants
or seeds) are kept, so the record grows run by run.

Usage::

    python benchmarks/colorize_validation.py --variants baseline post-blocks --seeds 0 1
    python benchmarks/colorize_validation.py --quick --out /tmp/cv     # a smoke run (needs --out)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.colorize import run_one  # noqa: E402
from benchmarks.common import RESULTS  # noqa: E402
from equilibria.zoo.colorize_data import VALIDATION_IMAGES  # noqa: E402
from equilibria.zoo.config import ConfigError  # noqa: E402
from equilibria.zoo.runs import read_json, write_json  # noqa: E402

# design changes that SGA's released code (kunkun0w0/SGA, SGA_code/model.py) has and the recipe
# lacks by default; each applies to both fusions
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "post-blocks": {"post_blocks": 4},  # the code's ResBlockNet, concatenated with the fusion's
    "multi-level": {"multi_level": True},  # the code's pooled, concatenated encoder stages
    "steps-2400": {"steps": 2400},  # twice the training
}
FILE = "colorize_validation.json"
KEYS = ("psnr", "ssim", "map_entropy", "conflict_x", "probe_conflict_x", "conflict_y", "cpu_s")


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: the seeds run for both fusions, each fusion's means over them, and whether
    SGA >= standard in PSNR and in SSIM on every one of those seeds."""
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        by = {(r["attention"], r["seed"]): r for r in rows if r["variant"] == variant}
        seeds = sorted({s for a, s in by if a == "standard"} & {s for a, s in by if a == "sga"})
        if not seeds:
            continue
        entry: dict[str, Any] = {"seeds": seeds}
        for attention in ("standard", "sga"):
            entry[attention] = {
                f"{k}_mean": statistics.fmean(by[attention, s][k] for s in seeds) for k in KEYS
            }
        for k in ("psnr", "ssim"):
            entry[f"sga_ge_standard_{k}"] = all(
                by["sga", s][k] >= by["standard", s][k] for s in seeds
            )
        out[variant] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["baseline"], choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--blocks", nargs="+", default=["standard", "sga"],
                        choices=["standard", "sga", "learned_map"])  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a few steps, small test set")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "colorize-validation",
                        help="run folders, one sub-folder per variant (a finished run is reused "
                             "if trained with the same options)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results")
    args = parser.parse_args()
    if args.quick and args.out.resolve() == RESULTS.resolve():  # 20-step rows would replace
        parser.error("--quick writes a smoke record: give it --out DIR (not the committed results)")
    torch.set_num_threads(1)
    command = " ".join(["python benchmarks/colorize_validation.py", *sys.argv[1:]])
    base: dict[str, Any] = {"validation": True, "threads": 1}
    if args.quick:
        base.update(eval_every=10, test_samples=32)
        args.work_dir = args.out / "runs"
    path = args.out / FILE
    record = read_json(path) if path.is_file() else {"rows": []}
    rows: list[dict[str, Any]] = record["rows"]
    for variant in args.variants:
        options = {**base, **VARIANTS[variant], **({"steps": 20} if args.quick else {})}
        for attention in args.blocks:
            for seed in args.seeds:
                try:
                    r = run_one(attention, seed, args.work_dir / variant, options)
                except ConfigError as e:
                    parser.exit(2, f"{parser.prog}: error: {e}\n")
                row = {"variant": variant, "attention": attention, "seed": seed,
                       "options": VARIANTS[variant], "command": command,
                       **{k: r[k] for k in (*KEYS, "reference_psnr", "params")}}  # fmt: skip
                rows[:] = [x for x in rows if (x["variant"], x["attention"], x["seed"])
                           != (variant, attention, seed)] + [row]  # fmt: skip
                args.out.mkdir(parents=True, exist_ok=True)
                write_json(path, {
                    "split": {"validation": True, "scored_images": list(VALIDATION_IMAGES)},
                    "variants": VARIANTS,
                    "rows": rows,
                    "summary": summarise(rows),
                })  # fmt: skip
    print(json.dumps(summarise(rows), indent=1))


if __name__ == "__main__":
    main()
