"""Train the shipped denoisers and their baselines at an equal CPU-time budget.

Each model (the DEQ denoiser, the DnCNN-style CNN and the weight-tied unrolled network, all of the
same parameter count) trains on the ``denoise`` recipe (:mod:`equilibria.zoo.denoise`) for a
number of steps calibrated so that it spends about ``--budget-cpu-s`` seconds of *process CPU
time* (``time.process_time()``, one thread): wall-clock time is unreliable on a machine shared
with other jobs. The calibration times a few steps of the freshly built model; the CPU time the
training really took is recorded beside the weights (DEQ steps get dearer as its solve needs more
iterations while it trains, so its budget is a lower bound).

Outputs:

* the DEQ: ``equilibria/zoo/weights/denoise_{gray,color}.safetensors`` + ``.json`` (config,
  SHA-256, steps, CPU seconds, this command) -- what :func:`load_shipped` loads;
* the baselines: ``benchmarks/results/denoise_models/{cnn,unrolled}_{gray,color}.safetensors``
  + ``.json`` of the same form, read by ``benchmarks/denoise.py``.

Usage (the shipped grayscale model and its baselines, then the colour model)::

    python benchmarks/train_shipped_denoiser.py --models deq,cnn,unrolled --budget-cpu-s 720
    python benchmarks/train_shipped_denoiser.py --color --models deq --budget-cpu-s 480
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from equilibria.zoo.config import to_dict
from equilibria.zoo.denoise import DenoiseConfig, DenoiseTask
from equilibria.zoo.denoise_model import WEIGHTS_DIR, build_model, sha256_of
from equilibria.zoo.evaluation import load_model
from equilibria.zoo.trainer import train

ROOT = Path(__file__).resolve().parent
BASELINE_DIR = ROOT / "results" / "denoise_models"
STEPS_PER_EPOCH = 100


def calibrate(config: DenoiseConfig, steps: int = 4) -> float:
    """Process CPU seconds of one training step of a fresh model (median of ``steps``)."""
    task = DenoiseTask(config)
    task.setup(torch.device("cpu"))
    model = build_model(config)
    opt = task.make_optimizer(model)
    batches = iter(task.batches(1, None))  # type: ignore[arg-type]
    times = []
    for _ in range(steps + 1):
        batch = next(batches)
        tic = time.process_time()
        out = task.train_step(model, model, batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.process_time() - tic)
    times = sorted(times[1:])  # the first step warms up
    return times[len(times) // 2]


def save(model: torch.nn.Module, config: DenoiseConfig, path: Path, record: dict) -> None:
    """Weights as float32 safetensors, and ``path.json`` with the config and SHA-256."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    shipped = replace(config, run_dir="", resume=False, quiet=False, device="auto")
    record = {"config": to_dict(shipped), "sha256": sha256_of(path), **record}
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="deq,cnn,unrolled", help="comma-separated")
    parser.add_argument("--color", action="store_true", help="the RGB models")
    parser.add_argument("--budget-cpu-s", type=float, default=720.0, help="CPU s per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-root", default="", help="keep the run folders here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = args.models.split(",")
    for name in models:
        if name not in ("deq", "cnn", "unrolled"):
            parser.error(f"--models: unknown model {name!r}; choose from deq, cnn, unrolled")
    kind = "color" if args.color else "gray"
    root = Path(args.run_root) if args.run_root else Path(tempfile.mkdtemp(prefix="denoise-"))
    for name in models:
        base = DenoiseConfig(model=name, color=args.color, seed=args.seed, device="cpu")
        per_step = calibrate(base)
        steps = max(STEPS_PER_EPOCH, round(args.budget_cpu_s / per_step))
        epochs = max(1, round(steps / STEPS_PER_EPOCH))
        run_dir = root / f"{name}_{kind}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        config = replace(
            base, epochs=epochs, steps_per_epoch=STEPS_PER_EPOCH, run_dir=str(run_dir),
            quiet=True, report=False,
        )  # fmt: skip
        print(f"{name} {kind}: {per_step * 1e3:.0f} ms CPU per step -> {epochs} epochs of "
              f"{STEPS_PER_EPOCH} steps", flush=True)  # fmt: skip
        tic = time.process_time()
        summary = train(DenoiseTask(config))
        cpu_s = time.process_time() - tic
        model, _ = load_model(DenoiseTask, run_dir)
        record = {
            "command": "python benchmarks/train_shipped_denoiser.py " + " ".join(sys.argv[1:]),
            "steps": epochs * STEPS_PER_EPOCH,
            "budget_cpu_s": args.budget_cpu_s,
            "calibrated_step_cpu_s": per_step,
            "train_cpu_s": cpu_s,  # training + per-epoch evaluation, this process
            "held_out_psnr_sigma25_crops": summary["test_psnr"],
            "params": summary["params"],
        }
        if name == "deq":
            path = WEIGHTS_DIR / f"denoise_{kind}.safetensors"
        else:
            path = BASELINE_DIR / f"{name}_{kind}.safetensors"
        save(model, config, path, record)
        print(f"{name} {kind}: {cpu_s:.0f} CPU s, held-out PSNR {summary['test_psnr']:.2f} dB "
              f"-> {path}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
