"""Mosaic segmentation: a recipe where every pixel's label depends on the whole canvas.

A canvas is a grid of scikit-learn digits (8×8 each, embedded in scikit-learn, no download). One
digit, the *key*, is marked in a second input channel. Each pixel is labelled

* 0 — background,
* 1 — stroke of a digit of the same class as the key (the key included),
* 2 — stroke of a digit of another class.

A convolutional network sees only a neighbourhood, so it cannot tell 1 from 2 when the key is far
away; a global-context block (self-attention or a Hamburger) can. The recipe compares a conv-only
network with the same network plus SDPA self-attention or a Hamburger (NMF with one-step gradient,
NMF with BPTT, VQ, CD), over several seeds, and reports mIoU and training time per step.

Usage::

    python -m equilibria.zoo.mosaic train --block ham --ham nmf --seed 0
    python -m equilibria.zoo.mosaic compare --out runs/mosaic

Reference for the Hamburger: Geng et al., "Is Attention Better Than Matrix Decomposition?",
ICLR 2021.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equilibria.layers import Hamburger

from .config import (
    ConfigError,
    add_arguments,
    check_fields,
    check_range,
    from_dict,
    option,
)
from .runs import require_extras, require_new_folder, write_json, write_text

__all__ = [
    "VARIANTS",
    "MosaicConfig",
    "MosaicNet",
    "compare",
    "evaluate",
    "main",
    "make_canvases",
    "train",
]

Ham = Literal["nmf", "vq", "cd"]
Task = Literal["key", "majority"]
NUM_CLASSES = 3  # background, same class as the key, other class
CLASS_NAMES = ("background", "match", "other")  # for "majority": majority, minority
_DIGIT = 8  # side of a scikit-learn digit
_STROKE = 0.25  # intensity above which a pixel is a stroke
_TEST_SEED = 10_000  # the test canvases are the same for every run
_SPLIT_SEED = 1234  # which digit images are used for training and which for testing


@dataclass(frozen=True)
class MosaicConfig:
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
    grad: Literal["one_step", "bptt"] = option("one_step", "gradient of the Hamburger")
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
    threads: int = option(2, "torch CPU threads")

    def __post_init__(self) -> None:
        check_fields(self)
        bounds = {
            "grid": (2, 8),
            "channels": (4, 1024),
            "rank": (1, self.channels),
            "ham_train_steps": (0, 100),
            "ham_eval_steps": (0, 100),
            "steps": (1, 10**7),
            "batch_size": (2, 4096),
            "test_canvases": (1, 10**6),
            "threads": (1, 256),
            "seed": (0, 2**32 - 1),  # numpy's seed range
        }
        for name, (low, high) in bounds.items():
            check_range(self, name, low=low, high=high)
        positions = (self.grid * _DIGIT // 2) ** 2
        if self.rank > positions:
            raise ConfigError(
                f"MosaicConfig: rank must be <= {positions} (the positions of the context block "
                f"for grid={self.grid}), got {self.rank}"
            )
        check_range(self, "lr", low=0, low_open=True)
        check_range(self, "weight_decay", low=0)
        check_range(self, "aux_weight", low=0)
        check_range(self, "occupancy", low=0, high=1, low_open=True)
        check_range(self, "match_prob", low=0, high=1)


# ---------------------------------------------------------------------------------------------
# Data.


def _digit_pools() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits in [0, 1], split once into training and test images (2:1)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
    cut = 2 * len(images) // 3
    train, test = order[:cut], order[cut:]
    return images[train], digits.target[train], images[test], digits.target[test]


class Canvases(NamedTuple):
    """A batch of canvases.

    Attributes:
        inputs: (count, 2, H, W) float32: the digits and the key mask.
        targets: (count, H, W) int64 segmentation labels in {0, 1, 2}.
        digits: (count, H, W) int64 digit class (0–9) of each stroke pixel, -1 elsewhere; the
            target of the optional auxiliary head.
    """

    inputs: np.ndarray
    targets: np.ndarray
    digits: np.ndarray


def make_canvases(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    *,
    grid: int,
    occupancy: float,
    match_prob: float,
    task: Task = "key",
) -> Canvases:
    """Draws ``count`` canvases.

    Args:
        rng: numpy random generator.
        images: digit images (N, 8, 8) in [0, 1].
        labels: their classes (N,).
        count: number of canvases.
        grid: cells per side.
        occupancy: probability that a cell holds a digit (the key's cell always does).
        match_prob: probability that a non-key digit has the key's class.
        task: ``"key"``, or ``"majority"``: two classes per canvas, ``round(occupancy · cells)``
            digits split as unevenly as ⌊m/2⌋+1 or +2 vs the rest, the mask channel left empty,
            labels 1 for the majority class and 2 for the minority.

    Returns:
        :class:`Canvases` of side 8·grid.
    """
    cells = grid * grid
    if task == "majority":
        return _majority_canvases(rng, images, labels, count, grid=grid, occupancy=occupancy)
    key_class = rng.integers(0, 10, count)
    other = (key_class[:, None] + rng.integers(1, 10, (count, cells))) % 10
    classes = np.where(rng.random((count, cells)) < match_prob, key_class[:, None], other)
    occupied = rng.random((count, cells)) < occupancy
    key_cell = rng.integers(0, cells, count)
    rows = np.arange(count)
    occupied[rows, key_cell] = True
    classes[rows, key_cell] = key_class
    index = _sample_images(rng, labels, classes)
    key_mask = np.zeros((count, cells), dtype=np.float32)
    key_mask[rows, key_cell] = 1.0
    cell_label = np.where(classes == key_class[:, None], 1, 2)  # (count, cells)
    return _render(images[index] * occupied[..., None, None], key_mask, cell_label, classes, grid)


def _sample_images(rng: np.random.Generator, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Index of a random image of each requested class, same shape as ``classes``."""
    index = np.empty(classes.shape, dtype=np.int64)
    for c in range(10):
        where = classes == c
        index[where] = rng.choice(np.flatnonzero(labels == c), int(where.sum()))
    return index


def _render(
    cell_images: np.ndarray,
    cell_mask: np.ndarray,
    cell_label: np.ndarray,
    cell_class: np.ndarray,
    grid: int,
) -> Canvases:
    """Tiles (count, cells, 8, 8) digits into canvases; strokes get their cell's labels."""
    count = cell_images.shape[0]
    side = grid * _DIGIT

    def tile(per_cell: np.ndarray) -> np.ndarray:  # (count, cells) → (count, H, W)
        per_pixel = np.broadcast_to(per_cell[..., None, None], cell_images.shape)
        blocks = per_pixel.reshape(count, grid, grid, _DIGIT, _DIGIT).transpose(0, 1, 3, 2, 4)
        return blocks.reshape(count, side, side)

    blocks = cell_images.reshape(count, grid, grid, _DIGIT, _DIGIT).transpose(0, 1, 3, 2, 4)
    canvas = blocks.reshape(count, side, side)
    stroke = canvas > _STROKE
    return Canvases(
        np.stack([canvas, tile(cell_mask)], axis=1).astype(np.float32),
        np.where(stroke, tile(cell_label), 0).astype(np.int64),
        np.where(stroke, tile(cell_class), -1).astype(np.int64),
    )


def _majority_canvases(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    *,
    grid: int,
    occupancy: float,
) -> Canvases:
    """Two classes per canvas; label 1 for the digits of the more frequent class, 2 otherwise."""
    cells = grid * grid
    digits = max(3, round(occupancy * cells))
    major = np.minimum(digits // 2 + 1 + rng.integers(0, 2, count), digits - 1)  # (count,)
    first = rng.integers(0, 10, count)
    second = (first + rng.integers(1, 10, count)) % 10
    rank = rng.random((count, cells)).argsort(axis=1).argsort(axis=1)  # random order of cells
    is_major = rank < major[:, None]
    occupied = rank < digits
    classes = np.where(is_major, first[:, None], second[:, None])
    index = _sample_images(rng, labels, classes)
    cell_label = np.where(is_major, 1, 2)
    empty_mask = np.zeros((count, cells), dtype=np.float32)
    return _render(images[index] * occupied[..., None, None], empty_mask, cell_label, classes, grid)


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
# Training and evaluation.


def evaluate(model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 250) -> dict:
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
        "pixel_acc": float(tp.sum() / confusion.sum()),
    }


def train(config: MosaicConfig, *, log_every: int = 0) -> dict[str, Any]:
    """Trains one model and returns its metrics on the fixed test canvases.

    Args:
        config: the run's configuration.
        log_every: print the loss every this many steps (0: silent).

    Returns:
        A dict with ``miou``, per-class ``iou``, ``pixel_acc``, ``ms_per_step`` (median wall time
        of a training step, data generation excluded), ``train_s``, ``params``, ``final_loss``
        and the ``config``.
    """
    if not isinstance(config, MosaicConfig):
        raise TypeError(f"config must be a MosaicConfig, got {type(config).__name__}")
    require_extras("sklearn")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config, log_every)
    finally:
        torch.set_num_threads(threads)


