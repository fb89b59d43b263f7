"""The ``equilibria denoise`` command's parts, measured: blind σ estimate, classical baselines,
tiling.

1. σ estimate (:mod:`equilibria.zoo.denoise_sigma`): relative error of the default
   (weak-texture) and the plain wavelet-MAD estimator on scikit-image images at σ = 5, 15, 25, 50
   (0–255 units), noise unclipped and clipped + rounded to 8 bits as in a saved file.
2. Classical baselines (:mod:`equilibria.zoo.denoise_classical`) on ``camera`` at σ = 15, 25, 50
   with noise ``numpy.random.default_rng(0).standard_normal`` (unclipped), PSNR of the output
   clipped to [0, 1], beside the numbers the denoise issue quotes (BM3D 32.05 / 29.85 / 27.86,
   NL-means 30.40 / 28.67 / 25.98), and CPU seconds (``time.process_time``).
3. Tiling (:mod:`equilibria.zoo.denoise_tiling`) of the shipped grey denoiser on the 512²
   ``camera`` at σ = 25: largest change against the whole-image result with the command's
   tiles (256, overlap 32) and with no overlap, in 8-bit levels, and the PSNR of each.

``--sweep`` adds the parameter sweep that chose the classical settings (grey 256² crops of the
training images ``coffee``, ``rocket``, ``clock``; a few CPU minutes).

Run: ``python benchmarks/denoise_tools.py [--sweep]`` → ``benchmarks/results/denoise_tools.json``,
with the command at the top level (``--tiling-only``: part 3 alone, after the shipped model
changed; the rest of the file and its top-level command are kept, the tiling part records its
own command; refused on a file without a top-level command).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from equilibria.zoo.denoise_classical import CLASSICAL, denoise_classical
from equilibria.zoo.denoise_sigma import estimate_sigma

from common import RESULTS, write_result

SIGMAS_EST = (5, 15, 25, 50)
SIGMAS = (15, 25, 50)
EST_IMAGES = ("camera", "coins", "moon", "astronaut", "text", "brick", "grass")
QUOTED = {"bm3d": (32.05, 29.85, 27.86), "nlmeans": (30.40, 28.67, 25.98)}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def sigma_table() -> dict:
    import skimage.data as data

    rows = []
    for name in EST_IMAGES:
        clean = getattr(data, name)() / 255.0
        for s in SIGMAS_EST:
            noisy = clean + s / 255 * np.random.default_rng(s).standard_normal(clean.shape)
            for clipped in (False, True):
                x = np.round(np.clip(noisy, 0, 1) * 255) / 255 if clipped else noisy
                row = {"image": name, "sigma": s, "clipped_8bit": clipped}
                for method in ("weak-texture", "mad"):
                    row[method] = 255 * estimate_sigma(x, method=method)
                    row[f"{method}_rel_error"] = row[method] / s - 1
                rows.append(row)
    worst = {}
    for method in ("weak-texture", "mad"):
        errs = [abs(r[f"{method}_rel_error"]) for r in rows if r["image"] != "grass"]
        worst[method] = max(errs)
        print(
            f"σ estimate {method:>12}: worst relative error {100 * max(errs):.1f} % "
            f"(all images but grass, σ 5–50, clipped or not)"
        )
    for r in rows:
        if not r["clipped_8bit"]:
            print(
                f"  {r['image']:>9} σ={r['sigma']:>2}: weak-texture {r['weak-texture']:6.2f} "
                f"({100 * r['weak-texture_rel_error']:+.0f} %), mad {r['mad']:6.2f} "
                f"({100 * r['mad_rel_error']:+.0f} %)"
            )
    return {"rows": rows, "worst_rel_error_without_grass": worst}


def classical_table() -> dict:
    import skimage.data as data

    clean = data.camera() / 255.0
    out = {}
    for name in CLASSICAL:
        for i, s in enumerate(SIGMAS):
            noisy = clean + s / 255 * np.random.default_rng(0).standard_normal(clean.shape)
            t0 = time.process_time()
            y = denoise_classical(name, noisy, s / 255)
            cpu = time.process_time() - t0
            psnr = _psnr(np.clip(y, 0, 1), clean)
            quoted = QUOTED.get(name, (None,) * 3)[i]
            out[f"{name}/{s}"] = {
                "psnr": psnr,
                "cpu_s": cpu,
                "quoted": quoted,
                "noisy_psnr": _psnr(noisy, clean),
            }
            diff = "" if quoted is None else f" (issue: {quoted:.2f}, {psnr - quoted:+.2f} dB)"
            print(f"camera σ={s:>2} {name:>8}: {psnr:.2f} dB{diff}, {cpu:.1f} s CPU")
    return out


def tiling_table() -> dict:
    import skimage.data as data

    from equilibria.zoo.denoise_tiling import tiled_apply
    from equilibria.zoo.denoise_weights import load_shipped

    clean = data.camera() / 255.0
    noisy = clean + 25 / 255 * np.random.default_rng(0).standard_normal(clean.shape)
    x = torch.from_numpy(noisy).float()[None, None]
    sigma = torch.full((1,), 25 / 255)
    out: dict = {}
    # the command's default (the DEQ + the non-local stage, tiles widened by the stage's reach)
    # and the network alone
    for key, model in (
        ("shipped", load_shipped(color=False)),
        ("network_alone", load_shipped(color=False, nonlocal_stage=False)),
    ):
        halo = int(getattr(model, "tile_halo", 0))
        row: dict = {"receptive_field": model.receptive_field, "halo": halo}
        with torch.inference_mode():
            t0 = time.process_time()
            whole = model(x, sigma)
            row["whole"] = {
                "cpu_s": time.process_time() - t0,
                "psnr": _psnr(whole.clamp(0, 1)[0, 0].double().numpy(), clean),
            }
            for overlap in (32, 0):
                t0 = time.process_time()
                # the command's tiles: at even offsets for the half-resolution model
                # (align=scale), widened by the stage's reach (halo)
                tiled = tiled_apply(
                    lambda t, m=model: m(t, sigma),
                    x,
                    tile=256,
                    overlap=overlap,
                    align=model.scale,
                    halo=halo,
                )
                cpu = time.process_time() - t0
                diff = 255 * float((tiled - whole).abs().max())
                psnr = _psnr(tiled.clamp(0, 1)[0, 0].double().numpy(), clean)
                row[f"tile256_overlap{overlap}"] = {
                    "max_change_8bit_levels": diff,
                    "cpu_s": cpu,
                    "psnr": psnr,
                }
                print(
                    f"{key}: tiles 256, overlap {overlap:>2}: largest change {diff:.3f} / 255, "
                    f"PSNR {psnr:.3f} (whole image {row['whole']['psnr']:.3f}), {cpu:.1f} s CPU "
                    f"(whole {row['whole']['cpu_s']:.1f} s)"
                )
        out[key] = row
    return out


def sweep_table() -> dict:
    import skimage.color as color
    import skimage.data as data
    from skimage import restoration as r

    images = {
        "coffee": color.rgb2gray(data.coffee())[100:356, 200:456],
        "rocket": color.rgb2gray(data.rocket())[150:406, 200:456],
        "clock": data.clock()[50:306, 50:306] / 255.0,
    }
    scores: dict[str, list[float]] = {}
    for im in images.values():
        for s in SIGMAS:
            sig = s / 255
            noisy = im + sig * np.random.default_rng(0).standard_normal(im.shape)

            def add(key: str, y: np.ndarray, im: np.ndarray = im) -> None:
                scores.setdefault(key, []).append(_psnr(np.clip(y, 0, 1), im))

            for f in (0.5, 0.7, 0.9, 1.1, 1.3):
                add(f"tv weight={f}σ", r.denoise_tv_chambolle(noisy, weight=f * sig))
            for w in ("db1", "db2", "sym4", "sym8"):
                add(
                    f"wavelet {w}",
                    r.denoise_wavelet(
                        noisy, sigma=sig, wavelet=w, method="BayesShrink", rescale_sigma=True
                    ),
                )
            for patch in (5, 7):
                for hf in (0.8, 1.0, 1.2):
                    y = r.denoise_nl_means(
                        noisy,
                        patch_size=patch,
                        patch_distance=6,
                        h=hf * sig,
                        sigma=sig,
                        fast_mode=False,
                        preserve_range=True,
                    )
                    add(f"nlmeans patch={patch} h={hf}σ", y)
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    for k, v in sorted(mean.items()):
        print(f"sweep {k:>24}: mean PSNR {v:.3f} dB")
    return {"images": list(images), "sigmas": SIGMAS, "mean_psnr": mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also the classical parameter sweep")
    parser.add_argument(
        "--tiling-only",
        action="store_true",
        help="rerun only part 3 (after the shipped model changed); the other parts are kept",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    command = "python benchmarks/denoise_tools.py " + " ".join(sys.argv[1:])
    if args.tiling_only:
        result = json.loads((RESULTS / "denoise_tools.json").read_text())
        if "command" not in result:  # the other parts would be kept without their command
            parser.error(
                "--tiling-only keeps the other parts of denoise_tools.json, which records no "
                "top-level 'command' for them: run the whole benchmark instead"
            )
        result.pop("machine", None)
        result["tiling"] = {"command": command, **tiling_table()}
    else:
        result = {
            "command": command,
            "sigma_estimate": sigma_table(),
            "classical_camera": classical_table(),
            "tiling": tiling_table(),
        }
        if args.sweep:
            result["sweep"] = sweep_table()
    print(f"written: {write_result('denoise_tools', result)}")


if __name__ == "__main__":
    main()
