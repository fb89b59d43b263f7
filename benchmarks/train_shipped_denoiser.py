"""Train the shipped denoisers and their baselines at an equal CPU-time budget.

Each model (the DEQ denoiser, the DnCNN-style CNN and the weight-tied unrolled network, all of the
same parameter count) trains on the ``denoise`` recipe (:mod:`equilibria.zoo.denoise`) for a
number of steps calibrated so that it spends about ``--budget-cpu-s`` seconds of *process CPU
time* (``time.process_time()``, one thread): wall-clock time is unreliable on a machine shared
with other jobs. CPU time is steadier but not immune: with more jobs than cores, one run's CPU
time per step doubled (``docs/recipes/denoise.md``), so compare runs made without oversubscribing
the cores, and read the recorded ``train_cpu_s``. The calibration times a few steps of the
freshly built model, a DEQ with its solver running its whole iteration budget (so that its
steps, which get dearer as its solve needs more iterations while it trains, stay within the
budget); the CPU time the training really took is recorded beside the weights. That guess can
miss both ways: the one-step-gradient DEQ's solves grew past the timed budget's cost (2793 of
2400 CPU s), while the Jacobian-penalised DEQ, whose solves shrink to 3–4 iterations, used 1210
of 2000 (its baselines were then given its real 1210 s).

Outputs:

* the DEQ: ``equilibria/zoo/weights/denoise_{gray,color}.safetensors`` + ``.json`` (config,
  SHA-256, steps, CPU seconds, this command) -- what :func:`load_shipped` loads;
* the baselines: ``benchmarks/results/denoise_models/{cnn,unrolled}_{gray,color}.safetensors``
  + ``.json`` of the same form, read by ``benchmarks/denoise.py`` (no colour baselines exist).

* with ``--tag T``: ``benchmarks/results/denoise_models/{model}_{gray,color}_T.*`` instead
  (e.g. the equal-patch baselines, trained for a fixed ``--steps``);
* with ``--validation``: no weights; the model trains without the validation images
  (``coffee``, ``rocket``; :data:`equilibria.zoo.denoise_data.VALIDATION_IMAGES`) and its PSNR
  on their central 256² crops at σ = 15, 25, 50 is added under ``--name`` to
  ``benchmarks/results/denoise_variants.json`` (how the design was chosen; the test images are
  never looked at).

``--options "..."`` passes recipe options (``equilibria train denoise --help``) to every model,
e.g. ``--options "--backward phantom --jac-reg 0"``; without it each model gets the recipe's
defaults, the shipped design (``scale=2``, width 47, full-resolution path of width 12 and 3
convolutions, implicit gradient with the Jacobian penalty 0.1, 8 forward iterations, learning
rate 3e-3). The CNN runs at full resolution without the path or the penalty, and the unrolled
net without the penalty: they need options of their own (the benchmarked CNN: ``--options
"--scale 1 --width 48 --full-res-width 0 --jac-reg 0 --lr 0.002"``), so train each by a command
of its own. Every model's options are checked before the first one trains.

Usage (the shipped grayscale model and its baselines, then the colour model; the exact commands
of the committed weights are in ``docs/recipes/denoise.md`` and in each ``.json``)::

    python benchmarks/train_shipped_denoiser.py --models deq --budget-cpu-s 2000
    python benchmarks/train_shipped_denoiser.py --models cnn --budget-cpu-s 1210 \
        --options "--scale 1 --width 48 --full-res-width 0 --jac-reg 0 --lr 0.002"
    python benchmarks/train_shipped_denoiser.py --models unrolled --budget-cpu-s 1210 \
        --options "--jac-reg 0"
    python benchmarks/train_shipped_denoiser.py --color --models deq --budget-cpu-s 150 \
        --options "--full-res-width 0 --full-res-layers 2 --backward phantom --jac-reg 0 --lr 0.002"
    python benchmarks/train_shipped_denoiser.py --validation --models deq --budget-cpu-s 300 \
        --name deq-phantom --options "--backward phantom --jac-reg 0"
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from equilibria.zoo.config import ConfigError, parse_options, to_dict
from equilibria.zoo.denoise import DenoiseConfig, DenoiseTask, psnr, validation_pairs
from equilibria.zoo.denoise_model import build_model
from equilibria.zoo.denoise_weights import WEIGHTS_DIR, sha256_of
from equilibria.zoo.evaluation import load_model
from equilibria.zoo.trainer import train

ROOT = Path(__file__).resolve().parent
BASELINE_DIR = ROOT / "results" / "denoise_models"
STEPS_PER_EPOCH = 100
VARIANTS = ROOT / "results" / "denoise_variants.json"
VAL_SIGMAS = (15, 25, 50)


def calibrate(config: DenoiseConfig, steps: int = 4) -> float:
    """Process CPU seconds of one training step of a fresh model (median of ``steps``).

    A DEQ is timed with its solves running their whole iteration budgets (tolerance 1e-12):
    a fresh model converges in fewer iterations than a trained one, so timing it as it is
    would give it more steps than the budget pays for; timed this way its real CPU time is
    at most the budget (the ``train_cpu_s`` recorded beside the weights says by how much).
    """
    if config.model == "deq":
        config = replace(config, tol=1e-12, implicit_tol=1e-12)
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


@torch.no_grad()
def validate(model: torch.nn.Module, color: bool) -> dict[str, float]:
    """Mean PSNR over the validation images' central 256² crops per σ (noise seeded per image
    and σ, the same for every model)."""
    model.eval()
    out = {}
    for sigma in VAL_SIGMAS:
        values = []
        s = torch.tensor([sigma / 255.0])
        for clean, noisy in validation_pairs(color, sigma).values():
            values.append(float(psnr(model(noisy, s), clean)))
        out[str(sigma)] = sum(values) / len(values)
    return out


def recorded_config(config: DenoiseConfig) -> dict[str, Any]:
    """The config as recorded beside the weights (the run folder and device left out)."""
    return to_dict(replace(config, run_dir="", resume=False, quiet=False, device="auto"))


def save(model: torch.nn.Module, config: DenoiseConfig, path: Path, record: dict) -> None:
    """Weights as float32 safetensors, and ``path.json`` with the config and SHA-256."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    record = {"config": recorded_config(config), "sha256": sha256_of(path), **record}
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