def _train(config: MosaicConfig, log_every: int) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    train_images, train_labels, test_images, test_labels = _digit_pools()
    canvas_kwargs = {
        "grid": config.grid,
        "occupancy": config.occupancy,
        "match_prob": config.match_prob,
        "task": config.task,
    }
    test_x, test_y, _ = make_canvases(
        np.random.default_rng(_TEST_SEED), test_images, test_labels, config.test_canvases,
        **canvas_kwargs,
    )  # fmt: skip
    rng = np.random.default_rng(config.seed)
    model = MosaicNet(config)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    warmup = max(1, config.steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    step_times, loss_value = [], float("nan")
    start = time.perf_counter()
    model.train()
    for step in range(config.steps):
        batch = make_canvases(rng, train_images, train_labels, config.batch_size, **canvas_kwargs)
        x_t, y_t = torch.from_numpy(batch.inputs), torch.from_numpy(batch.targets)
        tic = time.perf_counter()
        if config.aux_weight:
            logits, aux = model(x_t, aux=True)
            loss = F.cross_entropy(logits, y_t) + config.aux_weight * F.cross_entropy(
                aux, torch.from_numpy(batch.digits), ignore_index=-1
            )
        else:
            loss = F.cross_entropy(model(x_t), y_t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step_times.append(time.perf_counter() - tic)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite loss at step {step}: {loss_value}")
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1:5d}  loss {loss_value:.4f}", flush=True)
    train_s = time.perf_counter() - start
    metrics = evaluate(model, torch.from_numpy(test_x), torch.from_numpy(test_y))
    return {
        **metrics,
        "ms_per_step": 1e3 * statistics.median(step_times[min(10, len(step_times) - 1) :]),
        "train_s": train_s,
        "params": sum(p.numel() for p in model.parameters()),
        "block_mmacs": block_macs(config) / 1e6,
        "final_loss": loss_value,
        "config": dataclasses.asdict(config),
    }


# ---------------------------------------------------------------------------------------------
# Comparison table.

VARIANTS: dict[str, dict[str, Any]] = {
    "conv only": {"block": "conv"},
    "+ attention (SDPA)": {"block": "attention"},
    "+ Ham NMF, one-step": {"block": "ham", "ham": "nmf", "grad": "one_step"},
    "+ Ham NMF, BPTT": {"block": "ham", "ham": "nmf", "grad": "bptt"},
    "+ Ham VQ, one-step": {"block": "ham", "ham": "vq", "grad": "one_step"},
    "+ Ham CD, one-step": {"block": "ham", "ham": "cd", "grad": "one_step"},
}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | mIoU (%) | IoU match (%) | IoU other (%) | ms / step | block MMACs | params |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['miou_mean']:.1f} ± {row['miou_std']:.1f} "
            f"| {row['iou_match']:.1f} | {row['iou_other']:.1f} | {row['ms_per_step']:.1f} "
            f"| {row['block_mmacs']:.2f} | {row['params']:,} |"
        )
    return "\n".join(lines)


