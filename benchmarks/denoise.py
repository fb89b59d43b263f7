"""Denoising benchmark: the shipped DEQ denoiser against its baselines on held-out images.

Measured in one run, single-threaded, on the images no model was trained on (``camera``, ``coins``,
``moon``; :mod:`equilibria.zoo.denoise_data`), with the same noise (seeded per image and σ) for
every method:

* PSNR / SSIM at σ ∈ {15, 25, 50} (0–255 units) per image and their mean, for the shipped DEQ
  (known σ and blind), the DnCNN-style CNN and the weight-tied unrolled network (about the same
  parameter count, trained for the same CPU time by ``benchmarks/train_shipped_denoiser.py``:
  the ``{cnn,unrolled}_gray`` models of ``benchmarks/results/denoise_models``), NL-means, TV
  (Chambolle), wavelet (BayesShrink) and BM3D (:mod:`equilibria.zoo.denoise_classical`);
* the same networks followed by the non-local second stage (``*_nl``;
  :class:`equilibria.zoo.denoise_nonlocal.NonLocalStage` with ``SHIPPED_STAGE``, no parameters):
  ``deq_nl`` and ``deq_blind_nl`` are what ``load_shipped()`` and ``equilibria denoise`` run by
  default, ``cnn_nl`` and ``unrolled_nl`` the same stage after the baselines;
* the other equal-CPU sets where they were trained (``*_300s``: the ``{model}_gray_300s``
  models, 300 CPU s each, the DEQ the one shipped before; ``*_long``: ``{model}_gray_long2400``,
  2400 CPU s), each also with the stage (``*_nl``); and with the 300 s set a set trained on the
  same number of patches (``*_patches``: the ``{model}_gray_patches`` models, where a model's
  300 s run already saw that many patches it stands for itself);
* parameters, and time per 256 × 256 image (process CPU seconds and wall ms, median);
* peak memory of one training step vs forward iterations: the DEQ's implicit and phantom
  gradients against backpropagation through the same iterations;
* PSNR vs test-time iterations (anytime behaviour): the DEQ with 1 … 48 iterations, and the
  unrolled network run for other step counts than the K = 6 it was trained with;
* with ``--color``: on ``astronaut`` and ``chelsea``, the colour DEQ (``deq``) and the shipped
  grey DEQ run on the channels of an orthonormal opponent colour space (``deq_opponent``;
  :mod:`equilibria.zoo.denoise_color`), and that with the non-local stage on each channel
  (``deq_opponent_nl``, the default for RGB images), against NL-means, TV, wavelet and BM3D.

Writes ``benchmarks/results/denoise.json`` and ``denoise.png`` (noisy / DEQ / BM3D / clean
crops of ``camera`` at σ = 25). ``--crop 256`` (default) evaluates the central 256 × 256 of
each test image (``--crop 0``: the whole images; 4× the CPU time).

Usage::

    python benchmarks/denoise.py            # grayscale table, timing, memory, anytime, figure
    python benchmarks/denoise.py --color    # and the colour table
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

import equilibria as eq
from equilibria.zoo.denoise import config_from_record, crop_center
from equilibria.zoo.denoise_classical import denoise_classical
from equilibria.zoo.denoise_data import add_noise, test_images
from equilibria.zoo.denoise_model import build_model
from equilibria.zoo.denoise_nonlocal import SHIPPED_STAGE, NonLocalStage
from equilibria.zoo.denoise_weights import load_shipped, sha256_of, shipped_paths
from equilibria.zoo.memory import PeakMemory

from common import RESULTS, write_result

SIGMAS = (15, 25, 50)
NETS = ("deq", "deq_blind", "cnn", "unrolled")
STAGED = ("deq_nl", "deq_blind_nl", "cnn_nl", "unrolled_nl")
# the other equal-CPU sets' tags and their rows' suffixes (docs/recipes/denoise.md): the 300 CPU s
# set of the DEQ shipped before, and the 2400 CPU s set
EXTRA_TAGS = {"300s": "_300s", "long2400": "_long"}
CLASSICAL = ("nlmeans", "tv", "wavelet", "bm3d")
BASELINE_DIR = RESULTS / "denoise_models"


def load_baseline(name: str, color: bool, tag: str = "") -> torch.nn.Module:
    """A baseline trained by train_shipped_denoiser.py (SHA-256 checked)."""
    from safetensors.torch import load_file

    suffix = f"_{tag}" if tag else ""
    path = BASELINE_DIR / f"{name}_{'color' if color else 'gray'}{suffix}.safetensors"
    record = json.loads(path.with_suffix(".json").read_text())
    if sha256_of(path) != record["sha256"]:
        raise RuntimeError(f"{path}: SHA-256 differs from the one recorded beside it")
    model = build_model(config_from_record(record["config"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def training_record(name: str, tag: str = "") -> dict[str, Any]:
    """Steps, patches and CPU seconds of a trained model (``name``: deq, cnn, unrolled)."""
    if name == "deq" and not tag:
        path = shipped_paths(False)[1]
    else:
        path = BASELINE_DIR / f"{name}_gray{'_' + tag if tag else ''}.json"
    rec = json.loads(path.read_text())
    keys = ("steps", "patches", "train_cpu_s", "budget_cpu_s")
    return {k: rec.get(k, rec["steps"] * rec["config"]["batch_size"]) for k in keys}


def patch_matched(nets: dict[str, Any]) -> dict[str, Any]:
    """The equal-patches row set of the 300 s models: ``{model}_gray_patches`` where it was
    trained (all with the same step count), and the 300 s model of the same step count (if any)
    standing for itself; a model with neither is left out."""
    tagged = [
        n for n in ("deq", "cnn", "unrolled") if (BASELINE_DIR / f"{n}_gray_patches.json").exists()
    ]
    if not tagged:
        return {}
    steps = {training_record(n, "patches")["steps"] for n in tagged}
    if len(steps) != 1:
        raise RuntimeError(f"the *_patches models have different step counts {sorted(steps)}")
    out = {f"{n}_patches": load_baseline(n, False, tag="patches") for n in tagged}
    for name in ("deq", "cnn", "unrolled"):
        if name not in tagged and {training_record(name, "300s")["steps"]} == steps:
            out[f"{name}_patches"] = nets[f"{name}_300s"]
    return out


def noisy_of(clean: torch.Tensor, sigma: int, index: int) -> torch.Tensor:
    """The noisy image every method sees: seeded by the image's index and σ."""
    gen = torch.Generator().manual_seed(1000 * index + sigma)
    return add_noise(clean[None], torch.tensor([sigma / 255.0]), gen)[0]