def base_configs(args: argparse.Namespace) -> dict[str, DenoiseConfig]:
    """Each model's recipe config before its step count is calibrated: the recipe's defaults,
    ``--options``, then the model, colour, seed and split of the command line.

    Each model's options are read as that model's (``--model NAME`` after ``--options``), so
    that the error names the model and everything it refuses at once.

    Raises:
        ConfigError: ``--options`` is not valid for one of the models, the message naming it
            (on today's defaults the CNN refuses ``scale=2``, the full-resolution path and the
            Jacobian penalty, the unrolled net the penalty: give each its own ``--options``).
    """
    given = shlex.split(args.options)
    if any(t == "--model" or t.startswith("--model=") for t in given):
        raise ConfigError(
            f"the model is chosen by --models (deq, cnn, unrolled), not by --model in --options, "
            f"got --options {args.options!r}"
        )
    out = {}
    for name in args.models.split(","):
        try:
            options = parse_options(DenoiseConfig, [*given, "--model", name],
                                    prog="--options")  # fmt: skip
        except ConfigError as e:
            raise ConfigError(f"model {name!r}: {e}") from None
        out[name] = replace(options, color=args.color, seed=args.seed, device="cpu",
                            validation=args.validation)  # fmt: skip
    return out


def run_config(base: DenoiseConfig, epochs: int, run_dir: Path) -> DenoiseConfig:
    """The config a model trains with: ``epochs`` of :data:`STEPS_PER_EPOCH` steps."""
    return replace(base, epochs=epochs, steps_per_epoch=STEPS_PER_EPOCH, run_dir=str(run_dir),
                   quiet=True, report=False)  # fmt: skip


