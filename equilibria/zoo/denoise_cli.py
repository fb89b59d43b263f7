"""``equilibria denoise``: denoise an image file with the shipped equilibrium denoiser.

::

    equilibria denoise IN --output OUT [--sigma S | --blind] [--overwrite] [--tile 256]
                          [--overlap 32] [--iters K] [--bit-depth {8,16,32}] [--device cpu]
                          [--color-model {opponent,rgb}] [--no-nonlocal]

* ``IN``: PNG, JPEG, TIFF or NPY (:mod:`equilibria.zoo.denoise_io`), 8 or 16 bits per sample or
  float in [0, 1], grey or RGB, with or without alpha; at least 8 × 8 pixels, any larger size.
* ``--sigma S``: the noise standard deviation in 0–255 units, 0 < S ≤ 255, relative to the full
  range whatever the file's depth: on a 16-bit file ``--sigma 25`` is 25 / 255 of 65535, i.e.
  6425 counts; on a float file 25 / 255 ≈ 0.098.
* blind (``--sigma`` omitted, or ``--blind`` to say so): σ is estimated once on the whole image
  (:func:`equilibria.zoo.denoise_sigma.estimate_sigma`) and fed to the known-σ model — the same
  model the shipped blind mode runs (``load_shipped(blind=True)``), except that the blind model
  would estimate σ per tile while the command uses one estimate for all tiles (no tile-to-tile
  change of strength).
* ``--output OUT``: the format follows OUT's extension, at the input's bit depth unless
  ``--bit-depth`` says otherwise (a depth the format cannot store is refused when asked for, and
  replaced by the nearest one the format has, with a note, when only inherited: 16 → 8 for JPEG,
  float → 16 for PNG); alpha is copied unchanged (bit-exact at the same depth). The command never
  replaces an existing file — the input or any other — unless ``--overwrite`` is given; it writes
  a temporary file beside OUT and renames it, so a failure leaves OUT (and an input written over)
  intact.
* ``--tile``/``--overlap``: the image is denoised in tiles of at most ``tile²`` pixels blended
  seam-free (:func:`equilibria.zoo.denoise_tiling.tiled_apply`), so memory stays bounded; for
  the half-resolution shipped models (``scale=2``) every tile starts at an even offset, so that
  it groups pixels into sub-images as the whole image does (any size, odd ones included).
* ``--iters K``: the equilibrium solver's iteration budget (default: the model's).
* ``--color-model``: the model for RGB images (grey ones ignore it): ``opponent``, the shipped
  grey DEQ on the three channels of an orthonormal opponent colour space
  (:mod:`equilibria.zoo.denoise_color`; its iterations and residual are those of the three
  channels' joint solve, the worst channel's), or ``rgb``, the shipped colour DEQ; default
  :data:`equilibria.zoo.denoise_weights.DEFAULT_COLOR_MODEL`, chosen on the validation images
  (``docs/recipes/denoise.md``).
* ``--no-nonlocal``: skip the non-local second stage that follows the network by default
  (:class:`equilibria.zoo.denoise_nonlocal.NonLocalStage`: NL-means of the noisy image with
  the patch similarities measured on the network's output; it widens every tile by its reach,
  ``tile_halo``, so that it sees on a tile what it sees on the whole image).

An RGB image whose three channels are equal in every pixel (a grey image stored as RGB: its
noise is the same in all three, not independent as the colour models assume) is denoised by the
grey model and written back as RGB.

It prints σ (given or estimated), the colour model for an RGB image, the solver's iterations
and largest relative residual over the tiles, and the time. Errors (unreadable or missing file,
unsupported extension, wrong shape or size, σ out of range, an existing output, an unknown
``--color-model``) are one line and exit status 2; shipped weights that are missing or fail
their SHA-256 check, one line and status 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import ConfigError
from .denoise_sigma import MIN_BLIND_SIGMA_255
from .denoise_weights import COLOR_MODELS, DEFAULT_COLOR_MODEL

__all__ = ["add_denoise_parser", "run_denoise"]

_COLOR_MODEL_NAMES = {
    "opponent": "the grey DEQ on the channels of an orthonormal opponent colour space",
    "rgb": "the colour DEQ",
}


def add_denoise_parser(sub: Any) -> None:
    """Add the ``denoise`` subcommand to the CLI's subparsers."""
    p = sub.add_parser(
        "denoise",
        help="denoise an image file with the shipped equilibrium denoiser",
        description="Denoise an image file (PNG, JPEG, TIFF, NPY; 8/16-bit or float; grey or "
        "RGB, alpha kept) with the shipped equilibrium denoiser, tile by tile.",
        epilog="example: equilibria denoise noisy.png --sigma 25 --output clean.png",
    )
    p.add_argument("input", type=Path, help="PNG, JPEG, TIFF or NPY image")
    p.add_argument(
        "-o", "--output", type=Path, required=True, help="output file; format from its extension"
    )
    p.add_argument(
        "--sigma",
        type=float,
        help="noise level in 0–255 units of the full range (also for 16-bit and float files); "
        "omitted: estimated from the image",
    )
    p.add_argument(
        "--blind",
        action="store_true",
        help="estimate σ from the image (the default without --sigma)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT if it exists (even the input)"
    )
    p.add_argument(
        "--tile", type=int, default=256, help="largest tile side in pixels (default 256)"
    )
    p.add_argument(
        "--overlap",
        type=int,
        help="least overlap of neighbouring tiles (default: 32 or tile // 4 if smaller)",
    )
    p.add_argument(
        "--iters", type=int, help="equilibrium solver iteration budget (default: the model's)"
    )
    p.add_argument(
        "--bit-depth",
        type=int,
        choices=(8, 16, 32),
        help="output depth (32: float; default: the input's)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument(
        "--color-model",
        default=DEFAULT_COLOR_MODEL,
        help="model for RGB images: opponent (the grey DEQ on opponent colour channels) or rgb "
        f"(the colour DEQ); default {DEFAULT_COLOR_MODEL}",
    )
    p.add_argument(
        "--no-nonlocal",
        dest="nonlocal_stage",
        action="store_false",
        help="skip the non-local second stage (NL-means of the image guided by the network's "
        "output) and write the network's output alone",
    )


