"""The ``prelax`` recipe: residual relaxation for multi-view self-supervised learning on digits.

Multi-view methods align two augmented views of an image exactly, so an augmentation that changes
the semantics, such as a rotation, hurts them; Prelax lets the rotated view differ from its
unrotated source by a residual in representation space and makes that residual predict the
rotation (Wang, Geng, Jiang, Li, Wang, Yang & Lin, "Residual Relaxation for Multi-view
Representation Learning", NeurIPS 2021, §3). The variants train the same small encoder for the
same number of steps on scikit-learn's digits (:func:`equilibria.zoo.digits_model.load_data`:
1437 training and 360 held-out images) with SimSiam, SimSiam with rotation as a plain
augmentation, and Prelax (with the weights chosen on the validation split, and with α = γ = 1);
the headline is the accuracy of a linear probe on the held-out images, next to a few-label probe
and a kNN classifier, which separate the methods more (``eval_split="val"`` scores every probe on
287 training images instead, for choosing options). The model, views and losses are in
:mod:`equilibria.zoo.prelax_model`.

Usage::

    equilibria train prelax --method prelax --seed 0
    equilibria sweep prelax --seeds 0 1 2 3 4          # the three methods x 5 seeds
    python benchmarks/prelax.py                        # the same, into benchmarks/results

Reference: Wang et al., NeurIPS 2021 (arXiv 2110.15348); SimSiam: Chen & He, "Exploring Simple
Siamese Representation Learning", CVPR 2021.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import trainer
from .config import ConfigError, check_range, option
from .digits_model import TRAIN_SIZE, load_data
from .distributed import DistInfo
from .prelax_model import (
    ROTATIONS,
    PrelaxNet,
    features,
    few_label_indices,
    few_label_probe,
    knn_accuracy,
    linear_probe,
    orientation_probe,
    prelax_loss,
    rotate,
    rotated_probe,
    rotation_accuracy,
    simsiam_loss,
    standard_view,
)
from .sweep import SweepResult, sweep_folder
from .task import STEP_MS, TRAIN_LOSS, Metric, Plot, RunOptions, Schedule, StepOutput, Task

__all__ = ["VARIANTS", "PrelaxConfig", "PrelaxTask", "compare", "train"]

PROBE_ACC = Metric("probe_acc", "linear probe acc.", percent=True)
FEW_LABEL_ACC = Metric("probe10_acc", "probe acc., 10 labels / class", percent=True)
ROTATION_ACC = Metric("rotation_acc", "rotation acc. from residual", percent=True)
KNN_ACC = Metric("knn_acc", "kNN acc.", percent=True)
FEW_ACC = Metric("few_acc", "probe acc., few labels / class", percent=True)
ORIENTATION_ACC = Metric("orientation_acc", "rotation acc. from features", percent=True)
ROTATED_ACC = Metric("rotated_acc", "probe acc. on rotated images", percent=True)
VAL_SIZE = 287  # training images held out from the probes by eval_split="val" (20%)


@dataclass(frozen=True)
class PrelaxConfig(RunOptions):
    """Options of the ``prelax`` recipe (each is a command-line option ``--name-with-dashes``)."""

    method: Literal["simsiam", "simsiam_rotation", "prelax"] = option(
        "prelax",
        "'simsiam' (two standard views), 'simsiam_rotation' (the second view also rotated by "
        "k*90 degrees, aligned exactly) or 'prelax' (a rotated third view, aligned up to a "
        "residual that predicts the rotation)",
    )
    seed: int = option(0, "seed of the initialisation, the batches and the augmentations")
    steps: int = option(
        2000,
        "optimisation steps, the same for every method (chosen on the validation split: "
        "benchmarks/results/prelax_validation.json)",
    )
    batch_size: int = option(256, "images per step")
    lr: float = option(2e-3, "peak learning rate of AdamW (warm-up, then cosine decay)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    width: int = option(32, "channels of the encoder's convolutions")
    feat: int = option(128, "encoder feature size (what the linear probe sees)")
    dim: int = option(64, "projection size (z, p and the residual)")
    hidden: int = option(32, "hidden size of the predictor (a bottleneck, as in SimSiam)")
    alpha: float = option(
        0.3, "Prelax: weight of the residual-relaxed alignment (chosen on the validation split)"
    )
    gamma: float = option(
        0.1,
        "Prelax: weight of the rotation prediction from the residual (chosen on the validation "
        "split)",
    )
    noise: float = option(0.2, "std of the Gaussian noise of a standard view (standardised pixels)")
    erase: float = option(0.1, "probability that a standard view drops a pixel")
    eval_every: int = option(1000, "steps per epoch: the held-out metrics are measured after each")
    eval_split: Literal["test", "val"] = option(
        "test",
        "what the probes are scored on: 'test' (trained on all 1437 training images, scored on "
        "the 360 held-out ones) or 'val' (trained on 1150 training images, scored on the other "
        "287: for choosing options without looking at the test split)",
    )
    few_labels: int = option(
        2, "labels per class of the few-label probe (mean over 10 random labelled subsets)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "eval_every", "width", "feat", "dim", "hidden", "few_labels"):
            check_range(self, name, low=1, high=10**7)
        check_range(self, "batch_size", low=2, high=TRAIN_SIZE)
        check_range(self, "seed", low=0, high=2**32 - 1)
        check_range(self, "threads", low=0, high=256)
        check_range(self, "lr", low=0, low_open=True)
        for name in ("weight_decay", "alpha", "gamma", "noise"):
            check_range(self, name, low=0)
        check_range(self, "erase", low=0, high=0.9)


VARIANTS: dict[str, dict[str, Any]] = {
    "SimSiam": {"method": "simsiam"},
    "SimSiam + rotation": {"method": "simsiam_rotation"},
    "Prelax": {"method": "prelax"},
    "Prelax, alpha = gamma = 1": {"method": "prelax", "alpha": 1.0, "gamma": 1.0},
}


class PrelaxTask(Task):
    """The prelax recipe for :func:`equilibria.zoo.trainer.train`: an epoch is ``eval_every``
    steps, each on a batch drawn (with its augmentations) from a generator seeded by the seed
    and the epoch."""

    name = "prelax"
    config_class = PrelaxConfig
    headline = PROBE_ACC
    table_metrics = (FEW_LABEL_ACC, FEW_ACC, KNN_ACC, ORIENTATION_ACC, ROTATED_ACC, ROTATION_ACC,
                     STEP_MS)  # fmt: skip
    epoch_columns = (TRAIN_LOSS, PROBE_ACC, FEW_LABEL_ACC, KNN_ACC, ROTATION_ACC, STEP_MS)
    eval_options = ("eval_split", "few_labels")
    plots = (
        Plot("loss", "training loss", "loss", (("train_loss", "train"),)),
        Plot("accuracy", "held-out accuracy", "accuracy (fraction)",
             (("probe_acc", "linear probe"), ("rotation_acc", "rotation from residual"))),
    )  # fmt: skip
    variants = VARIANTS
    extras = ("sklearn", "safetensors")

    def setup(self, device: torch.device) -> None:
        self.data = load_data()  # CPU: the model is small
        x_train, y_train = self.data[:2]
        if self.config.eval_split == "val":
            from sklearn.model_selection import train_test_split

            fit, val = train_test_split(
                torch.arange(len(y_train)).numpy(), test_size=VAL_SIZE, random_state=0,
                stratify=y_train.numpy(),
            )  # fmt: skip
            fit, val = torch.from_numpy(fit), torch.from_numpy(val)
            self.probe_data = (x_train[fit], y_train[fit], x_train[val], y_train[val])
        else:
            self.probe_data = self.data
        smallest = int(torch.bincount(self.probe_data[1]).min())
        if self.config.few_labels > smallest:  # refused before training, not at the first epoch
            raise ConfigError(
                f"PrelaxConfig: few_labels must be <= {smallest}, the smallest class of the "
                f"probes' training images with eval_split={self.config.eval_split!r}, got "
                f"{self.config.few_labels}"
            )

    def build_model(self) -> nn.Module:
        c = self.config
        return PrelaxNet(c.width, c.feat, c.dim, c.hidden)

    def schedule(self) -> Schedule:
        c = self.config
        epochs = -(-c.steps // c.eval_every)
        return Schedule(epochs, c.eval_every, max(1, c.steps // 20), total=c.steps)

    def batches(self, epoch: int, info: DistInfo) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        c, images = self.config, self.data[0]
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + epoch)
        for _ in range(self.schedule().steps_in(epoch)):
            idx = torch.randint(0, images.shape[0], (c.batch_size,), generator=gen)
            x = images[idx]
            x1 = standard_view(x, gen, noise=c.noise, erase=c.erase)
            x2 = standard_view(x, gen, noise=c.noise, erase=c.erase)
            k = torch.randint(0, ROTATIONS, (c.batch_size,), generator=gen)
            yield x1, x2, k

    def train_step(self, net: nn.Module, model: nn.Module, batch: Any) -> StepOutput:
        x1, x2, k = batch
        c = self.config
        if c.method == "simsiam":
            return StepOutput(simsiam_loss(net, x1, x2))
        if c.method == "simsiam_rotation":
            return StepOutput(simsiam_loss(net, x1, rotate(x2, k)))
        loss, terms = prelax_loss(net, x1, x2, k, alpha=c.alpha, gamma=c.gamma)
        return StepOutput(loss, terms)

    def step_metrics(
        self, model: nn.Module, batch: Any, out: StepOutput
    ) -> tuple[dict[str, float], dict[str, Any]]:
        values = {"train_loss": float(out.loss.detach())}
        if out.outputs is not None:
            values.update({f"train_{k}": v for k, v in out.outputs.items()})
        return {}, values

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        x_train, y_train, x_test, y_test = self.probe_data
        train_feats, test_feats = features(model, x_train), features(model, x_test)
        few = few_label_indices(y_train, 10)
        per_class = self.config.few_labels
        return {
            "probe_acc": linear_probe(train_feats, y_train, test_feats, y_test),
            "probe10_acc": linear_probe(train_feats[few], y_train[few], test_feats, y_test),
            "few_acc": few_label_probe(
                train_feats, y_train, test_feats, y_test, per_class=per_class, draws=10
            ),
            "knn_acc": knn_accuracy(train_feats, y_train, test_feats, y_test, k=10),
            "orientation_acc": orientation_probe(model, x_train, x_test),
            "rotated_acc": rotated_probe(model, x_train, y_train, x_test, y_test),
            "rotation_acc": rotation_accuracy(model, x_test),
        }

    def describe(self, s: dict[str, Any]) -> list[str]:
        return [
            f"method {self.config.method}: linear probe {100 * s['probe_acc']:.2f}% (10 labels "
            f"per class: {100 * s['probe10_acc']:.2f}%), rotation from the residual "
            f"{100 * s['rotation_acc']:.2f}% (held-out images)"
        ]


def train(
    config: PrelaxConfig, *, on_epoch_end: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Train one model with :func:`equilibria.zoo.trainer.train` (see there)."""
    return trainer.train(PrelaxTask(config), on_epoch_end=on_epoch_end)


def compare(
    out: Path | str,
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    variants: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
) -> SweepResult:
    """Every variant for every seed on the sweep runner (``equilibria sweep prelax``); writes
    ``sweep.md`` and ``sweep.json`` in ``out``.

    Args:
        out: the sweep's folder (new or empty, unless ``resume``).
        seeds: seeds of the runs.
        variants: names from :data:`VARIANTS` (default: all).
        overrides: config fields applied to every run (e.g. ``{"steps": 100}``).
        resume: continue an interrupted comparison in ``out``.
    """
    return sweep_folder(
        PrelaxTask, out, seeds=seeds, variants=variants, overrides=overrides, resume=resume
    )
