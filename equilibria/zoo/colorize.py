"""Reference-based line-art colorization: SCFT-style attention vs stop-gradient attention (SGA).

A sample is the line art of a crop of one of scikit-image's bundled photographs, a colour
reference (the same crop, colour-jittered and warped) and the colour crop as the target (see
:mod:`equilibria.zoo.colorize_data`; the test crops come from photographs never seen in
training). A small encoder–decoder fuses line-art and reference features with cross-attention
(:mod:`equilibria.zoo.colorize_model`): SCFT's standard attention block, SGA's cross and self
blocks, or those blocks with learned, differentiable maps. Training crops are recoloured (a
random hue rotation of target and reference alike), so the colours must come from the reference.
The loss is L1 reconstruction only: the paper's perceptual and style losses (and its GAN loss)
need pretrained VGG-19 weights, not available here. Every
step logs the gradient conflict at the fusion block (cosine between the gradient reaching the
block's input through the attention map and through the skip path; see
:mod:`equilibria.zoo.colorize_model`).

Usage::

    equilibria train colorize --attention sga --seed 0
    equilibria train colorize --attention standard --seed 0
    equilibria sweep colorize --run-dir runs/colorize-table        # every variant x 3 seeds

Reference: Z. Li, Z. Geng, Z. Kang, W. Chen, Y. Yang, "Eliminating Gradient Conflict in
Reference-based Line-Art Colorization", ECCV 2022.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from equilibria._validate import check_int

from . import trainer
from .colorize_data import (
    TEST_IMAGES,
    TRAIN_IMAGES,
    VALIDATION_IMAGES,
    Samples,
    load_images,
    make_samples,
)
from .colorize_model import Colorizer, psnr, ssim
from .config import ConfigError, check_range, option
from .distributed import DistInfo
from .task import (
    STEP_MS,
    TRAIN_LOSS,
    Metric,
    NumpyStreamTask,
    Plot,
    RunOptions,
    Schedule,
    StepOutput,
)

__all__ = ["VARIANTS", "ColorizeConfig", "ColorizeTask", "evaluate_samples", "train"]

_TEST_SEED = 20_000  # the test crops are the same for every run
_MAX_PIXELS = 2**22  # the most pixels of one draw (the test set or a batch): about 250 MB


@dataclass(frozen=True)
class ColorizeConfig(RunOptions):
    """Options of one colorization run (each is an option ``--name-with-dashes``), validated on
    construction: a wrong type or value raises :class:`ConfigError` naming the option."""

    attention: Literal["standard", "sga", "learned_map"] = option(
        "sga",
        "fusion: 'standard' (SCFT's block: learned Q/K/V, softmax, residual), 'sga' (stop-gradient "
        "attention: a cross and a self block, as the paper's code) or 'learned_map' (SGA's blocks "
        "with learned Q/K and the maps' gradient)",
    )
    seed: int = option(0, "seed of the initialisation and of the training crops")
    size: int = option(32, "side of a crop in pixels (a multiple of 4)")
    channels: int = option(32, "channels C of the fused tokens")
    width: int = option(16, "channels of the encoders' first stage")
    steps: int = option(1200, "optimisation steps (each on a fresh batch of crops)")
    batch_size: int = option(16, "crops per step")
    lr: float = option(2e-3, "peak learning rate of AdamW (cosine decay after a short warm-up)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    jitter: float = option(
        0.1, "largest relative change of the reference's brightness and channel gains"
    )
    recolour: bool = option(
        True,
        "rotate the hue of each training crop (target and reference alike) by a random angle, "
        "so that colours must be read from the reference (the test crops keep their colours)",
    )
    test_samples: int = option(256, "crops of the held-out photographs in the test set")
    eval_every: int = option(
        200, "optimisation steps per epoch: the test set is evaluated and a checkpoint written"
    )
    probe: bool = option(True, "log the gradient conflict at the fusion block every step")
    post_blocks: int = option(
        0,
        "residual blocks after the fusion, their output concatenated with the fusion's before "
        "the decoder (SGA's code: 4); 0: the fusion's output goes straight to the decoder",
    )
    multi_level: bool = option(
        False,
        "fuse tokens made of every encoder stage's features, pooled to the token grid and "
        "concatenated (SGA's code); off: the encoders' last stage only",
    )
    validation: bool = option(
        False,
        "tuning split: train without the photographs VALIDATION_IMAGES ('rocket') and score "
        "crops of them instead of the held-out test photographs",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        bounds = {
            "seed": (0, 2**32 - 1),  # numpy's seed range
            "size": (16, 80),  # the warped window (2 x size) must fit the 160-pixel images
            "channels": (4, 512),
            "width": (2, 256),
            "steps": (1, 10**7),
            "batch_size": (1, 4096),
            "test_samples": (1, 20_000),
            "eval_every": (1, 10**7),
            "post_blocks": (0, 16),
            "threads": (0, 256),
        }
        for name, (low, high) in bounds.items():
            check_range(self, name, low=low, high=high)
        if self.size % 4:
            raise ConfigError(f"ColorizeConfig: size must be a multiple of 4, got {self.size}")
        for name in ("test_samples", "batch_size"):  # drawn at once, ~60 bytes a pixel
            most = _MAX_PIXELS // self.size**2
            if getattr(self, name) > most:
                raise ConfigError(
                    f"ColorizeConfig: {name} must be <= {most} for size={self.size} (at most "
                    f"{_MAX_PIXELS:,} pixels drawn at once), got {getattr(self, name)}"
                )
        check_range(self, "lr", low=0, low_open=True)
        check_range(self, "weight_decay", low=0)
        check_range(self, "jitter", low=0, high=0.5)


VARIANTS: dict[str, dict[str, Any]] = {
    "standard (SCFT)": {"attention": "standard"},
    "SGA": {"attention": "sga"},
    "SGA blocks, learned map": {"attention": "learned_map"},
}


def evaluate_samples(model: nn.Module, samples: Samples, batch_size: int = 128) -> dict[str, Any]:
    """Mean PSNR (dB), SSIM and L1 of ``model``'s colorizations of ``samples`` (eval mode), and
    the entropy of its cross-attention rows relative to a uniform map (1: every line-art token
    reads the reference's mean; see :meth:`~equilibria.zoo.colorize_model.Colorizer.map_entropy`).

    Args:
        model: a :class:`~equilibria.zoo.colorize_model.Colorizer`.
        samples: at least one sample.
        batch_size: samples colorized at once (an int >= 1; the scores do not depend on it).
    """
    check_int("batch_size", batch_size, minimum=1)
    if len(samples.target) == 0:
        raise ValueError("samples must hold at least one sample, got 0")
    model.eval()
    p, s, l1, h = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(samples.target), batch_size):
            part = slice(start, start + batch_size)
            out = model(samples.line[part], samples.reference[part])
            target = samples.target[part]
            p.append(psnr(out, target))
            s.append(ssim(out, target))
            l1.append((out - target).abs().flatten(1).mean(1))
            h.append(model.map_entropy(samples.line[part], samples.reference[part]))
    return {
        "psnr": float(torch.cat(p).mean()),
        "ssim": float(torch.cat(s).mean()),
        "test_l1": float(torch.cat(l1).mean()),
        "map_entropy": float(torch.cat(h).mean()),
    }


class ColorizeTask(NumpyStreamTask):
    """The colorize recipe for :func:`equilibria.zoo.trainer.train`: an epoch is ``eval_every``
    steps, each on a fresh batch drawn from one seeded stream (its state is checkpointed)."""

    name = "colorize"
    config_class = ColorizeConfig
    headline = Metric("psnr", "PSNR (dB)", fmt=".2f")
    table_metrics = (
        Metric("ssim", "SSIM", fmt=".4f"),
        Metric("map_entropy", "map entropy / log M", higher_is_better=False, fmt=".3f"),
        Metric("conflict_x", "cos(map, skip) on X", higher_is_better=True, fmt=".3f"),
        Metric("probe_conflict_x", "cos(map*, skip) on X", higher_is_better=True, fmt=".3f"),
        STEP_MS,
        Metric("params", "params", higher_is_better=False, fmt=",.0f"),
    )
    epoch_columns = (
        TRAIN_LOSS,
        Metric("psnr", "PSNR", fmt=".2f"),
        Metric("ssim", "SSIM", fmt=".4f"),
        Metric("conflict_x", "cos X", fmt=".3f"),
        Metric("probe_conflict_x", "cos* X", fmt=".3f"),
        Metric("conflict_y", "cos Y", fmt=".3f"),
        STEP_MS,
    )
    plots = (
        Plot("loss", "training loss", "L1", (("train_loss", "train"), ("test_l1", "test")),
             log=True),
        Plot("quality", "held-out PSNR", "dB", (("psnr", "PSNR"), ("reference_psnr",
             "copy the reference"))),
        Plot("conflict", "gradient conflict at the fusion block", "mean token cosine",
             (("conflict_x", "X: map vs skip"), ("probe_conflict_x", "X: map (probe) vs skip"),
              ("conflict_y", "Y: map vs value"))),
    )  # fmt: skip
    variants = VARIANTS
    # options added after runs were saved (98b8648), at the design those runs were trained with:
    # --resume, evaluation and sweeps read a saved config that lacks them as these
    record_defaults: ClassVar[dict[str, Any]] = {"post_blocks": 0, "multi_level": False}
    extras = ("skimage", "scipy", "safetensors")

    def setup(self, device: torch.device) -> None:
        c = self.config
        if c.validation:  # tuning: a training photograph is held out and scored instead
            train_names = tuple(n for n in TRAIN_IMAGES if n not in VALIDATION_IMAGES)
            test_names = VALIDATION_IMAGES
        else:
            train_names, test_names = TRAIN_IMAGES, TEST_IMAGES
        self.train_images = load_images(train_names)
        test_images = load_images(test_names)
        self.test = make_samples(np.random.default_rng(_TEST_SEED), test_images,
                                 c.test_samples, size=c.size, jitter=c.jitter)  # fmt: skip
        self.reference_psnr = float(psnr(self.test.reference, self.test.target).mean())
        self.rng = np.random.default_rng(c.seed)  # the training crops, one stream

    def build_model(self) -> nn.Module:
        c = self.config
        return Colorizer(c.attention, channels=c.channels, width=c.width,
                         post_blocks=c.post_blocks, multi_level=c.multi_level)  # fmt: skip

    def schedule(self) -> Schedule:
        c = self.config
        epochs = -(-c.steps // c.eval_every)
        return Schedule(epochs, c.eval_every, max(1, c.steps // 20), total=c.steps)

    def batches(self, epoch: int, info: DistInfo) -> Iterator[Samples]:
        c = self.config
        for _ in range(self.schedule().steps_in(epoch)):
            yield make_samples(self.rng, self.train_images, c.batch_size, size=c.size,
                               jitter=c.jitter, recolour=c.recolour)  # fmt: skip

    def train_step(self, net: nn.Module, model: nn.Module, batch: Any) -> StepOutput:
        out = net(batch.line, batch.reference, probe=self.config.probe)
        return StepOutput(F.l1_loss(out, batch.target))

    def step_metrics(
        self, model: nn.Module, batch: Any, out: StepOutput
    ) -> tuple[dict[str, float], dict[str, Any]]:
        values: dict[str, Any] = {"train_loss": float(out.loss.detach())}
        if self.config.probe:
            values.update(model.conflict())  # type: ignore[operator]
        return {}, values

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        return {**evaluate_samples(model, self.test), "reference_psnr": self.reference_psnr}

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        return {"attention": self.config.attention}

    def describe(self, s: dict[str, Any]) -> list[str]:
        text = f"SSIM {s['ssim']:.4f}; copying the reference scores {s['reference_psnr']:.2f} dB"
        if s.get("conflict_x") is not None:
            text += (
                f"; gradient conflict at the fusion block (last epoch): cos(map, skip) on X "
                f"{s['conflict_x']:.3f}, the map's unstopped gradient {s['probe_conflict_x']:.3f}"
            )
        return [text]

    def describe_eval(self, r: dict[str, Any]) -> list[str]:
        return [f"SSIM {r['ssim']:.4f}, L1 {r['test_l1']:.4f}"]


def train(
    config: ColorizeConfig, *, on_epoch_end: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Train one colorization model with :func:`equilibria.zoo.trainer.train` (see there)."""
    return trainer.train(ColorizeTask(config), on_epoch_end=on_epoch_end)