def _load_model(color: bool, color_model: str, nonlocal_stage: bool):  # tests: a small model
    from .denoise_weights import load_shipped

    return load_shipped(
        color=color, blind=False, color_model=color_model, nonlocal_stage=nonlocal_stage
    )


def _check_args(args: argparse.Namespace) -> None:
    if args.sigma is not None:
        if args.blind:
            raise ConfigError("--blind estimates σ from the image: give either --sigma or --blind")
        if not math.isfinite(args.sigma) or not 0 < args.sigma <= 255:
            raise ConfigError(f"--sigma must be in (0, 255] (0–255 units), got {args.sigma}")
    if args.tile < 8:
        raise ConfigError(f"--tile must be at least 8, got {args.tile}")
    if args.overlap is None:
        args.overlap = min(32, args.tile // 4)
    if not 0 <= args.overlap <= args.tile // 2:
        raise ConfigError(
            f"--overlap must be in [0, tile // 2] = [0, {args.tile // 2}], got {args.overlap}"
        )
    if args.iters is not None and args.iters < 1:
        raise ConfigError(f"--iters must be at least 1, got {args.iters}")
    if args.color_model not in COLOR_MODELS:
        raise ConfigError(
            f"--color-model must be {' or '.join(COLOR_MODELS)}, got {args.color_model!r}"
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _output_depth(args: argparse.Namespace, fmt: str, depth: int) -> tuple[int, str]:
    from .denoise_io import depths_of

    allowed = depths_of(fmt)
    if args.bit_depth is not None:
        if args.bit_depth not in allowed:
            raise ConfigError(
                f"--bit-depth {args.bit_depth}: {fmt.upper()} stores "
                f"{', '.join(map(str, allowed))} bits"
            )
        return args.bit_depth, ""
    if depth in allowed:
        return depth, ""
    out = max(allowed)
    name = "float" if depth == 32 else f"{depth}-bit"
    return out, f"note: {fmt.upper()} has no {name} samples; writing {out}-bit"


def run_denoise(args: argparse.Namespace) -> int:
    """Run ``equilibria denoise`` with parsed arguments; returns the exit status."""
    import numpy as np

    from .denoise_io import ImageError, format_of, read_image, write_image

    _check_args(args)
    src, dst = Path(args.input), Path(args.output)
    try:
        fmt_out = format_of(dst)
        format_of(src)
    except ImageError as e:
        raise ConfigError(str(e)) from None
    if _same_file(src, dst) and not args.overwrite:
        raise ConfigError(f"output {dst} is the input; add --overwrite to replace it")
    if dst.exists() and not args.overwrite:
        raise ConfigError(f"output {dst} exists; add --overwrite to replace it")
    if dst.exists() and not dst.is_file():
        raise ConfigError(f"output {dst} exists and is not a file")
    if not dst.parent.is_dir():
        raise ConfigError(f"output folder {dst.parent} does not exist")
    try:
        image = read_image(src)
    except ImageError as e:
        raise ConfigError(str(e)) from None
    if fmt_out == "jpeg" and image.alpha is not None:
        raise ConfigError(f"{src} has an alpha channel and JPEG has none; write .png, .tif or .npy")
    depth, note = _output_depth(args, fmt_out, image.bit_depth)
    # a grey image stored as RGB (R = G = B in every pixel) holds the same noise in all three
    # channels: the colour models assume independent noise per channel (the opponent model
    # would give the luminance 1/√3 of its noise level), so it is denoised as the grey image it
    # is and written back as RGB
    pixels = image.pixels
    grey_rgb = image.color and bool(
        np.array_equal(pixels[..., 0], pixels[..., 1])
        and np.array_equal(pixels[..., 1], pixels[..., 2])
    )
    color = image.color and not grey_rgb
    if grey_rgb:
        pixels = pixels[..., 0]

    import torch

    from .denoise_sigma import estimate_sigma
    from .denoise_tiling import tiled_apply

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigError(
            f"--device {args.device!r} is not a torch device (e.g. cpu, cuda)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available")

    start = time.perf_counter()
    if args.sigma is None:
        sigma255 = 255.0 * estimate_sigma(pixels)
        how = "estimated"
        if sigma255 < MIN_BLIND_SIGMA_255:
            how = f"estimated {sigma255:.2f}, raised to the least level {MIN_BLIND_SIGMA_255}"
            sigma255 = MIN_BLIND_SIGMA_255
    else:
        sigma255, how = float(args.sigma), "given"
    from .denoise_weights import ShippedWeightsError

    try:
        model = _load_model(color, args.color_model, args.nonlocal_stage).to(device)
    except ShippedWeightsError as e:  # a damaged install: status 1, as for damaged checkpoints
        print(f"equilibria: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        raise ConfigError(
            f"the denoise command needs the zoo extra ({e.name} is missing): "
            'pip install "equilibria[zoo]"'
        ) from None
    deq = getattr(model, "deq", None)
    if args.iters is not None and deq is None:
        raise ConfigError("--iters sets the equilibrium solver's budget; this model has no solver")
    x = torch.from_numpy(pixels).to(device=device, dtype=torch.float32)
    x = x.permute(2, 0, 1)[None] if color else x[None, None]  # (1, C, H, W)
    sigma = torch.full((1,), sigma255 / 255.0, device=device)
    stats: list[tuple[int, float, bool]] = []  # per tile: iterations, residual, converged

    def denoise_tile(tile: torch.Tensor) -> torch.Tensor:
        out = model(tile, sigma) if args.iters is None else model(tile, sigma, max_iter=args.iters)
        sol = getattr(deq, "last_solution", None)
        if sol is not None:
            stats.append((int(sol.nstep), float(sol.residual.max()), bool(sol.converged.all())))
        return out

    with torch.inference_mode():
        # a half-resolution model (scale 2) needs tiles at even offsets (see tiled_apply)
        align = getattr(model, "scale", 1)
        # the non-local stage reaches tile_halo pixels beyond each tile (NonLocalStage)
        halo = int(getattr(model, "tile_halo", 0))
        y = tiled_apply(
            denoise_tile, x, tile=args.tile, overlap=args.overlap, align=align, halo=halo
        )
    if not bool(torch.isfinite(y).all()):
        raise RuntimeError("the denoiser returned non-finite values")
    y = y.clamp(0, 1)[0].to("cpu", torch.float64)
    result = (y.permute(1, 2, 0) if color else y[0]).numpy()
    if grey_rgb:
        result = np.repeat(result[..., None], 3, axis=2)
    out = replace(image, pixels=result)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.stem}-", suffix=dst.suffix, dir=dst.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write_image(tmp, out, bit_depth=depth)  # type: ignore[arg-type]
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a new file's usual mode
        os.replace(tmp, dst)
    except ImageError as e:
        raise ConfigError(str(e).replace(tmp, str(dst))) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    elapsed = time.perf_counter() - start

    h, w = image.pixels.shape[:2]
    kind = ("RGB" if image.color else "grey") + ("+alpha" if image.alpha is not None else "")
    depth_name = {32: "float"}.get(image.bit_depth, f"{image.bit_depth}-bit")
    out_name = {32: "float"}.get(depth, f"{depth}-bit")
    if note:
        print(note)
    print(f"{src} ({w}×{h}, {kind}, {depth_name}) -> {dst} ({out_name})")
    print(f"sigma: {sigma255:.2f} (0–255 units, {how})")
    if grey_rgb:
        print("colour model: none (R = G = B in every pixel: denoised as a grey image)")
    elif image.color:
        print(f"colour model: {args.color_model} ({_COLOR_MODEL_NAMES[args.color_model]})")
    if args.nonlocal_stage:
        print("second stage: non-local (NL-means guided by the network's output; --no-nonlocal "
              "skips it)")  # fmt: skip
    else:
        print("second stage: none (--no-nonlocal)")
    if stats:
        iters = [s[0] for s in stats]
        unconverged = sum(not s[2] for s in stats)
        status = "all converged" if not unconverged else f"{unconverged} not converged"
        print(
            f"solver: {len(stats)} tile(s), iterations max {max(iters)} mean "
            f"{sum(iters) / len(iters):.1f}, relative residual max {max(s[1] for s in stats):.2e} "
            f"({status})"
        )
    print(f"time: {elapsed:.2f} s on {device}")
    return 0