def to_hwc(x: torch.Tensor) -> np.ndarray:
    a = x.detach().to(torch.float64).numpy()
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def metrics(estimate: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    est = np.clip(estimate, 0, 1)
    mse = float(np.mean((est - clean) ** 2))
    axis = -1 if clean.ndim == 3 else None
    ssim = structural_similarity(clean, est, data_range=1.0, channel_axis=axis)
    return 10 * np.log10(1.0 / mse), float(ssim)


@torch.no_grad()
def run_method(method: str, nets: dict[str, Any], noisy: torch.Tensor, sigma: int) -> np.ndarray:
    if method in nets:
        model = nets[method]
        s = None if getattr(model, "blind", False) else torch.tensor([sigma / 255.0])
        return to_hwc(model(noisy[None], s)[0])
    return denoise_classical(method, to_hwc(noisy), sigma / 255.0)  # type: ignore[arg-type]


def held_out(color: bool, crop: int) -> dict[str, torch.Tensor]:
    """The held-out images, cropped to their central ``crop × crop`` (0: whole)."""
    return {name: crop_center(im, crop) for name, im in test_images(color).items()}


def table(methods: list[str], nets: dict[str, Any], color: bool, crop: int) -> dict[str, Any]:
    """PSNR/SSIM per image, σ and method (and the mean over the images)."""
    images = held_out(color, crop)
    rows: dict[str, Any] = {}
    outputs = {}
    for sigma in SIGMAS:
        for index, (name, clean) in enumerate(images.items()):
            noisy = noisy_of(clean, sigma, index)
            ref = to_hwc(clean)
            for method in methods:
                tic = time.process_time()
                out = run_method(method, nets, noisy, sigma)
                cpu = time.process_time() - tic
                p, s = metrics(out, ref)
                rows.setdefault(method, {}).setdefault(str(sigma), {})[name] = {
                    "psnr": p, "ssim": s, "cpu_s": cpu,
                }  # fmt: skip
                if name == "camera" and sigma == 25:
                    outputs[method] = out
                print(f"  sigma {sigma:2d} {name:9s} {method:10s} {p:6.2f} dB  SSIM {s:.4f}  "
                      f"({cpu:.1f} CPU s)", flush=True)  # fmt: skip
            if name == "camera" and sigma == 25:
                outputs["noisy"], outputs["clean"] = to_hwc(noisy), ref
    for per_sigma in rows.values():
        for per_image in per_sigma.values():
            per_image["mean"] = {
                k: statistics.fmean(v[k] for v in per_image.values()) for k in ("psnr", "ssim")
            }
    return {"rows": rows, "outputs": outputs}


@torch.no_grad()
def timing(methods: list[str], nets: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Median process CPU seconds and wall ms per 256² image (camera's centre, σ = 25)."""
    clean = test_images(False)["camera"][:, 128:384, 128:384]
    noisy = noisy_of(clean, 25, 99)
    out = {}
    for method in methods:
        cpu, wall = [], []
        for _ in range(repeats if method in nets else max(1, repeats // 2)):
            tic, tic_wall = time.process_time(), time.perf_counter()
            run_method(method, nets, noisy, 25)
            cpu.append(time.process_time() - tic)
            wall.append(1e3 * (time.perf_counter() - tic_wall))
        out[method] = {"cpu_s": statistics.median(cpu), "wall_ms": statistics.median(wall)}
        print(f"  {method:10s} {out[method]['cpu_s']:.2f} CPU s per 256x256", flush=True)
    if "deq" in nets:
        sol = nets["deq"].deq.last_solution
        out["deq"]["iterations"] = sol.nstep
        out["deq"]["residual"] = float(sol.residual.max())
    return out


def memory_step(deq: Any, backward: eq.Backward, k: int, noisy, sigma, clean) -> float:  # type: ignore[no-untyped-def]
    with deq.deq.using(backward), PeakMemory("cpu") as mem:
        loss = (deq(noisy, sigma, max_iter=k) - clean).pow(2).mean()
        loss.backward()
    deq.zero_grad(set_to_none=True)
    return mem.peak_bytes / 2**20


def memory_table(deq: Any, iterations: tuple[int, ...]) -> dict[str, Any]:
    """Peak MB of one training step (batch 4 of 40² patches) vs forward iterations, per
    backward method (the forward solve runs its whole budget: tolerance 0)."""
    gen = torch.Generator().manual_seed(5)
    clean = torch.rand(4, 1, 40, 40, generator=gen)
    sigma = torch.full((4,), 25 / 255)
    noisy = add_noise(clean, sigma, gen)
    deq.train()
    tol, deq.deq.tol = deq.deq.tol, 0.0
    backwards = {
        "implicit": eq.Implicit(tol=1e-4, max_iter=12),
        "phantom": eq.Phantom(steps=5, damping=0.5),
        "backprop": eq.Unrolled(),
    }
    out = {name: {str(k): memory_step(deq, b, k, noisy, sigma, clean) for k in iterations}
           for name, b in backwards.items()}  # fmt: skip
    for name, row in out.items():
        print(f"  {name:9s} peak MB by iterations: "
              + ", ".join(f"{k}: {v:.1f}" for k, v in row.items()), flush=True)  # fmt: skip
    deq.deq.tol = tol
    deq.eval()
    return out


@torch.no_grad()
def anytime(deq: Any, unrolled: Any, steps: tuple[int, ...], crop: int) -> dict[str, Any]:
    """PSNR on camera's crop (σ = 25) vs test-time iterations; tolerance 0 (the whole budget)."""
    clean = held_out(False, crop)["camera"]
    noisy = noisy_of(clean, 25, 0)[None]
    sigma = torch.tensor([25 / 255])
    ref = to_hwc(clean)
    eval_tol, deq.deq.eval_tol = deq.deq.eval_tol, 0.0
    out: dict[str, Any] = {"deq": {}, "unrolled": {}}
    for k in steps:
        out["deq"][str(k)] = metrics(to_hwc(deq(noisy, sigma, max_iter=k)[0]), ref)[0]
        out.setdefault("deq_residual", {})[str(k)] = float(deq.deq.last_solution.residual.max())
    deq.deq.eval_tol = eval_tol  # the held-out table runs after this, at the model's tolerance
    trained = unrolled.steps
    for k in steps:
        unrolled.steps = k
        out["unrolled"][str(k)] = metrics(to_hwc(unrolled(noisy, sigma)[0]), ref)[0]
    unrolled.steps = trained
    for name in ("deq", "unrolled"):
        print(f"  {name:9s} PSNR by iterations: "
              + ", ".join(f"{k}: {v:.2f}" for k, v in out[name].items()), flush=True)  # fmt: skip
    return out


def figure(outputs: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("noisy", "noisy, σ = 25"), ("deq", "DEQ alone"),
              ("deq_nl", "DEQ + non-local stage (shipped)"), ("bm3d", "BM3D"),
              ("clean", "clean")]  # fmt: skip
    panels = [(k, t) for k, t in panels if k in outputs]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    ref = outputs["clean"]
    for ax, (key, title) in zip(axes, panels):
        crop = np.clip(outputs[key], 0, 1)[:160, 48:208]
        if key != "clean":
            p, _ = metrics(outputs[key], ref)
            title += f"\n{p:.2f} dB (PSNR of the evaluated image)"
        ax.imshow(crop, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--color", action="store_true", help="also the colour table")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (networks)")
    parser.add_argument("--skip-table", action="store_true", help="timing/memory/anytime only")
    parser.add_argument(
        "--crop", type=int, default=256, help="central crop of each test image (0: whole)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    nets: dict[str, Any] = {
        "deq": load_shipped(False, nonlocal_stage=False),
        "deq_blind": load_shipped(False, blind=True, nonlocal_stage=False),
        "cnn": load_baseline("cnn", False),
        "unrolled": load_baseline("unrolled", False),
    }
    # the non-local second stage after each network (no parameters; SHIPPED_STAGE): what
    # load_shipped() and the command run by default, and the same stage after the baselines
    nets["deq_nl"] = load_shipped(False)
    nets["deq_blind_nl"] = load_shipped(False, blind=True)
    nets["cnn_nl"] = NonLocalStage(nets["cnn"], **SHIPPED_STAGE).eval()
    nets["unrolled_nl"] = NonLocalStage(nets["unrolled"], **SHIPPED_STAGE).eval()
    # the longer runs (train_shipped_denoiser.py --tag TAG), where trained
    for tag, suffix in EXTRA_TAGS.items():
        for name in ("deq", "cnn", "unrolled"):
            if (BASELINE_DIR / f"{name}_gray_{tag}.json").exists():
                net = load_baseline(name, False, tag)
                nets[f"{name}{suffix}"] = net
                nets[f"{name}{suffix}_nl"] = NonLocalStage(net, **SHIPPED_STAGE).eval()
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()}
    result: dict[str, Any] = {
        "command": "python benchmarks/denoise.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "sigmas": list(SIGMAS),
        "crop": args.crop,
        "params": params,
        "training": {},
        "nonlocal_stage": dict(SHIPPED_STAGE),
    }
    for name in ("deq", "cnn", "unrolled"):
        result["training"][name] = training_record(name)
        for tag, suffix in EXTRA_TAGS.items():
            if f"{name}{suffix}" in nets:
                result["training"][f"{name}{suffix}"] = training_record(name, tag)
    matched = patch_matched(nets)
    for name in ("deq", "cnn", "unrolled"):
        if f"{name}_patches" in matched:
            own = (BASELINE_DIR / f"{name}_gray_patches.json").exists()
            result["training"][f"{name}_patches"] = training_record(
                name, "patches" if own else "300s"
            )
    longer = [k for k in nets if any(sfx in k for sfx in EXTRA_TAGS.values())]
    methods = [*NETS, *STAGED, *longer, *CLASSICAL]
    print("time per 256x256 image:", flush=True)
    result["time_256"] = timing(methods, nets, args.repeats)
    print("training-step memory:", flush=True)
    result["memory_mb"] = memory_table(nets["deq"], (5, 10, 20))
    print("anytime:", flush=True)
    result["anytime_camera_sigma25"] = anytime(
        nets["deq"], nets["unrolled"], (1, 2, 4, 6, 8, 12, 16, 24, 32), args.crop
    )
    if not args.skip_table:
        print("held-out table (grayscale):", flush=True)
        gray = table([*methods, *matched], {**nets, **matched}, color=False, crop=args.crop)
        result["gray"] = gray["rows"]
        figure(gray["outputs"], RESULTS / "denoise.png")
    if args.color:
        color_nets = {
            "deq": load_shipped(True, color_model="rgb", nonlocal_stage=False),
            "deq_opponent": load_shipped(True, color_model="opponent", nonlocal_stage=False),
            "deq_opponent_nl": load_shipped(True, color_model="opponent"),
        }
        print("held-out table (colour):", flush=True)
        rows = table([*color_nets, "nlmeans", "tv", "wavelet", "bm3d"], color_nets,
                     color=True, crop=args.crop)  # fmt: skip
        result["color"] = rows["rows"]
        rec = json.loads(shipped_paths(True)[1].read_text())
        result["training"]["deq_color"] = {k: rec[k] for k in ("steps", "train_cpu_s")}
        result["training"]["deq_opponent"] = "the shipped grey DEQ (training['deq'])"
        result["params"]["deq_color"] = sum(p.numel() for p in color_nets["deq"].parameters())
        result["params"]["deq_opponent"] = params["deq"]
        result["params"]["deq_opponent_nl"] = params["deq"]
        print("mean PSNR (dB) over astronaut, chelsea:")
        for method in result["color"]:
            cells = [result["color"][method][str(s)]["mean"]["psnr"] for s in SIGMAS]
            print(f"  {method:10s} " + "  ".join(f"{c:6.2f}" for c in cells))
    path = write_result("denoise", result)
    print(f"wrote {path}")
    if "gray" in result:
        print("mean PSNR (dB) over camera, coins, moon:")
        for method in result["gray"]:
            cells = [result["gray"][method][str(s)]["mean"]["psnr"] for s in SIGMAS]
            print(f"  {method:10s} " + "  ".join(f"{c:6.2f}" for c in cells))
    print("CPU s per 256x256 image: " + ", ".join(
        f"{m} {v['cpu_s']:.2f}" for m, v in result["time_256"].items()))  # fmt: skip


if __name__ == "__main__":
    main()
