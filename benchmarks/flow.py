"""DEQ-Flow against an unrolled RAFT of the same size on generated flow data (the ``flow`` recipe).

Both models are trained on the engine (``equilibria.zoo.flow``) for each seed under the same
training budget of process CPU time: the CPU seconds per training step of each model are measured
first (a few steps after a warm-up, :func:`time.process_time`, which other processes sharing the
cores do not inflate as they do wall-clock), and each model gets ``budget / (s per step)`` steps.
Then, on the held-out test pairs (other source photographs):

* EPE at the models' test setting (12 update iterations for both) and at 8, 16, 32 and 64
  test-time iterations (RAFT unrolls them; DEQ-Flow runs exactly that many solver iterations,
  tol 0), and DEQ-Flow's median relative residual at each;
* peak training-step memory (the trainer's count of live tensor storages, deterministic on CPU),
  and DEQ-Flow's with 2, 3 and 4 supervised correction states (2 training steps each, as
  ``equilibria train flow --correction-states K --steps 2 --eval-every 2 --test-pairs 2``);
* fixed-point reuse on held-out sequences: EPE after k iterations cold (default start) and warm
  (the previous pair's equilibrium, flow carried forward); the saving is 1 - k_warm / k_cold where
  k_cold is the fewest iterations at which the cold solve comes within 2% of its 32-iteration EPE
  and k_warm the fewest at which the warm solve reaches that same EPE.

Writes ``benchmarks/results/flow.json`` and ``flow.png`` (flows colour-coded next to the ground
truth; EPE against test-time iterations; cold vs warm on sequences). The JSON holds the command
that wrote it, every model's configuration and parameter count, the means over seeds and every
seed's numbers (EPE by test-time iterations, residuals, reuse curves, training CPU seconds), the
ratios quoted on ``docs/recipes/flow.md`` in the mean and per seed, and the process CPU seconds
of the whole run.

Usage::

    python benchmarks/flow.py                    # 3 seeds, ~20 CPU minutes in all
    python benchmarks/flow.py --budget-cpu-s 20 --seeds 0 --test-pairs 32   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from equilibria.zoo import evaluation
from equilibria.zoo.flow import (
    FlowConfig,
    FlowTask,
    build_model,
    evaluate_flow,
    train,
)
from equilibria.zoo.flow_data import make_sequences
from equilibria.zoo.flow_model import DEQFlow, end_point_error, forward_warp

from common import RESULTS, write_result

ITERS = (8, 16, 32, 64)
CURVE = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # iterations of the reuse curves


def cpu_seconds_per_step(config: FlowConfig, steps: int = 6, warmup: int = 2) -> float:
    """Process CPU seconds of one training step (data, forward, backward, AdamW) of ``config``."""
    torch.manual_seed(config.seed)
    model = build_model(config)
    model.train()
    task = FlowTask(config)  # the trainer's optimizer (gradient clipping) and loss
    opt = task.make_optimizer(model)
    rng = np.random.default_rng(12345)
    options = {"size": config.size, "max_objects": config.max_objects, "motion": config.motion}
    for k in range(warmup + steps):
        if k == warmup:
            start = time.process_time()
        batch = make_sequences(rng, "train", config.batch_size, frames=2, **options)
        opt.zero_grad(set_to_none=True)
        task.train_step(model, model, batch).loss.backward()
        opt.step()
    return (time.process_time() - start) / steps


def reuse_curves(model: DEQFlow, frames: torch.Tensor, flows: torch.Tensor) -> dict[str, Any]:
    """EPE after k solver iterations (tol 0), cold and warm, over the pairs after the first of
    each sequence; the warm start is the previous pair's warm equilibrium at 32 iterations."""
    model.eval()
    cold = {k: [] for k in CURVE}
    warm = {k: [] for k in CURVE}
    with torch.no_grad():
        state = model(frames[:, 0], frames[:, 1], iters=max(CURVE), tol=0.0).state
        for t in range(1, frames.shape[1] - 1):
            f1, f2, target = frames[:, t], frames[:, t + 1], flows[:, t]
            init = (state[0], forward_warp(state[1]))
            for k in CURVE:
                out = model(f1, f2, iters=k, tol=0.0)
                cold[k].append(float(end_point_error(out.predictions[-1], target)))
                out = model(f1, f2, iters=k, tol=0.0, init=init)
                warm[k].append(float(end_point_error(out.predictions[-1], target)))
            state = out.state  # the warm solve at max(CURVE) iterations
    cold_epe = {k: statistics.fmean(v) for k, v in cold.items()}
    warm_epe = {k: statistics.fmean(v) for k, v in warm.items()}
    final = cold_epe[max(CURVE)]
    k_cold = next(k for k in CURVE if cold_epe[k] <= 1.02 * final)
    level = cold_epe[k_cold]
    k_warm = next((k for k in CURVE if warm_epe[k] <= level), None)
    return {
        "cold_epe": {str(k): v for k, v in cold_epe.items()},
        "warm_epe": {str(k): v for k, v in warm_epe.items()},
        "k_cold": k_cold,
        "k_warm": k_warm,
        "epe_level": level,
        "iter_saving": None if k_warm is None else 1.0 - k_warm / k_cold,
    }