def make_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default="deq",
        help="comma-separated, of deq, cnn, unrolled (one --options for all: on today's defaults "
        "each baseline needs its own command)",
    )
    parser.add_argument("--color", action="store_true", help="the RGB models")
    parser.add_argument("--budget-cpu-s", type=float, default=720.0, help="CPU s per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-root", default="", help="keep the run folders here")
    parser.add_argument("--options", default="", help="recipe options for every model")
    parser.add_argument(
        "--steps", type=int, default=0, help="train this many steps (multiple of 100) instead"
    )
    parser.add_argument("--tag", default="", help="save as denoise_models/{model}_{kind}_TAG")
    parser.add_argument(
        "--validation", action="store_true", help="validation split; no weights written"
    )
    parser.add_argument("--name", default="", help="the variant's name (--validation)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = args.models.split(",")
    for name in models:
        if name not in ("deq", "cnn", "unrolled"):
            parser.error(f"--models: unknown model {name!r}; choose from deq, cnn, unrolled")
    if len(set(models)) != len(models):
        parser.error(f"--models: a model is named twice in {args.models!r}")
    if not math.isfinite(args.budget_cpu_s) or args.budget_cpu_s <= 0:
        parser.error(
            f"--budget-cpu-s must be a finite number of seconds > 0, got {args.budget_cpu_s}"
        )
    if args.steps < 0 or args.steps % STEPS_PER_EPOCH:
        parser.error(f"--steps must be a positive multiple of {STEPS_PER_EPOCH}, got {args.steps}")
    if args.validation and not args.name:
        parser.error("--validation needs --name (the variant's key in denoise_variants.json)")
    if args.tag and not args.tag.replace("_", "").isalnum():
        parser.error(f"--tag must be letters, digits and _, got {args.tag!r}")
    kind = "color" if args.color else "gray"
    try:  # every model's config before the first one trains (e.g. the CNN refuses scale 2)
        bases = base_configs(args)
    except ConfigError as e:
        parser.error(f"--options: {e}")
    root = Path(args.run_root) if args.run_root else Path(tempfile.mkdtemp(prefix="denoise-"))
    for name in models:
        base = bases[name]
        per_step = calibrate(base)
        steps = args.steps or max(STEPS_PER_EPOCH, round(args.budget_cpu_s / per_step))
        epochs = max(1, round(steps / STEPS_PER_EPOCH))
        run_dir = root / f"{name}_{kind}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        config = run_config(base, epochs, run_dir)
        print(f"{name} {kind}: {per_step * 1e3:.0f} ms CPU per step -> {epochs} epochs of "
              f"{STEPS_PER_EPOCH} steps", flush=True)  # fmt: skip
        tic = time.process_time()
        summary = train(DenoiseTask(config))
        cpu_s = time.process_time() - tic
        model, _ = load_model(DenoiseTask, run_dir)
        record = {
            "command": "python benchmarks/train_shipped_denoiser.py "
            + shlex.join(sys.argv[1:] if argv is None else argv),
            "steps": epochs * STEPS_PER_EPOCH,
            "patches": epochs * STEPS_PER_EPOCH * config.batch_size,
            "budget_cpu_s": None if args.steps else args.budget_cpu_s,
            "calibrated_step_cpu_s": per_step,
            "train_cpu_s": cpu_s,  # training + per-epoch evaluation, this process
            "held_out_psnr_sigma25_crops": summary["test_psnr"],
            "params": summary["params"],
        }
        if args.validation:
            del record["held_out_psnr_sigma25_crops"]  # here: validation, at σ 25 on 128² crops
            record["validation_psnr"] = validate(model, args.color)
            record["options"] = args.options
            # the whole config: a row's options alone do not say which defaults it ran on
            record["config"] = recorded_config(config)
            table = json.loads(VARIANTS.read_text()) if VARIANTS.exists() else {}
            table[f"{args.name}/{name}_{kind}"] = record
            VARIANTS.write_text(json.dumps(table, indent=2) + "\n")
            cells = " / ".join(f"{v:.2f}" for v in record["validation_psnr"].values())
            print(f"{name} {kind} {args.name}: {cpu_s:.0f} CPU s, {record['steps']} steps, "
                  f"validation PSNR {cells}", flush=True)  # fmt: skip
            continue
        if name == "deq" and not args.tag:
            path = WEIGHTS_DIR / f"denoise_{kind}.safetensors"
        else:
            suffix = f"_{args.tag}" if args.tag else ""
            path = BASELINE_DIR / f"{name}_{kind}{suffix}.safetensors"
        save(model, config, path, record)
        print(f"{name} {kind}: {cpu_s:.0f} CPU s, held-out PSNR {summary['test_psnr']:.2f} dB "
              f"-> {path}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