def compare(
    out: Path | str,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    variants: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    log_every: int = 0,
) -> list[dict[str, Any]]:
    """Trains every variant for every seed; writes ``results.json`` and ``table.md`` in ``out``.

    Args:
        out: run folder: created, or an existing empty folder (earlier results are never
            overwritten).
        seeds: seeds of the runs.
        variants: names from :data:`VARIANTS` (default: all).
        overrides: config fields applied to every run (e.g. ``{"steps": 500}``).
        log_every: print the loss every this many steps.

    Returns:
        One summary row per variant (mean ± std of mIoU over seeds, median ms per step).
    """
    names = list(VARIANTS) if variants is None else list(variants)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; allowed: {list(VARIANTS)}")
    seeds = list(seeds)
    if not seeds:
        raise ConfigError("seeds must name at least one seed, got none")
    overrides = dict(overrides or {})
    # options that the variants or the seed list set would be silently replaced: refuse them
    fixed = sorted({"seed"}.union(*(VARIANTS[name] for name in names)) & set(overrides))
    if fixed:
        raise ConfigError(
            f"overrides {fixed} are set by the compared variants or the seeds (choose them with "
            f"variants= / --variants and seeds= / --seeds)"
        )
    # every run's config, validated before the folder exists and before the long loop
    configs = {
        (name, seed): from_dict(MosaicConfig, {**overrides, **VARIANTS[name], "seed": seed})
        for name in names
        for seed in seeds
    }
    out = require_new_folder(out, "out")
    require_extras("sklearn")
    out.mkdir(parents=True, exist_ok=True)
    runs, rows = [], []
    start = time.perf_counter()
    for name in names:
        results = []
        for seed in seeds:
            config = configs[name, seed]
            print(f"[{name}] seed {seed}", flush=True)
            result = train(config, log_every=log_every)
            print(
                f"[{name}] seed {seed}: mIoU {100 * result['miou']:.2f}  "
                f"{result['ms_per_step']:.1f} ms/step  {result['train_s']:.0f} s",
                flush=True,
            )
            results.append(result)
            runs.append({"variant": name, "seed": seed, **result})
        mious = [100 * r["miou"] for r in results]
        rows.append(
            {
                "variant": name,
                "miou_mean": statistics.mean(mious),
                "miou_std": statistics.stdev(mious) if len(mious) > 1 else 0.0,
                "iou_match": statistics.mean(100 * r["iou"]["match"] for r in results),
                "iou_other": statistics.mean(100 * r["iou"]["other"] for r in results),
                "ms_per_step": statistics.median(r["ms_per_step"] for r in results),
                "block_mmacs": results[0]["block_mmacs"],
                "params": results[0]["params"],
            }
        )
        _write(out, runs, rows, seeds, overrides, time.perf_counter() - start)
    return rows


