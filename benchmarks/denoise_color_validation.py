"""Which model denoises RGB images: the colour DEQ, or the grey DEQ in opponent colour space.

The rule, fixed before any of these runs (``docs/recipes/denoise.md``, "Colour"): the grey DEQ
run on the three channels of an orthonormal opponent colour space
(:class:`equilibria.zoo.denoise_color.OpponentColorDenoiser`; CBM3D's trick) becomes the default
colour model of ``equilibria denoise`` and ``load_shipped(color=True)`` **if and only if** its
mean PSNR on the colour validation images is at least the colour DEQ's at every σ; otherwise the
colour DEQ stays the default. Both models are trained with the shipped designs at the same budget
on the validation split (``coffee`` and ``rocket`` held out), seed 0::

    python benchmarks/train_shipped_denoiser.py --validation --budget-cpu-s 300 --models deq \
        --name val-gray-shipped --run-root /tmp/col/val-gray
    python benchmarks/train_shipped_denoiser.py --validation --color --budget-cpu-s 300 \
        --models deq --name val-color-shipped --run-root /tmp/col/val-color

and evaluated here on the central 256² crops of the colour ``coffee`` and ``rocket`` at σ = 15,
25, 50, with the noise of ``train_shipped_denoiser.validate`` (seed 7000 + 100 · index + σ, the
same for every method):

* ``color_deq``: the colour DEQ on the RGB image;
* ``gray_opponent``: the grey DEQ on the opponent channels (fixed affine map per channel);
* ``gray_per_channel``: the grey DEQ on R, G and B separately (at σ);
* ``nlmeans``: NL-means with the held-out benchmark's colour setting
  (:func:`equilibria.zoo.denoise_classical.denoise_classical`).

The test images (``astronaut``, ``chelsea``) are never looked at. Writes
``benchmarks/results/denoise_color_validation.json`` (per-image and mean PSNR, the rule's
outcome, the training records of the two runs and this command).

Usage::

    python benchmarks/denoise_color_validation.py --gray-run /tmp/col/val-gray/deq_gray \
        --color-run /tmp/col/val-color/deq_color
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equilibria.zoo.denoise import DenoiseTask, psnr, validation_pairs
from equilibria.zoo.denoise_classical import denoise_classical
from equilibria.zoo.denoise_color import OpponentColorDenoiser
from equilibria.zoo.denoise_data import validation_images
from equilibria.zoo.denoise_weights import sha256_of
from equilibria.zoo.evaluation import load_model

from common import RESULTS, write_result

SIGMAS = (15, 25, 50)
METHODS = ("color_deq", "gray_opponent", "gray_per_channel", "nlmeans")
VARIANTS = RESULTS / "denoise_variants.json"
# the rows train_shipped_denoiser.py --validation added for the two runs (--name / model_kind)
GRAY_ROW, COLOR_ROW = "val-gray-shipped/deq_gray", "val-color-shipped/deq_color"


def rule(means: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The rule fixed in advance: the opponent-space grey model is the default colour model iff
    its mean PSNR is ≥ the colour DEQ's at every σ."""
    margins = {s: means["gray_opponent"][s] - means["color_deq"][s] for s in means["color_deq"]}
    passed = all(m >= 0 for m in margins.values())
    return {
        "statement": "gray_opponent becomes the default colour model iff its mean validation "
        "PSNR >= color_deq's at every sigma",
        "margin_db": margins,
        "passed": passed,
        "default_color_model": "opponent" if passed else "rgb",
    }


