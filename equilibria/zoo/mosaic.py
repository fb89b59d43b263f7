"""Mosaic segmentation: a recipe where every pixel's label depends on the whole canvas.

A canvas is a grid of scikit-learn digits (8×8 each, embedded in scikit-learn, no download; see
:mod:`equilibria.zoo.mosaic_data`). One digit, the *key*, is marked in a second input channel.
Each pixel is labelled 0 (background), 1 (stroke of a digit of the key's class) or 2 (stroke of a
digit of another class). A convolutional network sees only a neighbourhood, so it cannot tell 1
from 2 when the key is far away; a global-context block (self-attention or a Hamburger) can. The
variants compare a conv-only network with the same network plus SDPA self-attention or a
Hamburger (NMF with the paper's one-step gradient, with the JFB gradient through both factors, with
the phantom gradient through the last two updates plus the initialisation's gradient, and with
BPTT; VQ, CD) by mIoU.

Usage::

    equilibria train mosaic --block ham --ham nmf --seed 0       # a run folder, resumable
    equilibria eval runs/mosaic/<run>
    equilibria sweep mosaic --run-dir runs/mosaic-table            # every variant x 3 seeds

Reference for the Hamburger: Geng et al., "Is Attention Better Than Matrix Decomposition?",
ICLR 2021.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equilibria.layers import Hamburger

from . import trainer
from .config import ConfigError, check_range, option
from .distributed import DistInfo
from .mosaic_data import _DIGIT, Canvases, _digit_pools, make_canvases
from .sweep import SweepResult, sweep_folder
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

__all__ = [
    "VARIANTS",
    "Canvases",
    "MosaicConfig",
    "MosaicNet",
    "MosaicTask",
    "compare",
    "make_canvases",
    "segmentation_metrics",
    "train",
]

NUM_CLASSES = 3  # background, same class as the key, other class
CLASS_NAMES = ("background", "match", "other")  # for "majority": majority, minority
_TEST_SEED = 10_000  # the test canvases are the same for every run
# the most test-set pixels (test_canvases x (8 grid)^2) a config may ask for: they are built at
# once, about 42 bytes a pixel while drawn (2.8 GB at this bound; 10**6 canvases of grid 8, allowed
# before, would take 170 GB), so neither an option nor a crafted saved config asks for more
_MAX_TEST_PIXELS = 2**26


@dataclass(frozen=True)
class MosaicConfig(RunOptions):
    """Options of one mosaic-segmentation run (each is an option ``--name-with-dashes``).

    Validated on construction with the shared checks of :mod:`equilibria.zoo.config`: a wrong type
    or value raises :class:`ConfigError` naming the option, the value and what is allowed.
    """

    task: Literal["key", "majority"] = option(
        "key",
        "'key' (label 1: same class as the marked key digit, 2: another class) or 'majority' "
        "(two classes per canvas; label 1: the more frequent one, 2: the other)",
    )
    block: Literal["conv", "attention", "ham"] = option(
        "ham",
        "global-context block after the conv stem: 'conv' (a 3x3 conv, no global context), "
        "'attention' (single-head SDPA self-attention) or 'ham' (Hamburger)",
    )
    ham: Literal["nmf", "vq", "cd"] = option("nmf", "decomposition of the Hamburger (block 'ham')")
    grad: Literal["one_step", "jfb", "phantom", "unrolled", "bptt"] = option(
        "one_step",
        "gradient of the Hamburger: 'one_step' (the paper's: last coefficient update, bases held "
        "constant), 'jfb' (last update of bases and coefficients from the detached iterate), "
        "'phantom' (the last --grad-steps updates) or 'unrolled' (every step; 'bptt' is an alias)",
    )
    grad_steps: int = option(1, "recorded decomposition updates of --grad phantom")
    grad_init: bool = option(
        False,
        "NMF with --grad jfb or phantom: keep the gradient of the initial coefficients through "
        "the no-grad updates (their multiplicative ratios held constant)",
    )
    ham_init: Literal["random", "online"] = option(
        "random", "initial bases of the Hamburger: random per sample or online"
    )
    seed: int = option(0, "seed of the initialisation and of the training canvases")
    grid: int = option(4, "the canvas holds grid x grid cells of 8x8 pixels")
    channels: int = option(32, "width of the network")
    rank: int = option(16, "rank of the Hamburger's decomposition (<= channels)")
    ham_train_steps: int = option(6, "decomposition steps in training")
    ham_eval_steps: int = option(7, "decomposition steps in evaluation")
    steps: int = option(1500, "optimisation steps (each on a fresh batch of canvases)")
    batch_size: int = option(16, "canvases per step")
    lr: float = option(3e-3, "peak learning rate of AdamW (cosine decay after a short warm-up)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    occupancy: float = option(0.75, "probability that a cell holds a digit")
    match_prob: float = option(0.5, "probability that a non-key digit has the key's class")
    test_canvases: int = option(500, "canvases in the (fixed) test set")
    aux_weight: float = option(
        0.4,
        "weight of an auxiliary loss (digit class of every stroke pixel, from a 1x1 head on the "
        "stem features; training only, every variant alike); 0 disables it",
    )
    eval_every: int = option(
        250,
        "optimisation steps per epoch: the test canvases are evaluated and a checkpoint "
        "written after each",
    )
    threads: int = option(
        2,
        "torch CPU threads (0 = torch's default); a CPU run resumes only with the thread count "
        "it was trained with, which changes the numbers",
        resumable=True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        bounds = {
            "grid": (2, 8),
            "channels": (4, 1024),
            "rank": (1, self.channels),
            "ham_train_steps": (0, 100),
            "ham_eval_steps": (0, 100),
            "grad_steps": (1, 100),
            "steps": (1, 10**7),
            "batch_size": (2, 4096),
            "test_canvases": (1, 10**6),
            "eval_every": (1, 10**7),
            "threads": (0, 256),
            "seed": (0, 2**32 - 1),  # numpy's seed range
        }
        for name, (low, high) in bounds.items():
            check_range(self, name, low=low, high=high)
        most = _MAX_TEST_PIXELS // (self.grid * _DIGIT) ** 2
        if self.test_canvases > most:
            raise ConfigError(
                f"MosaicConfig: test_canvases must be <= {most} for grid={self.grid} (at most "
                f"{_MAX_TEST_PIXELS:,} test pixels, built at once), got {self.test_canvases}"
            )
        positions = (self.grid * _DIGIT // 2) ** 2
        if self.rank > positions:
            raise ConfigError(
                f"MosaicConfig: rank must be <= {positions} (the positions of the context block "
                f"for grid={self.grid}), got {self.rank}"
            )
        if (
            self.block == "ham"
            and self.grad_init
            and (self.ham != "nmf" or self.grad not in ("jfb", "phantom"))
        ):
            raise ConfigError(
                f"MosaicConfig: grad_init applies to ham 'nmf' with grad 'jfb' or 'phantom', got "
                f"ham={self.ham!r}, grad={self.grad!r}"
            )
        if self.block == "ham" and self.grad_steps != 1 and self.grad != "phantom":
            raise ConfigError(
                f"MosaicConfig: grad_steps applies to grad 'phantom', got grad={self.grad!r} "
                f"with grad_steps={self.grad_steps}"
            )
        check_range(self, "lr", low=0, low_open=True)
        check_range(self, "weight_decay", low=0)
        check_range(self, "aux_weight", low=0)
        check_range(self, "occupancy", low=0, high=1, low_open=True)
        check_range(self, "match_prob", low=0, high=1)


# ---------------------------------------------------------------------------------------------
# Models.


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class AttentionBlock(nn.Module):
    """Global self-attention block, ReLU(x + BN(W_o · SDPA(W_q x, W_k x, W_v x))), one head."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).mT  # (B, n, C)
        # (3, B, 1, n, C): a head dimension lets SDPA use its fused CPU kernel
        q, k, v = self.qkv(tokens).unflatten(-1, (3, 1, channels)).permute(2, 0, 3, 1, 4)
        y = self.out(F.scaled_dot_product_attention(q, k, v).squeeze(1))  # (B, n, C)
        y = y.mT.reshape(batch, channels, height, width)
        return F.relu(x + self.norm(y))