def _write(
    out: Path,
    runs: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    seeds: Sequence[int],
    overrides: dict[str, Any],
    elapsed: float,
) -> None:
    summary = {
        "seeds": list(seeds),
        "overrides": overrides,
        "elapsed_s": elapsed,
        "torch": torch.__version__,
        "rows": rows,
        "runs": runs,
    }
    write_json(out / "results.json", summary)
    config = from_dict(MosaicConfig, overrides)
    header = (
        f"Mosaic segmentation (task={config.task!r}, {config.grid}x{config.grid} cells, "
        f"{config.steps} steps of {config.batch_size} canvases, {config.threads} threads), "
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); mIoU over background / match / "
        f"other on {config.test_canvases} fixed test canvases, mean ± std over seeds; ms / step "
        f"is the median training step; block MMACs: forward of the context block per canvas "
        f"(analytic). Total {elapsed / 60:.1f} min.\n\n"
    )
    write_text(out / "table.md", header + _table(rows) + "\n")


# ---------------------------------------------------------------------------------------------
# Command line.


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see ``python -m equilibria.zoo.mosaic --help``."""
    parser = argparse.ArgumentParser(
        prog="python -m equilibria.zoo.mosaic",
        description="Mosaic segmentation of scikit-learn digits: conv-only vs attention vs "
        "Hamburger. Each pixel's label depends on a key digit anywhere on the canvas.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("train", help="train one configuration and print its metrics")
    add_arguments(one, MosaicConfig)
    one.add_argument("--out", type=Path, help="write metrics.json in this new (or empty) folder")
    one.add_argument("--log-every", type=int, default=100)
    table = sub.add_parser("compare", help="all variants x seeds; writes table.md, results.json")
    table.add_argument("--out", type=Path, required=True, help="new (or empty) output folder")
    table.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    table.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), metavar="NAME",
        help=f"subset of {list(VARIANTS)}",
    )  # fmt: skip
    table.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE",
        help="config overrides applied to every run, e.g. --set steps=500 threads=1",
    )  # fmt: skip
    table.add_argument("--log-every", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except ConfigError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.out is not None:  # named as the command line names it (compare checks again)
        require_new_folder(args.out, "--out")
    if args.command == "train":
        options = {k: v for k, v in vars(args).items() if k not in ("command", "out", "log_every")}
        result = train(from_dict(MosaicConfig, options), log_every=args.log_every)
        print(json.dumps(result, indent=2))
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            write_json(args.out / "metrics.json", result)
        return 0
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.replace("-", "_")] = _parse_value(value)
    rows = compare(
        args.out, seeds=args.seeds, variants=args.variants, overrides=overrides,
        log_every=args.log_every,
    )  # fmt: skip
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
