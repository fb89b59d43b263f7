"""SCFT attention vs stop-gradient attention (SGA) on the colorize recipe: quality and conflict.

Trains the ``colorize`` recipe (:mod:`equilibria.zoo.colorize`) on the engine with each fusion
(SCFT's one block; SGA's cross and self blocks; the same two blocks with learned maps) and
several seeds, at nearly equal size (the fusions differ by under 2 % of the parameters; SGA has
1,184 more than SCFT) and equal budget (the same optimisation steps on the same seeded stream of
crops; the CPU seconds of each run are recorded), and evaluates PSNR, SSIM and how uniform the
cross-attention map is on crops of the held-out photographs. The gradient conflict is the mean
over training steps of the per-step token-mean cosine between the gradient reaching the fusion's
input X through the attention map and through the skip path (see
:mod:`equilibria.zoo.colorize_model`).

Writes ``results/colorization.json`` (the issue's keys: seeds; PSNR mean/std and SSIM mean per
block; the conflict per block), ``results/colorization-details.json`` (per-seed numbers, SSIM
std, the map entropy, the probe of SGA's unstopped map gradient, the Y-side conflict, the third
fusion ``learned_map`` when run, CPU seconds, configuration) and ``results/colorization.png``
(line art / reference / standard / SGA / ground truth on held-out crops, and the conflict during
training).

Usage::

    python benchmarks/colorize.py                 # 3 seeds x 3 blocks, about 12 CPU minutes
    python benchmarks/colorize.py --quick --out /tmp/colorize   # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, write_result  # noqa: E402
from equilibria.zoo import evaluation, trainer  # noqa: E402
from equilibria.zoo.colorize import ColorizeConfig, ColorizeTask  # noqa: E402
from equilibria.zoo.colorize_data import TEST_IMAGES, TRAIN_IMAGES  # noqa: E402
from equilibria.zoo.colorize_model import psnr, ssim  # noqa: E402
from equilibria.zoo.config import ConfigError, differences, to_dict  # noqa: E402
from equilibria.zoo.runs import CONFIG, RunFolderError, read_json, write_json  # noqa: E402

BLOCKS = ("standard", "sga", "learned_map")
CONFLICT = ("conflict_x", "probe_conflict_x", "conflict_y", "probe_conflict_y")


def check_reusable(run_dir: Path, config: ColorizeConfig) -> None:
    """Raise unless the finished run in ``run_dir`` was trained with ``config``'s options.

    The options are compared as ``--resume`` compares them (:func:`equilibria.zoo.config.
    differences`): run control (``threads``, ``run_dir``, ``quiet``, ...) may differ, every
    other option must equal the saved ``config.json``'s.

    Raises:
        ConfigError: naming the folder and each differing option (saved and requested value),
            or saying that the folder holds no readable ``config.json`` of a colorize run.
    """
    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} holds a finished run (cpu.json) but no {CONFIG}, so its options cannot "
            "be checked; remove the folder or choose another --work-dir"
        )
    try:
        saved = read_json(path)
    except RunFolderError as e:
        raise ConfigError(f"{e}; remove {run_dir} or choose another --work-dir") from None
    if saved.get("recipe") != "colorize" or not isinstance(saved.get("config"), dict):
        raise ConfigError(
            f"{path} is not the config of a colorize run (recipe {saved.get('recipe')!r}); "
            f"remove {run_dir} or choose another --work-dir"
        )
    # options added after the committed runs were trained: absent from their config.json, they
    # take the design those runs were trained with (the task's record_defaults)
    diff = differences(saved["config"], to_dict(config), ColorizeConfig,
                       ColorizeTask.record_defaults)  # fmt: skip
    if diff:
        lines = "\n".join(f"  {k}: saved {a!r}, requested {b!r}" for k, a, b in diff)
        raise ConfigError(
            f"{run_dir} holds a finished run trained with other options than requested:\n"
            f"{lines}\nits results are not reused; remove the folder or choose another "
            "--work-dir"
        )


def run_one(attention: str, seed: int, root: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train one model (or reuse a finished run folder trained with the same options, see
    :func:`check_reusable`) and return its numbers."""
    run_dir = root / f"{attention}-seed{seed}"
    config = ColorizeConfig(attention=attention, seed=seed, run_dir=str(run_dir), quiet=True,
                            report=False, measure_memory=False, **overrides)  # fmt: skip
    if (run_dir / "cpu.json").exists():  # written after the run finished
        check_reusable(run_dir, config)
        summary = json.loads((run_dir / "summary.json").read_text())
        cpu_s = json.loads((run_dir / "cpu.json").read_text())["cpu_s"]
    else:
        tic = time.process_time()
        summary = trainer.train(ColorizeTask(config))
        cpu_s = time.process_time() - tic
        write_json(run_dir / "cpu.json", {"cpu_s": cpu_s})
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # equal steps per epoch (the last may be shorter): weight the epoch means by their steps
    steps = [r["step"] - (rows[i - 1]["step"] if i else 0) for i, r in enumerate(rows)]
    conflict = {key: sum(n * r[key] for n, r in zip(steps, rows)) / sum(steps) for key in CONFLICT}
    print(f"{attention:12s} seed {seed}: PSNR {summary['psnr']:.2f} dB, SSIM "
          f"{summary['ssim']:.4f}, map entropy {summary['map_entropy']:.3f}, cos(map, skip) "
          f"{conflict['conflict_x']:+.3f} (probe {conflict['probe_conflict_x']:+.3f}), "
          f"{cpu_s:.0f} CPU s", flush=True)  # fmt: skip
    return {
        "seed": seed,
        "psnr": summary["psnr"],
        "ssim": summary["ssim"],
        "test_l1": summary["test_l1"],
        "map_entropy": summary["map_entropy"],
        "reference_psnr": summary["reference_psnr"],
        "params": summary["params"],
        "cpu_s": cpu_s,
        **conflict,
        "conflict_x_by_epoch": [r["conflict_x"] for r in rows],
        "probe_conflict_x_by_epoch": [r["probe_conflict_x"] for r in rows],
        "steps_by_epoch": [r["step"] for r in rows],
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def figure(root: Path, runs: dict[str, list[dict[str, Any]]], path: Path, count: int = 6) -> None:
    """Held-out crops (line art / reference / standard / SGA / ground truth) from the seed-0
    models, and the conflict during training of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = {}
    task = None
    for attention in ("standard", "sga"):
        model, task = evaluation.load_model(ColorizeTask, root / f"{attention}-seed0")
        models[attention] = model.eval()
    assert task is not None
    task.setup(torch.device("cpu"))
    test = task.test
    pick = torch.linspace(0, len(test.target) - 1, count).long()
    with torch.no_grad():
        outs = {a: m(test.line[pick], test.reference[pick]) for a, m in models.items()}
    columns = [("line art", test.line[pick].expand(-1, 3, -1, -1)),
               ("reference", test.reference[pick]), ("standard (SCFT)", outs["standard"]),
               ("SGA", outs["sga"]), ("ground truth", test.target[pick])]  # fmt: skip
    fig = plt.figure(figsize=(2.0 * len(columns) + 4.5, 2.0 * count))
    grid = fig.add_gridspec(count, len(columns) + 2)
    for j, (title, images) in enumerate(columns):
        for i in range(count):
            ax = fig.add_subplot(grid[i, j])
            ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
    ax = fig.add_subplot(grid[:, len(columns) :])
    colours = {"standard": "C0", "sga": "C1", "learned_map": "C2"}
    for attention, seeds in runs.items():
        for k, r in enumerate(seeds):
            label = None if k else f"{attention}: map vs skip"
            ax.plot(r["steps_by_epoch"], r["conflict_x_by_epoch"], color=colours[attention],
                    label=label)  # fmt: skip
            if attention == "sga":
                label = None if k else "sga: unstopped map (probe) vs skip"
                ax.plot(r["steps_by_epoch"], r["probe_conflict_x_by_epoch"], "--",
                        color=colours[attention], label=label)  # fmt: skip
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("cos(∂L/∂X via map, ∂L/∂X via skip), epoch mean")
    ax.set_title("gradient conflict at the fusion block", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--blocks", nargs="+", default=list(BLOCKS), choices=BLOCKS)
    parser.add_argument("--steps", type=int, default=ColorizeConfig.steps)
    parser.add_argument("--lr", type=float, default=ColorizeConfig.lr)
    parser.add_argument("--quick", action="store_true", help="a few steps, small test set")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "colorize-bench",
                        help="run folders (a finished run is reused if trained with the same "
                             "options; one trained with others is refused)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results")
    args = parser.parse_args()
    if not {"standard", "sga"} <= set(args.blocks):
        parser.error("--blocks must include standard and sga")
    torch.set_num_threads(1)
    overrides: dict[str, Any] = {"steps": args.steps, "lr": args.lr, "threads": 1}
    if args.quick:
        overrides.update(steps=20, eval_every=10, test_samples=32)
        args.work_dir = args.out / "runs"
    try:
        runs = {a: [run_one(a, s, args.work_dir, overrides) for s in args.seeds]
                for a in args.blocks}  # fmt: skip
    except ConfigError as e:  # a run folder of --work-dir trained with other options
        parser.exit(2, f"{parser.prog}: error: {e}\n")

    def block(attention: str) -> dict[str, float]:
        psnr_mean, psnr_std = _mean_std([r["psnr"] for r in runs[attention]])
        return {"psnr_mean": psnr_mean, "psnr_std": psnr_std,
                "ssim_mean": statistics.fmean(r["ssim"] for r in runs[attention])}  # fmt: skip

    result = {
        "seeds": len(args.seeds),
        "standard": block("standard"),
        "sga": block("sga"),
        "gradient_conflict": {
            a: statistics.fmean(r["conflict_x"] for r in runs[a]) for a in ("standard", "sga")
        },
    }
    summary: dict[str, Any] = {}
    for attention, seeds in runs.items():
        entry: dict[str, Any] = {}
        for key in ("psnr", "ssim", "test_l1", "map_entropy", *CONFLICT, "cpu_s"):
            entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std([r[key] for r in seeds])
        entry["params"] = seeds[0]["params"]
        summary[attention] = entry
    ratio = {
        "psnr_gain_db": summary["sga"]["psnr_mean"] - summary["standard"]["psnr_mean"],
        "ssim_ratio": summary["sga"]["ssim_mean"] / summary["standard"]["ssim_mean"],
    }
    # the trivial baseline: the reference itself as the colorization
    task = ColorizeTask(ColorizeConfig(**overrides))
    task.setup(torch.device("cpu"))
    copy = {
        "psnr": float(psnr(task.test.reference, task.test.target).mean()),
        "ssim": float(ssim(task.test.reference, task.test.target).mean()),
    }
    details = {
        "command": " ".join(["python benchmarks/colorize.py", *sys.argv[1:]]),
        "config": {
            k: v
            for k, v in dataclasses.asdict(task.config).items()
            if k
            not in ("attention", "seed", "run_dir", "quiet", "report", "measure_memory", "resume")
        },
        "train_images": TRAIN_IMAGES,
        "test_images": TEST_IMAGES,
        "copy_reference": copy,
        "summary": summary,
        "sga_vs_standard": ratio,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "colorization.json", result)
    write_result("colorization-details", details, args.out)
    figure(args.work_dir, runs, args.out / "colorization.png")
    print(json.dumps(result, indent=1))
    print(f"SGA - standard: {ratio['psnr_gain_db']:+.2f} dB PSNR, SSIM x{ratio['ssim_ratio']:.3f}; "
          f"copying the reference: {copy['psnr']:.2f} dB, SSIM {copy['ssim']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