def run_one(
    model_name: str, seed: int, steps: int, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    config = FlowConfig(
        model=model_name, seed=seed, steps=steps, eval_every=steps, size=args.size,
        motion=args.motion, test_pairs=args.test_pairs, batch_size=args.batch_size,
        run_dir=str(out / f"{model_name}-{seed}"), quiet=True, report=False,
    )  # fmt: skip
    start = time.process_time()
    summary = train(config)
    train_cpu = time.process_time() - start
    model, task = evaluation.load_model(FlowTask, config.run_dir)
    task.setup(torch.device("cpu"))
    result: dict[str, Any] = {
        "seed": seed,
        "steps": steps,
        "train_cpu_s": train_cpu,
        "epe": summary["epe"],
        "epe_valid": summary["epe_valid"],
        "zero_flow_epe": summary["zero_flow_epe"],
        "peak_train_mb": summary["peak_mem_mb"],
        "wall_step_ms": summary["step_ms"],
        "params": sum(p.numel() for p in model.parameters()),
        "config": configuration(config),
    }
    evals = {k: evaluate_flow(model, task.test, iters=k, tol=0.0) for k in ITERS}
    result["epe_by_iters"] = {str(k): e["epe"] for k, e in evals.items()}
    if isinstance(model, DEQFlow):  # median relative residual of the last solver iteration
        result["residual_by_iters"] = {str(k): e["residual"] for k, e in evals.items()}
    if isinstance(model, DEQFlow):
        seq = make_sequences(
            np.random.default_rng(30_000), "test", args.seq_count, frames=args.seq_frames,
            size=args.size, motion=args.motion,
        )  # fmt: skip
        result["reuse"] = reuse_curves(model, seq.frames, seq.flows)
    result["model"] = model
    result["test"] = task.test
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def peak_by_correction_states(base: dict[str, Any], out: Path) -> dict[str, float | None]:
    """DEQ-Flow's peak training-step memory (MB of live tensor storages) with 2, 3 and 4
    supervised states: 2 training steps each, the trainer's count, as on the recipe page."""
    peaks = {}
    for states in (2, 3, 4):
        config = FlowConfig(model="deq", correction_states=states, steps=2, eval_every=2,
                            test_pairs=2, run_dir=str(out / f"states-{states}"), quiet=True,
                            report=False, **base)  # fmt: skip
        peaks[str(states)] = train(config).get("peak_mem_mb")
    return peaks


def configuration(config: FlowConfig) -> dict[str, Any]:
    """The recipe options of a run, less those that vary per run (seed, steps, folder) or only
    quieten it."""
    fields = dataclasses.asdict(config)
    varying = ("seed", "steps", "eval_every", "run_dir", "quiet", "report")
    return {k: v for k, v in fields.items() if k not in varying}


def per_seed_ratio(rs: list[dict[str, Any]], top: str, bottom: str) -> list[float]:
    """``epe_by_iters[top] / epe_by_iters[bottom]`` of every seed's run."""
    return [r["epe_by_iters"][top] / r["epe_by_iters"][bottom] for r in rs]


def flow_rgb(flow: np.ndarray, scale: float) -> np.ndarray:
    """(2, H, W) flow -> (H, W, 3) colours: hue = direction, saturation = magnitude / scale."""
    from matplotlib.colors import hsv_to_rgb

    angle = (np.arctan2(-flow[1], -flow[0]) / np.pi + 1.0) / 2.0
    mag = np.clip(np.hypot(flow[0], flow[1]) / scale, 0.0, 1.0)
    return hsv_to_rgb(np.stack([angle, mag, np.ones_like(mag)], axis=-1))


def figure(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 7.5))
    pairs = 3
    test = runs["deq"][0]["test"]
    with torch.no_grad():
        shown = {name: runs[name][0]["model"].eval()(test.frames[:pairs, 0], test.frames[:pairs, 1])
                 .predictions[-1].numpy() for name in ("raft", "deq")}  # fmt: skip
    truth = test.flows[:pairs, 0].numpy()
    scale = float(np.abs(truth).max())
    titles = ("frame 1", "ground truth", "RAFT (12 it.)", "DEQ-Flow (12 it.)")
    for i in range(pairs):
        images = [test.frames[i, 0, 0].numpy(), flow_rgb(truth[i], scale),
                  flow_rgb(shown["raft"][i], scale), flow_rgb(shown["deq"][i], scale)]  # fmt: skip
        for j, image in enumerate(images):
            ax = fig.add_subplot(pairs + 1, 4, 4 * i + j + 1)
            ax.imshow(image, cmap="gray" if j == 0 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
    ax = fig.add_subplot(pairs + 1, 2, 2 * pairs + 1)
    for name, label in (("raft", "RAFT"), ("deq", "DEQ-Flow")):
        ys = np.array([[r["epe_by_iters"][str(k)] for k in ITERS] for r in runs[name]])
        ax.errorbar(ITERS, ys.mean(0), yerr=ys.std(0), marker="o", label=label, capsize=3)
    ax.axhline(runs["deq"][0]["zero_flow_epe"], color="gray", ls="--", label="zero flow")
    ax.set_xlabel("test-time iterations")
    ax.set_ylabel("test EPE (px)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(pairs + 1, 2, 2 * pairs + 2)
    for key, label in (("cold_epe", "cold start"), ("warm_epe", "warm start (reuse)")):
        ys = np.array([[r["reuse"][key][str(k)] for k in CURVE] for r in runs["deq"]])
        ax.plot(CURVE, ys.mean(0), marker="o", label=label)
    ax.set_xlabel("DEQ solver iterations (sequences)")
    ax.set_ylabel("EPE (px)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-cpu-s", type=float, default=150.0,
                        help="training budget of each run in process CPU seconds")  # fmt: skip
    parser.add_argument("--size", type=int, default=FlowConfig.size)
    parser.add_argument("--motion", type=float, default=FlowConfig.motion)
    parser.add_argument("--batch-size", type=int, default=FlowConfig.batch_size)
    parser.add_argument("--test-pairs", type=int, default=256)
    parser.add_argument("--seq-count", type=int, default=32)
    parser.add_argument("--seq-frames", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    command = " ".join(["python benchmarks/flow.py", *sys.argv[1:]])
    base = {"size": args.size, "motion": args.motion, "batch_size": args.batch_size}
    cost = {m: cpu_seconds_per_step(FlowConfig(model=m, **base)) for m in ("raft", "deq")}
    steps = {m: max(1, int(args.budget_cpu_s / cost[m])) for m in cost}
    print(f"CPU s/step: RAFT {cost['raft']:.3f}, DEQ {cost['deq']:.3f} -> steps {steps}")
    runs: dict[str, list[dict[str, Any]]] = {"raft": [], "deq": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name in ("raft", "deq"):
                r = run_one(name, seed, steps[name], args, Path(tmp))
                runs[name].append(r)
                extra = ""
                if "reuse" in r:
                    extra = (f" | residual by iters {r['residual_by_iters']}"
                             f" | reuse saving {r['reuse']['iter_saving']}")  # fmt: skip
                print(f"seed {seed} {name}: EPE {r['epe']:.3f} by iters {r['epe_by_iters']} | "
                      f"peak {r['peak_train_mb']:.1f} MB | train CPU {r['train_cpu_s']:.0f} s"
                      f"{extra}", flush=True)  # fmt: skip
        states_peak = peak_by_correction_states(base, Path(tmp))
    print(f"DEQ peak MB by correction states: {states_peak}")
    payload: dict[str, Any] = {"command": command}
    for name in ("raft", "deq"):
        rs = runs[name]
        epe, epe_std = mean_std([r["epe"] for r in rs])
        entry: dict[str, Any] = {
            "epe": epe,
            "epe_std": epe_std,
            "epe_valid": statistics.fmean(r["epe_valid"] for r in rs),
            "peak_train_mb": statistics.fmean(r["peak_train_mb"] for r in rs),
            "ms_per_step": 1e3 * cost[name],
            "ms_per_step_clock": "process CPU time, 1 thread",
            "train_steps": steps[name],
            "train_cpu_s": [r["train_cpu_s"] for r in rs],
            "epe_by_iters": {
                str(k): statistics.fmean(r["epe_by_iters"][str(k)] for r in rs) for k in ITERS
            },
            "epe_per_seed": [r["epe"] for r in rs],
            "epe_by_iters_per_seed": [r["epe_by_iters"] for r in rs],
            "epe_valid_per_seed": [r["epe_valid"] for r in rs],
            "peak_train_mb_per_seed": [r["peak_train_mb"] for r in rs],
            "params": rs[0]["params"],
            "config": rs[0]["config"],
        }
        if name == "deq":
            savings = [r["reuse"]["iter_saving"] for r in rs]
            entry["reuse_iter_saving"] = (
                None if None in savings else statistics.fmean(savings)  # type: ignore[arg-type]
            )
            entry["reuse"] = [r["reuse"] for r in rs]
            entry["residual_by_iters"] = [r["residual_by_iters"] for r in rs]
            entry["peak_train_mb_by_correction_states"] = states_peak
        payload[name] = entry
    payload["zero_flow_epe"] = runs["deq"][0]["zero_flow_epe"]
    d, r = payload["deq"], payload["raft"]
    zero = payload["zero_flow_epe"]
    payload["ratios"] = {
        "deq_epe_over_raft": d["epe"] / r["epe"],
        "deq_mem_over_raft": d["peak_train_mb"] / r["peak_train_mb"],
        "deq_epe_32_over_8": d["epe_by_iters"]["32"] / d["epe_by_iters"]["8"],
        "deq_epe_64_over_32": d["epe_by_iters"]["64"] / d["epe_by_iters"]["32"],
        "raft_epe_32_over_8": r["epe_by_iters"]["32"] / r["epe_by_iters"]["8"],
        "raft_epe_64_over_32": r["epe_by_iters"]["64"] / r["epe_by_iters"]["32"],
        "deq_epe_over_raft_per_seed": [a / b for a, b in zip(d["epe_per_seed"], r["epe_per_seed"])],
        "deq_epe_32_over_8_per_seed": per_seed_ratio(runs["deq"], "32", "8"),
        "deq_epe_64_over_32_per_seed": per_seed_ratio(runs["deq"], "64", "32"),
        "raft_epe_32_over_8_per_seed": per_seed_ratio(runs["raft"], "32", "8"),
        "raft_epe_64_over_32_per_seed": per_seed_ratio(runs["raft"], "64", "32"),
        "deq_mem_by_correction_states_over_raft": {
            k: None if v is None else v / r["peak_train_mb"] for k, v in states_peak.items()
        },
        "raft_epe_below_zero_flow": 1.0 - r["epe"] / zero,
        "deq_epe_below_zero_flow": 1.0 - d["epe"] / zero,
    }
    payload["setup"] = {**vars(args), "out": str(args.out), "budget": "process CPU time"}
    payload["cpu_s_total"] = time.process_time()  # the whole run, this process (1 thread)
    path = write_result("flow", payload, args.out)
    figure(runs, args.out / "flow.png")
    print(f"ratios: {payload['ratios']}")
    print(f"zero-flow EPE {payload['zero_flow_epe']:.3f}; wrote {path} and flow.png")


if __name__ == "__main__":
    main()
