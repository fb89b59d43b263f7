"""The ``denoise`` recipe: an equilibrium image denoiser and its baselines of equal size.

The models live in :mod:`equilibria.zoo.denoise_model` (a DEQ denoiser, a weight-tied network
unrolled K = 6 times and a DnCNN-style CNN, all with the same parameter count) and the data in
:mod:`equilibria.zoo.denoise_data` (patches of scikit-image's bundled images; ``camera``,
``coins`` and ``moon`` held out, ``astronaut`` and ``chelsea`` for colour). Each step trains on
random patches with one noise level per patch drawn uniformly from ``[sigma_min, sigma_max]``
(0–255 units), so one model serves every σ; the loss is the mean squared error of the clean
estimate. The held-out metric is the PSNR on central crops of the test images at ``test_sigma``
with fixed noise.

The defaults are the shipped grayscale model's design and training length (the config recorded
in ``equilibria/zoo/weights/denoise_gray.json``): the DEQ on the half-resolution sub-images
(``scale=2``, width 47) with a full-resolution path after the equilibrium
(``full_res_width=12 full_res_layers=3``), trained with the implicit gradient and the Jacobian
penalty 0.1 (``jac_reg``; Bai, Koltun & Kolter, ICML 2021) from at most 8 forward iterations,
learning rate 3e-3, 93 epochs of 100 steps (about 1200 CPU s). The design shipped before it (no
full-resolution path, the one-step phantom gradient, learning rate 2e-3, 28 epochs) and the
first defaults (full resolution, implicit gradient) are options (below).

Usage::

    equilibria train denoise                                 # the shipped design (grey)
    equilibria train denoise --epochs 10                     # a quick run of it
    equilibria train denoise --model cnn --scale 1 --width 48 --full-res-width 0 --jac-reg 0 \
        --lr 0.002                                           # DnCNN-style baseline (benchmarked)
    equilibria train denoise --model unrolled --jac-reg 0    # weight-tied, K = 6, same cell
    equilibria train denoise --backward phantom --jac-reg 0  # the same DEQ, one-step gradient
    equilibria train denoise --full-res-width 0 --full-res-layers 2 --backward phantom \
        --jac-reg 0 --lr 0.002 --epochs 28                   # the design shipped before (300 s)
    equilibria train denoise --color --full-res-width 0 --full-res-layers 2 --backward phantom \
        --jac-reg 0 --lr 0.002 --epochs 15                   # the shipped colour DEQ's run
    equilibria train denoise --scale 1 --width 48 --backward implicit --max-iter 12 \
        --phantom-steps 5 --phantom-damping 0.5 --epochs 6 --steps-per-epoch 50 \
        --full-res-width 0 --full-res-layers 2 --jac-reg 0 --lr 0.002   # the first defaults
    equilibria sweep denoise --run-dir runs/denoise-table    # the variants x 3 seeds: 12 runs
                                    # of 20-25 CPU minutes at the default 93 epochs

``benchmarks/train_shipped_denoiser.py`` trains the shipped models and the baselines at an equal
CPU-time budget; ``benchmarks/denoise.py`` compares them with NL-means, TV, wavelet and BM3D.

Reference: Chen, Wang, Geng et al., "Equilibrium Image Denoising With Implicit
Differentiation", IEEE TIP 2023; Gilton, Ongie & Willett, "Deep Equilibrium Architectures for
Inverse Problems in Imaging", IEEE TCI 2021.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigError, check_range, option
from .denoise_data import (
    add_noise,
    sample_patches,
    test_images,
    train_images,
    validation_images,
)
from .denoise_model import DEQDenoiser, build_model
from .distributed import DistInfo
from .task import STEP_MS, TRAIN_LOSS, Metric, Plot, RunOptions, Schedule, StepOutput, Task

__all__ = [
    "RECORD_DEFAULTS",
    "DenoiseConfig",
    "DenoiseTask",
    "config_from_record",
    "crop_center",
    "psnr",
    "validation_pairs",
]

# the CNN of the benchmark's rows (``benchmarks/denoise.py``), on today's defaults
BENCHMARKED_CNN = "--model cnn --scale 1 --width 48 --full-res-width 0 --jac-reg 0 --lr 0.002"
_TEST_NOISE_SEED = 20_231  # the held-out noise is the same for every run and model


@dataclass(frozen=True)
class DenoiseConfig(RunOptions):
    """Options of the ``denoise`` recipe (each is a command-line option ``--name-with-dashes``).

    Validated on construction: a wrong type or value raises :class:`ConfigError` naming the
    option, the value and what is allowed.
    """

    # model
    model: Literal["deq", "cnn", "unrolled"] = option(
        "deq", "the equilibrium denoiser, the DnCNN-style CNN or the weight-tied unrolled net"
    )
    color: bool = option(
        False,
        "RGB images (3 channels) instead of grayscale (on today's defaults an untested colour "
        "design: the shipped colour DEQ is the design shipped before, see docs/recipes/denoise.md)",
    )
    width: int = option(
        47, "feature channels of every model (the benchmarked CNN, at full resolution: 48)"
    )
    gain: float = option(
        0.6, "filter norm of the DEQ / unrolled cell's convolutions (smaller: more contractive)"
    )
    cnn_layers: int = option(4, "hidden width x width convolutions of the CNN (4: DEQ's size)")
    scale: int = option(
        2,
        "DEQ / unrolled: 2 runs them on the four half-resolution sub-images (pixel_unshuffle, "
        "as FFDNet), a quarter of the cost per iteration; 1: full resolution (the CNN needs 1)",
    )
    full_res_width: int = option(
        12,
        "DEQ / unrolled with scale 2: R > 0 adds a full-resolution path (the decoder gives R "
        "full-resolution channels via pixel_shuffle; full-resolution convs read the noise from "
        "them and [y, sigma]; the shipped design: 12); 0: none (the CNN and scale 1 need 0)",
    )
    full_res_layers: int = option(3, "full-resolution convs of that path (full_res_width > 0)")
    full_res_kernel: int = option(
        3, "kernel (3 or 1) of the half-resolution conv that makes the path's 4R channels"
    )
    unroll_steps: int = option(6, "cell applications K of the unrolled network")
    # DEQ solve
    solver: Literal["anderson", "picard"] = option("anderson", "forward solver of the DEQ")
    anderson_m: int = option(5, "Anderson history size")
    tol: float = option(1e-3, "forward tolerance in training (relative residual)")
    max_iter: int = option(8, "forward iteration budget in training")
    eval_tol: float = option(1e-3, "forward tolerance in evaluation")
    eval_max_iter: int = option(20, "forward iteration budget in evaluation")
    backward: Literal["implicit", "phantom"] = option(
        "implicit", "DEQ gradient: exact implicit (IFT) or phantom (unrolled, damped)"
    )
    implicit_tol: float = option(1e-3, "tolerance of the implicit adjoint solve")
    implicit_max_iter: int = option(12, "iteration budget of the implicit adjoint solve")
    phantom_steps: int = option(1, "steps k of the phantom gradient (1, undamped: JFB)")
    phantom_damping: float = option(1.0, "damping lambda of the phantom gradient, in (0, 1]")
    jac_reg: float = option(
        0.1,
        "weight of the Jacobian penalty ||J||_F^2 / D (the DEQ with the implicit backward only: "
        "the CNN, the unrolled net and --backward phantom need 0)",
    )
    # data and optimisation
    patch: int = option(40, "training patch side in pixels")
    batch_size: int = option(16, "patches per step")
    sigma_min: float = option(5.0, "smallest training noise level (0-255 units)")
    sigma_max: float = option(55.0, "largest training noise level (0-255 units)")
    epochs: int = option(93, "training epochs")
    steps_per_epoch: int = option(100, "optimizer steps per epoch")
    warmup_steps: int = option(20, "steps of linear learning-rate warm-up")
    lr: float = option(3e-3, "peak learning rate (warm-up, then cosine decay)")
    weight_decay: float = option(0.0, "weight decay")
    test_sigma: float = option(25.0, "noise level of the held-out metric (0-255 units)")
    test_crop: int = option(128, "side of the central crop of each test image (0 = whole)")
    validation: bool = option(
        False,
        "train without the validation images (coffee, rocket) and report the held-out metric on "
        "them instead of the test images (to compare designs without touching the test set)",
    )
    seed: int = option(0, "seed of initialisation, patches and noise")
    dtype: Literal["float32", "float64"] = option("float32", "floating-point precision")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "device (auto: CUDA if available)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("width", "cnn_layers", "unroll_steps", "anderson_m", "max_iter"):
            check_range(self, field, low=1)
        for field in ("eval_max_iter", "implicit_max_iter", "phantom_steps", "batch_size"):
            check_range(self, field, low=1)
        for field in ("epochs", "steps_per_epoch"):
            check_range(self, field, low=1)
        check_range(self, "patch", low=8, high=512)
        check_range(self, "scale", low=1, high=2)
        check_range(self, "full_res_width", low=0)
        check_range(self, "jac_reg", low=0)
        if self.model == "cnn":  # every option the CNN refuses in one message
            fixes = {"scale": 1, "full_res_width": 0, "jac_reg": 0}
            wrong = [k for k, ok in fixes.items() if getattr(self, k) != ok]
            if wrong:
                raise ConfigError(
                    f"DenoiseConfig: {', '.join(f'{k}={getattr(self, k)}' for k in wrong)} "
                    f"{'is an option' if len(wrong) == 1 else 'are options'} of the DEQ, not of "
                    "the CNN baseline (DnCNN-style, at full resolution, without the "
                    "full-resolution path or the Jacobian penalty): pass "
                    + " ".join(f"--{k.replace('_', '-')} {fixes[k]}" for k in wrong)
                    + f" (the benchmarked CNN: {BENCHMARKED_CNN})"
                )
        check_range(self, "full_res_layers", low=1)
        if self.full_res_kernel not in (1, 3):
            raise ConfigError(
                f"DenoiseConfig: full_res_kernel must be 1 or 3, got {self.full_res_kernel}"
            )
        if self.full_res_width and (self.scale != 2 or self.model == "cnn"):
            raise ConfigError(
                f"DenoiseConfig: full_res_width={self.full_res_width} is the full-resolution path "
                "of the half-resolution DEQ and unrolled network: it needs scale 2 and model "
                f"'deq' or 'unrolled', got scale {self.scale}, model {self.model!r}; pass "
                "full_res_width 0 (--full-res-width 0)"
            )
        check_range(self, "warmup_steps", low=0)
        check_range(self, "threads", low=0)
        check_range(self, "test_crop", low=0)
        check_range(self, "seed", low=0, high=2**32 - 1)
        for field in ("gain", "tol", "eval_tol", "implicit_tol", "lr", "sigma_min"):
            check_range(self, field, low=0, low_open=True)
        check_range(self, "test_sigma", low=0, high=255, low_open=True)
        check_range(self, "sigma_max", low=0, high=255, low_open=True)
        check_range(self, "phantom_damping", low=0, high=1, low_open=True)
        check_range(self, "weight_decay", low=0)
        if self.sigma_min > self.sigma_max:
            raise ConfigError(
                f"DenoiseConfig: sigma_min must be <= sigma_max={self.sigma_max}, "
                f"got {self.sigma_min}"
            )
        if 0 < self.test_crop < 16:
            raise ConfigError(f"DenoiseConfig: test_crop must be 0 or >= 16, got {self.test_crop}")
        if self.jac_reg and (self.model != "deq" or self.backward != "implicit"):
            raise ConfigError(
                f"DenoiseConfig: jac_reg={self.jac_reg} needs model 'deq' with backward "
                f"'implicit' (it reuses the implicit backward's map evaluation), got model "
                f"{self.model!r}"
                + (f", backward {self.backward!r}" if self.model == "deq" else "")
                + "; pass jac_reg 0 (--jac-reg 0"
                + (
                    "; the benchmarked unrolled net: --model unrolled --jac-reg 0)"
                    if self.model == "unrolled"
                    else ")"
                )
            )


# options added after configs were first recorded (beside the shipped weights, the baselines and
# in run folders), at the values those records were trained with: a record without them means
# these (the full-resolution path was the default for a while)
RECORD_DEFAULTS: dict[str, Any] = {"full_res_width": 0, "full_res_layers": 2, "full_res_kernel": 3}


def config_from_record(saved: dict[str, Any]) -> DenoiseConfig:
    """The :class:`DenoiseConfig` of a recorded config dict, an option it lacks taken from
    :data:`RECORD_DEFAULTS` (the value it was trained with) rather than from today's defaults.

    Raises:
        ConfigError: a value is not valid.
        TypeError: an unknown option.
    """
    return DenoiseConfig(**{**RECORD_DEFAULTS, **saved})


def psnr(estimate: Tensor, clean: Tensor) -> Tensor:
    """PSNR in dB per image of ``estimate`` clipped to [0, 1] against ``clean`` (N, C, H, W)."""
    mse = (estimate.clamp(0, 1) - clean).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def crop_center(image: Tensor, size: int) -> Tensor:
    """The central ``size × size`` crop of a (C, H, W) image (the whole image if ``size`` is 0
    or not smaller)."""
    h, w = image.shape[-2:]
    if not size:
        return image
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return image[..., top : top + size, left : left + size]


# the validation noise: image ``index`` of VALIDATION_IMAGES at σ (0-255) draws from this seed
def _validation_seed(index: int, sigma255: int) -> int:
    return 7000 + 100 * index + sigma255


def validation_pairs(
    color: bool, sigma255: int, crop: int = 256
) -> dict[str, tuple[Tensor, Tensor]]:
    """The validation images' (clean, noisy) pairs at one noise level, by name, each
    ``(1, C, crop, crop)`` (the central crop; 0: whole), the noise seeded per image and σ
    (7000 + 100 · index + σ): the same noise for every model and every validation script
    (``benchmarks/train_shipped_denoiser.py``, ``denoise_convergence.py``,
    ``denoise_color_validation.py``, ``denoise_nonlocal_validation.py``).

    Args:
        color: the RGB images, or their luminance.
        sigma255: the noise standard deviation in 0–255 units (an int: it enters the seed).
        crop: the side of the central crop.
    """
    out = {}
    for index, (name, clean) in enumerate(validation_images(color).items()):
        clean = crop_center(clean, crop)[None]
        gen = torch.Generator().manual_seed(_validation_seed(index, sigma255))
        out[name] = (clean, add_noise(clean, torch.tensor([sigma255 / 255.0]), gen))
    return out


class DenoiseTask(Task):
    """The denoising recipe for :func:`equilibria.zoo.trainer.train`."""

    name = "denoise"
    config_class = DenoiseConfig
    headline = Metric("test_psnr", "test PSNR (dB)", fmt=".2f")
    table_metrics = (
        Metric("params", "parameters", fmt=",.0f"),  # the sweep formats a float mean
        Metric("fwd_iters_mean", "fwd it.", higher_is_better=False, fmt=".1f"),
        STEP_MS,
    )
    epoch_columns = (
        TRAIN_LOSS,
        Metric("train_psnr", "train PSNR", fmt=".2f"),
        Metric("test_psnr", "test PSNR", fmt=".2f"),
        Metric("fwd_iters_mean", "fwd it.", higher_is_better=False, fmt=".1f"),
        Metric("bwd_iters_mean", "bwd it.", higher_is_better=False, fmt=".1f"),
        Metric("eval_iters", "eval it.", higher_is_better=False),
        Metric("eval_residual_max", "eval res.", higher_is_better=False, fmt=".1e"),
    )
    plots = (
        Plot("loss", "training loss", "MSE", (("train_loss", "train"),), log=True),
        Plot("psnr", "PSNR", "dB", (("train_psnr", "train"), ("test_psnr", "held-out"))),
    )
    eval_options = ("eval_max_iter", "eval_tol", "test_sigma", "test_crop")
    # a run saved before the full-resolution options existed was trained without the path
    # (``load_model`` rebuilds its checkpoint with these, not today's defaults)
    record_defaults = RECORD_DEFAULTS
    # deq-implicit is the shipped design (the defaults, with the Jacobian penalty); deq-phantom
    # the same DEQ with the one-step gradient (the penalty needs the implicit one); the unrolled
    # net the same cell applied K times; the CNN as benchmarked, at full resolution, width 48 and
    # its learning rate 2e-3 (84,481 parameters, 0.8 % below the DEQ's 85,192)
    variants: ClassVar[dict[str, dict[str, Any]]] = {
        "deq-implicit": {"model": "deq", "backward": "implicit"},
        "deq-phantom": {"model": "deq", "backward": "phantom", "jac_reg": 0.0},
        "cnn": {
            "model": "cnn",
            "scale": 1,
            "width": 48,
            "full_res_width": 0,
            "jac_reg": 0.0,
            "lr": 2e-3,
        },
        "unrolled": {"model": "unrolled", "jac_reg": 0.0},
    }
    max_params = 20_000_000
    extras = ("skimage", "safetensors")

    def check(self, info: DistInfo) -> None:
        if info.world_size > 1:
            raise ConfigError("the denoise recipe trains in one process (no torchrun)")

    def setup(self, device: torch.device) -> None:
        dtype = torch.float64 if self.config.dtype == "float64" else torch.float32
        self.device, self.dtype = device, dtype
        self.images = train_images(self.config.color, validation=self.config.validation)
        smallest = min(min(im.shape[1:]) for im in self.images)
        if self.config.patch > smallest:
            raise ConfigError(
                f"DenoiseConfig: patch must be <= {smallest} (the smallest side of a training "
                f"image), got {self.config.patch}"
            )
        gen = torch.Generator().manual_seed(_TEST_NOISE_SEED)
        clean, noisy = [], []
        held_out = (validation_images if self.config.validation else test_images)(self.config.color)
        self.test_names = list(held_out)
        for image in held_out.values():
            c = crop_center(image, self.config.test_crop)[None].to(device, dtype)
            sigma = torch.tensor([self.config.test_sigma / 255.0])
            clean.append(c)
            noisy.append(add_noise(c, sigma, gen))
        self.test = (clean, noisy)

    def build_model(self) -> nn.Module:
        return build_model(self.config)

    def schedule(self) -> Schedule:
        c = self.config
        return Schedule(c.epochs, c.steps_per_epoch, c.warmup_steps)

    def batches(self, epoch: int, info: DistInfo) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        c = self.config
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + epoch)
        for _ in range(c.steps_per_epoch):
            clean = sample_patches(self.images, c.batch_size, c.patch, gen)
            u = torch.rand(c.batch_size, generator=gen)
            sigma = (c.sigma_min + (c.sigma_max - c.sigma_min) * u) / 255.0  # (B,)
            noisy = add_noise(clean, sigma, gen)
            move = {"device": self.device, "dtype": self.dtype}
            yield noisy.to(**move), sigma.to(**move), clean.to(**move)

    def train_step(self, net: nn.Module, model: nn.Module, batch: Any) -> StepOutput:
        noisy, sigma, clean = batch
        estimate = net(noisy, sigma)
        loss = F.mse_loss(estimate, clean)
        if self.config.jac_reg:
            sol = model.deq.last_solution
            loss = loss + self.config.jac_reg * sol.jacobian_penalty()
        return StepOutput(loss, (estimate.detach(), clean))

    def step_metrics(
        self, model: nn.Module, batch: Any, out: StepOutput
    ) -> tuple[dict[str, float], dict[str, Any]]:
        estimate, clean = out.outputs
        values: dict[str, Any] = {
            "train_loss": float(F.mse_loss(estimate, clean)),
            "train_psnr": float(psnr(estimate, clean).mean()),
        }
        if isinstance(model, DEQDenoiser):
            sol = model.deq.last_solution
            values["fwd_iters"] = sol.nstep
            values["fwd_res"] = float(sol.residual.max())
            if self.config.backward == "implicit":
                values["bwd_iters"] = float(sol.backward.nstep or 0)
            else:
                values["bwd_iters"] = float(self.config.phantom_steps)
        return {}, values

    def epoch_metrics(self, sums: dict[str, float], values: dict[str, list[Any]]) -> dict:
        out: dict[str, Any] = {
            "train_loss": statistics.fmean(values["train_loss"]),
            "train_psnr": statistics.fmean(values["train_psnr"]),
        }
        if "fwd_iters" in values:
            out["fwd_iters_mean"] = statistics.fmean(values["fwd_iters"])
            out["fwd_residual_max"] = max(values["fwd_res"])
            out["bwd_iters_mean"] = statistics.fmean(values["bwd_iters"])
        return out

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        clean, noisy = self.test
        sigma = torch.tensor([self.config.test_sigma / 255.0], device=self.device)
        values, iters, residuals = [], [], []
        for c, y in zip(clean, noisy):
            values.append(float(psnr(model(y, sigma.to(y)), c)))
            if isinstance(model, DEQDenoiser):
                sol = model.deq.last_solution
                iters.append(sol.nstep)
                residuals.append(float(sol.residual.max()))
        result: dict[str, Any] = {
            "test_psnr": statistics.fmean(values),
            **{f"test_psnr_{name}": v for name, v in zip(self.test_names, values)},
            "params": sum(p.numel() for p in model.parameters()),
        }
        if iters:
            result["eval_iters"] = max(iters)
            result["eval_residual_max"] = max(residuals)
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"non-finite held-out PSNR {values}")
        return result

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.config.model, "color": self.config.color}

    def describe(self, s: dict[str, Any]) -> list[str]:
        line = f"{s['model']} denoiser, {s['params']:,} parameters"
        if s.get("eval_iters") is not None:
            line += (
                f"; held-out solve: {s['eval_iters']} iterations, largest relative residual "
                f"{s['eval_residual_max']:.1e} (tol {self.config.eval_tol:g})"
            )
        return [line]

    def describe_eval(self, r: dict[str, Any]) -> list[str]:
        return [
            f"PSNR per held-out image at sigma {r['test_sigma']:g}: "
            + ", ".join(f"{k[10:]} {v:.2f}" for k, v in r.items() if k.startswith("test_psnr_"))
        ]