def gray_per_channel(gray: torch.nn.Module) -> Any:
    """The grey model on each RGB channel at the image's σ (one batch of 3N grey images)."""

    def run(noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        n, c, h, w = noisy.shape
        out = gray(noisy.reshape(n * c, 1, h, w), sigma.repeat_interleave(c))
        return out.reshape(n, c, h, w)

    return run


@torch.no_grad()
def evaluate(nets: dict[str, Any]) -> dict[str, Any]:
    """PSNR per method, σ and validation image (and the mean over the images)."""
    rows: dict[str, Any] = {m: {} for m in (*nets, "nlmeans")}
    for sigma in SIGMAS:
        for name, (clean, noisy) in validation_pairs(True, sigma).items():
            s = torch.tensor([sigma / 255.0])
            for method, net in nets.items():
                value = float(psnr(net(noisy, s), clean)[0])
                rows[method].setdefault(str(sigma), {})[name] = value
            hwc = noisy[0].permute(1, 2, 0).to(torch.float64).numpy()
            nl = denoise_classical("nlmeans", hwc, sigma / 255.0)
            nl_t = torch.from_numpy(np.ascontiguousarray(nl.transpose(2, 0, 1)))[None]
            value = float(psnr(nl_t.to(clean), clean)[0])
            rows["nlmeans"].setdefault(str(sigma), {})[name] = value
            print(f"  sigma {sigma:2d} {name:7s} " + "  ".join(
                f"{m} {rows[m][str(sigma)][name]:.2f}" for m in rows), flush=True)  # fmt: skip
    for per_sigma in rows.values():
        for per_image in per_sigma.values():
            per_image["mean"] = statistics.fmean(per_image.values())
    return rows


def training_record(run: Path, row: str) -> dict[str, Any]:
    """The run's config name, checkpoint SHA-256 and the row train_shipped_denoiser.py wrote
    (steps, CPU seconds, its own validation PSNR, command)."""
    table = json.loads(VARIANTS.read_text()) if VARIANTS.exists() else {}
    rec = table.get(row, {})
    keep = ("command", "steps", "train_cpu_s", "params", "validation_psnr")
    return {
        "run_dir": str(run),
        "checkpoint_sha256": sha256_of(run / "checkpoint.safetensors"),
        "variants_row": row if rec else None,
        **{k: rec.get(k) for k in keep},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gray-run", type=Path, required=True, help="the grey DEQ's run folder")
    parser.add_argument("--color-run", type=Path, required=True, help="the colour DEQ's run folder")
    parser.add_argument("--out", default="denoise_color_validation", help="result file stem")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tic = time.process_time()
    gray, gray_task = load_model(DenoiseTask, args.gray_run)
    color, color_task = load_model(DenoiseTask, args.color_run)
    for run, task, want in ((args.gray_run, gray_task, False), (args.color_run, color_task, True)):
        if task.config.color != want or not task.config.validation:
            parser.error(
                f"{run}: a {'colour' if want else 'grey'} model trained with --validation is "
                f"needed, got color={task.config.color}, validation={task.config.validation}"
            )
    gray.eval()
    color.eval()
    nets = {
        "color_deq": color,
        "gray_opponent": OpponentColorDenoiser(gray).eval(),
        "gray_per_channel": gray_per_channel(gray),
    }
    print("validation PSNR (dB), central 256² of coffee and rocket:", flush=True)
    rows = evaluate(nets)
    means = {m: {s: rows[m][s]["mean"] for s in rows[m]} for m in rows}
    outcome = rule(means)
    result = {
        "command": "python benchmarks/denoise_color_validation.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "sigmas": list(SIGMAS),
        "crop": 256,
        "images": list(validation_images(True)),
        "psnr": rows,
        "mean_psnr": means,
        "rule": outcome,
        "training": {
            "gray": training_record(args.gray_run, GRAY_ROW),
            "color": training_record(args.color_run, COLOR_ROW),
        },
        "params": {
            "gray": sum(p.numel() for p in gray.parameters()),
            "color": sum(p.numel() for p in color.parameters()),
        },
        "cpu_s": time.process_time() - tic,
    }
    path = write_result(args.out, result)
    print("mean PSNR (dB) over coffee, rocket:")
    for method, row in means.items():
        print(f"  {method:17s} " + "  ".join(f"{v:6.2f}" for v in row.values()))
    print(
        "rule: opponent >= colour DEQ at every sigma: "
        + ("passed" if outcome["passed"] else "failed")
        + " (margins "
        + " / ".join(f"{v:+.2f}" for v in outcome["margin_db"].values())
        + f" dB) -> default colour model {outcome['default_color_model']!r}"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