class MosaicNet(nn.Module):
    """Conv stem (stride 2) → global-context block → conv head → upsampling with an input skip.

    The context block sees n = (H/2)·(W/2) positions (256 for the default 32×32 canvas). Without
    it the receptive field is 19 pixels, a bit over two cells of the 4×4 grid.
    """

    def __init__(self, config: MosaicConfig) -> None:
        super().__init__()
        width = config.channels
        self.stem = nn.Sequential(
            _conv_bn_relu(2, width), _conv_bn_relu(width, width, 2), _conv_bn_relu(width, width)
        )
        if config.block == "conv":
            self.context: nn.Module = _conv_bn_relu(width, width)
        elif config.block == "attention":
            self.context = AttentionBlock(width)
        else:
            self.context = Hamburger(
                width,
                ham=config.ham,
                dim=width,
                rank=config.rank,
                train_steps=config.ham_train_steps,
                eval_steps=config.ham_eval_steps,
                grad=config.grad,
                grad_steps=config.grad_steps,
                grad_init=config.grad_init,
                init=config.ham_init,
            )
        self.head = _conv_bn_relu(width, width)
        self.refine = nn.Sequential(
            nn.Conv2d(width + 2, width // 2, 3, padding=1), nn.ReLU(inplace=True)
        )
        self.classify = nn.Conv2d(width // 2, NUM_CLASSES, 1)
        # digit class of each pixel, auxiliary head on the stem (training only)
        self.aux = nn.Conv2d(width, 10, 1) if config.aux_weight > 0 else None

    def forward(self, x: Tensor, *, aux: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x: (B, 2, H, W) → logits (B, 3, H, W), and the auxiliary (B, 10, H, W) if ``aux``."""
        size = x.shape[-2:]
        stem = self.stem(x)  # (B, C, H/2, W/2)
        h = F.interpolate(self.head(self.context(stem)), size=size, mode="bilinear")
        logits = self.classify(self.refine(torch.cat([h, x], dim=1)))
        if not aux or self.aux is None:
            return logits
        return logits, F.interpolate(self.aux(stem), size=size, mode="bilinear")


def block_macs(config: MosaicConfig) -> int:
    """Analytic multiply-accumulates of the context block's forward pass, per canvas."""
    n = (config.grid * _DIGIT // 2) ** 2
    c, r, k = config.channels, config.rank, config.ham_train_steps
    if config.block == "conv":
        return 9 * c * c * n
    if config.block == "attention":
        return 4 * n * c * c + 2 * n * n * c  # q, k, v, out projections + QKᵀ + AV
    breads = n * c * c + c * c * r + n * c * r  # lower bread; upper bread on the factors
    if config.ham == "nmf":
        return breads + k * (2 * n * c * r + 2 * n * r * r + 2 * c * r * r) + n * c * r + n * r * r
    return breads + k * 2 * n * c * r + n * c * r + (c * r * r if config.ham == "cd" else 0)


# ---------------------------------------------------------------------------------------------
# Evaluation.


def segmentation_metrics(
    model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 250
) -> dict[str, Any]:
    """Per-class IoU, mIoU and pixel accuracy of ``model`` (in eval mode) on a fixed set."""
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            pred = model(inputs[start : start + batch_size]).argmax(1)
            truth = targets[start : start + batch_size]
            confusion += torch.bincount(
                (truth * NUM_CLASSES + pred).flatten(), minlength=NUM_CLASSES**2
            ).view(NUM_CLASSES, NUM_CLASSES)
    tp = confusion.diag().double()
    iou = tp / (confusion.sum(0) + confusion.sum(1) - confusion.diag()).double().clamp_min(1)
    return {
        "miou": float(iou.mean()),
        "iou": {name: float(v) for name, v in zip(CLASS_NAMES, iou)},
        **{f"iou_{name}": float(v) for name, v in zip(CLASS_NAMES, iou)},
        "pixel_acc": float(tp.sum() / confusion.sum()),
    }


# ---------------------------------------------------------------------------------------------
# The recipe on the trainer.

VARIANTS: dict[str, dict[str, Any]] = {
    "conv only": {"block": "conv"},
    "+ attention (SDPA)": {"block": "attention"},
    "+ Ham NMF, one-step": {"block": "ham", "ham": "nmf", "grad": "one_step"},
    "+ Ham NMF, BPTT": {"block": "ham", "ham": "nmf", "grad": "unrolled"},
    "+ Ham NMF, JFB": {"block": "ham", "ham": "nmf", "grad": "jfb"},
    "+ Ham NMF, JFB + init": {"block": "ham", "ham": "nmf", "grad": "jfb", "grad_init": True},
    "+ Ham NMF, phantom(2)": {"block": "ham", "ham": "nmf", "grad": "phantom", "grad_steps": 2},
    "+ Ham NMF, phantom(2) + init": {
        "block": "ham",
        "ham": "nmf",
        "grad": "phantom",
        "grad_steps": 2,
        "grad_init": True,
    },
    "+ Ham VQ, one-step": {"block": "ham", "ham": "vq", "grad": "one_step"},
    "+ Ham CD, one-step": {"block": "ham", "ham": "cd", "grad": "one_step"},
}


class MosaicTask(NumpyStreamTask):
    """The mosaic recipe for :func:`equilibria.zoo.trainer.train`: an epoch is ``eval_every``
    steps, each on a fresh batch drawn from one seeded stream (its state is checkpointed)."""

    name = "mosaic"
    config_class = MosaicConfig
    headline = Metric("miou", "mIoU", percent=True)
    table_metrics = (
        Metric("iou_match", "IoU match", percent=True),
        Metric("iou_other", "IoU other", percent=True),
        STEP_MS,
        Metric("block_mmacs", "block MMACs", higher_is_better=False, fmt=".2f"),
        Metric("params", "params", higher_is_better=False, fmt=",.0f"),
    )
    epoch_columns = (
        TRAIN_LOSS,
        Metric("miou", "mIoU", percent=True),
        Metric("iou_match", "IoU match", percent=True),
        Metric("iou_other", "IoU other", percent=True),
        Metric("pixel_acc", "pixel acc.", percent=True),
        STEP_MS,
    )
    plots = (
        Plot("loss", "training loss", "cross-entropy", (("train_loss", "train"),), log=True),
        Plot("miou", "test IoU", "IoU (fraction)",
             (("miou", "mIoU"), ("iou_match", "match"), ("iou_other", "other"))),
    )  # fmt: skip
    variants = VARIANTS
    extras = ("sklearn", "safetensors")

    def setup(self, device: torch.device) -> None:
        c = self.config
        train_images, train_labels, test_images, test_labels = _digit_pools()
        self.pool = (train_images, train_labels)
        self.canvas = {"grid": c.grid, "occupancy": c.occupancy, "match_prob": c.match_prob,
                       "task": c.task}  # fmt: skip
        test = make_canvases(np.random.default_rng(_TEST_SEED), test_images, test_labels,
                             c.test_canvases, **self.canvas)  # fmt: skip
        self.test = (torch.from_numpy(test.inputs), torch.from_numpy(test.targets))
        self.rng = np.random.default_rng(c.seed)  # the training canvases, one stream

    def build_model(self) -> nn.Module:
        return MosaicNet(self.config)

    def schedule(self) -> Schedule:
        c = self.config
        epochs = -(-c.steps // c.eval_every)
        return Schedule(epochs, c.eval_every, max(1, c.steps // 20), total=c.steps)

    def batches(self, epoch: int, info: DistInfo) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for _ in range(self.schedule().steps_in(epoch)):
            b = make_canvases(self.rng, *self.pool, self.config.batch_size, **self.canvas)
            yield (
                torch.from_numpy(b.inputs),
                torch.from_numpy(b.targets),
                torch.from_numpy(b.digits),
            )

    def train_step(self, net: nn.Module, model: nn.Module, batch: Any) -> StepOutput:
        x, y, digits = batch
        if not self.config.aux_weight:
            return StepOutput(F.cross_entropy(net(x), y))
        logits, aux = net(x, aux=True)
        aux_loss = F.cross_entropy(aux, digits, ignore_index=-1)
        return StepOutput(F.cross_entropy(logits, y) + self.config.aux_weight * aux_loss)

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        return segmentation_metrics(model, *self.test)

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        return {
            "iou": last.get("iou"),
            "block_mmacs": block_macs(self.config) / 1e6,
            "ms_per_step": last.get("step_ms"),
        }

    def describe(self, s: dict[str, Any]) -> list[str]:
        iou = ", ".join(f"{n} {100 * s[f'iou_{n}']:.1f}%" for n in CLASS_NAMES)
        ms = "–" if s.get("step_ms") is None else f"{s['step_ms']:.1f}"
        text = f"IoU {iou}; pixel accuracy {100 * s['pixel_acc']:.2f}%; context block "
        return [text + f"{s['block_mmacs']:.2f} MMACs per canvas; {ms} ms per step"]

    def describe_eval(self, r: dict[str, Any]) -> list[str]:
        return [", ".join(f"IoU {n} {100 * r[f'iou_{n}']:.1f}%" for n in CLASS_NAMES)]


def train(
    config: MosaicConfig, *, on_epoch_end: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Train one mosaic model with :func:`equilibria.zoo.trainer.train` (see there)."""
    return trainer.train(MosaicTask(config), on_epoch_end=on_epoch_end)


def compare(
    out: Path | str,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    variants: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
) -> SweepResult:
    """Every variant for every seed on the sweep runner (``equilibria sweep mosaic``); writes
    ``sweep.md`` and ``sweep.json`` in ``out``.

    Args:
        out: the sweep's folder (new or empty, unless ``resume``).
        seeds: seeds of the runs.
        variants: names from :data:`VARIANTS` (default: all).
        overrides: config fields applied to every run (e.g. ``{"steps": 500}``).
        resume: continue an interrupted comparison in ``out``.
    """
    return sweep_folder(
        MosaicTask, out, seeds=seeds, variants=variants, overrides=overrides, resume=resume
    )
