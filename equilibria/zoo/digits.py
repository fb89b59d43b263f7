"""The ``digits`` recipe: an MDEQ-style convolutional DEQ classifier on scikit-learn's digits.

The data and the model live in :mod:`equilibria.zoo.digits_model`; this module holds the options
and the :class:`DigitsTask` that trains them on the engine (:mod:`equilibria.zoo.trainer`).

Optional fixed-point correction supervises several states along the solver's trajectory
(``--correction-states N --correction-gamma 0.8``).

Usage::

    equilibria train digits --backward phantom --phantom-steps 5 --epochs 15
    equilibria eval runs/digits/<run>/checkpoint.safetensors
    torchrun --nproc-per-node 2 -m equilibria train digits --backward implicit

Reference: Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models", NeurIPS 2020; Geng et al.,
"On Training Implicit Models", NeurIPS 2021.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed, evaluation, trainer
from .config import ConfigError, check_range, option
from .digits_model import (
    TEST_SIZE,
    TRAIN_SIZE,
    DigitsCell,
    DigitsDEQ,
    background_value,
    backward_iterations,
    batch_loss,
    build_model,
    evaluate_model,
    load_data,
    make_backward,
    make_optimizer,
    make_solver,
    shift_images,
)
from .distributed import DistInfo
from .task import STEP_MS, TRAIN_LOSS, Metric, Plot, RunOptions, Schedule, StepOutput, Task

__all__ = [
    "TEST_SIZE", "TRAIN_SIZE", "DigitsCell", "DigitsConfig", "DigitsDEQ", "DigitsTask",
    "background_value", "backward_iterations", "batch_loss", "build_model", "evaluate_model",
    "load_data", "load_model", "make_backward", "make_optimizer", "make_solver", "shift_images",
    "train",
]  # fmt: skip

RECIPE = "digits"
SolverName = Literal["anderson", "picard", "broyden"]
BackwardName = Literal["implicit", "phantom", "neumann", "jfb", "unrolled"]


@dataclass(frozen=True)
class DigitsConfig(RunOptions):
    """Options of the ``digits`` recipe (each is a command-line option ``--name-with-dashes``).

    Validated on construction: a wrong type or value raises :class:`ConfigError` naming the
    option, the value and what is allowed. The run-control options (``threads`` = 1 here: fastest
    for this small model and robust when other processes share the cores) come from
    :class:`~equilibria.zoo.task.RunOptions`.
    """

    # model
    width: int = option(32, "channels C of the equilibrium state z (C x 8 x 8)")
    groups: int = option(4, "GroupNorm groups in the cell (must divide width)")
    gain: float = option(
        0.2, "norm of each weight-normalised filter of the cell; smaller = more contractive"
    )
    # forward solver
    solver: Literal["anderson", "picard", "broyden"] = option(
        "anderson", "forward solver (also used for the implicit adjoint)"
    )
    anderson_m: int = option(5, "Anderson history size")
    tol: float = option(1e-3, "forward tolerance in training (relative residual)")
    max_iter: int = option(20, "forward iteration budget in training")
    eval_tol: float = option(1e-3, "forward tolerance in evaluation")
    eval_max_iter: int = option(40, "forward iteration budget in evaluation")
    # backward method
    backward: Literal["implicit", "phantom", "neumann", "jfb", "unrolled"] = option(
        "phantom", "how gradients are computed"
    )
    phantom_steps: int = option(5, "steps k of the phantom (unrolled or Neumann) gradient")
    phantom_damping: float = option(0.5, "damping lambda of the phantom gradient, in (0, 1]")
    implicit_tol: float = option(1e-4, "tolerance of the implicit adjoint solve")
    implicit_max_iter: int = option(30, "iteration budget of the implicit adjoint solve")
    correction_states: int = option(
        0, "fixed-point correction: supervise this many states on the trajectory (0 = off)"
    )
    correction_gamma: float = option(0.8, "fixed-point correction: loss weight decay gamma")
    # optimisation and data
    epochs: int = option(15, "training epochs")
    batch_size: int = option(64, "global batch size (split over torchrun processes)")
    optimizer: Literal["adamw", "sgd"] = option(
        "adamw", "optimizer (plain SGD without momentum makes each update -lr * gradient)"
    )
    lr: float = option(3e-3, "peak learning rate (warm-up, then cosine decay)")
    weight_decay: float = option(0.0, "weight decay")
    warmup_epochs: int = option(1, "epochs of linear learning-rate warm-up")
    augment: bool = option(
        True, "shift training images by up to one pixel (the pixels shifted in are background)"
    )
    train_subset: int = option(
        0, f"use only the first N of the {TRAIN_SIZE} training images (0 = all)"
    )
    seed: int = option(0, "seed of initialisation, data order and augmentation")
    dtype: Literal["float32", "float64"] = option("float32", "floating-point precision")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "device (auto: CUDA if available)")

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for field in ("width", "groups", "anderson_m", "max_iter", "eval_max_iter"):
            check_range(self, field, low=1)
        for field in ("phantom_steps", "implicit_max_iter", "epochs", "batch_size"):
            check_range(self, field, low=1)
        for field in ("correction_states", "warmup_epochs", "threads"):
            check_range(self, field, low=0)
        check_range(self, "seed", low=0, high=2**32 - 1)  # numpy's seed range
        for field in ("gain", "tol", "eval_tol", "implicit_tol", "lr"):
            check_range(self, field, low=0, low_open=True)
        check_range(self, "phantom_damping", low=0, high=1, low_open=True)
        check_range(self, "correction_gamma", low=0, high=1, low_open=True)
        check_range(self, "weight_decay", low=0)
        check_range(self, "train_subset", low=0, high=TRAIN_SIZE)
        if self.width % self.groups:
            raise ConfigError(
                f"{name}: groups must divide width, got groups={self.groups}, width={self.width}"
            )
        if 0 < self.train_subset < self.batch_size:
            raise ConfigError(
                f"{name}: train_subset must be 0 or >= batch_size={self.batch_size}, "
                f"got {self.train_subset}"
            )
        if self.batch_size > TRAIN_SIZE:
            raise ConfigError(
                f"{name}: batch_size must be <= {TRAIN_SIZE} (the training images; fewer with "
                f"train_subset), got {self.batch_size}"
            )
        if self.correction_states and self.backward not in ("phantom", "jfb"):
            raise ConfigError(
                f"{name}: correction_states={self.correction_states} needs backward 'phantom' "
                f"or 'jfb' (the intermediate states are not equilibria), got {self.backward!r}"
            )


# ----------------------------------------------------------------------------------------------
# The recipe on the trainer


class DigitsTask(Task):
    """The digits recipe for :func:`equilibria.zoo.trainer.train`."""

    name = RECIPE
    config_class = DigitsConfig
    headline = Metric("test_acc", "test accuracy", percent=True)
    table_metrics = (
        Metric("fwd_iters_mean", "fwd it.", higher_is_better=False, fmt=".1f"),
        Metric("bwd_iters_mean", "bwd it.", higher_is_better=False, fmt=".1f"),
        STEP_MS,
    )
    epoch_columns = (
        TRAIN_LOSS,
        Metric("train_acc", "train acc.", percent=True),
        Metric("test_acc", "test acc.", percent=True),
        Metric("fwd_iters_mean", "fwd it.", higher_is_better=False, fmt=".1f"),
        Metric("bwd_iters_mean", "bwd it.", higher_is_better=False, fmt=".1f"),
        Metric("eval_iters", "eval it.", higher_is_better=False),
        Metric("fwd_residual_max", "fwd res.", higher_is_better=False, fmt=".1e"),
        Metric("test_loss", "test loss", higher_is_better=False, fmt=".4f"),
    )
    plots = (
        Plot("learning_curves", "loss", "cross-entropy",
             (("train_loss", "train"), ("test_loss", "test")), log=True),
        Plot("accuracy", "accuracy", "accuracy (fraction)",
             (("train_acc", "train"), ("test_acc", "test"))),
        Plot("residuals", "evaluation solve", "max relative residual",
             (("eval_trace", "epoch"),), log=True, trace=True, hline="eval_tol"),
        Plot("iterations", "solver iterations per epoch", "iterations",
             (("fwd_iters_mean", "forward (train, mean)"), ("eval_iters", "forward (eval)"),
              ("bwd_iters_mean", "backward (mean)"))),
    )  # fmt: skip
    eval_options = ("eval_max_iter", "eval_tol", "solver")
    extras = ("sklearn", "safetensors", "tqdm")
    distributed = True

    def check(self, info: DistInfo) -> None:
        config = self.config
        # a rule for new runs only: a saved run that predates it must still load and resume
        if not config.resume and config.warmup_epochs > config.epochs:
            raise ConfigError(
                f"DigitsConfig: warmup_epochs must be <= epochs={config.epochs} (else the "
                f"learning rate never reaches its peak), got {config.warmup_epochs}"
            )
        if config.batch_size % info.world_size:
            raise ConfigError(
                f"batch_size={config.batch_size} must be divisible by the number of processes "
                f"({info.world_size})"
            )

    def setup(self, device: torch.device) -> None:
        dtype = torch.float64 if self.config.dtype == "float64" else torch.float32
        self.data = load_data(device=device, dtype=dtype, subset=self.config.train_subset)

    def build_model(self) -> nn.Module:
        return build_model(self.config)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return make_optimizer(model, self.config)

    def schedule(self) -> Schedule:
        steps = (self.config.train_subset or TRAIN_SIZE) // self.config.batch_size
        return Schedule(self.config.epochs, steps, self.config.warmup_epochs * steps)

    def batches(self, epoch: int, info: DistInfo) -> Iterator[tuple[Tensor, Tensor]]:
        config, (x_train, y_train) = self.config, self.data[:2]
        n, b = x_train.shape[0], config.batch_size
        # same permutation and shifts on every process and for any number of processes
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        shifts = torch.randint(0, 3, (n, 2), generator=gen)
        for k in range(n // b):
            idx = distributed.local_slice(perm[k * b : (k + 1) * b], info)
            images = x_train[idx.to(x_train.device)]
            if config.augment:  # the pixels shifted in are background, not 0 (grey)
                images = shift_images(images, shifts[idx].to(images.device), background_value())
            yield images, y_train[idx.to(y_train.device)]

    def train_step(self, net: nn.Module, model: nn.Module, batch: Any) -> StepOutput:
        loss, logits = batch_loss(net, *batch, self.config)
        return StepOutput(loss, logits.detach())

    def step_metrics(
        self, model: nn.Module, batch: Any, out: StepOutput
    ) -> tuple[dict[str, float], dict[str, Any]]:
        labels, logits = batch[1], out.outputs
        sol = model.deq.last_solution
        assert sol is not None
        sums = {
            "loss_sum": float(F.cross_entropy(logits, labels)) * labels.numel(),
            "correct": float((logits.argmax(1) == labels).sum()),
            "count": labels.numel(),
        }
        bwd_res = sol.backward.residual
        values = {
            "fwd_iters": sol.nstep,
            "fwd_res": float(sol.residual.max()),
            "fwd_conv": float(sol.converged.double().mean()),
            "bwd_iters": backward_iterations(sol, self.config),
            "bwd_res": None if bwd_res is None else float(bwd_res.max()),
        }
        return sums, values

    def epoch_metrics(self, sums: dict[str, float], values: dict[str, list[Any]]) -> dict:
        bwd_res = [r for r in values["bwd_res"] if r is not None]
        return {
            "train_loss": sums["loss_sum"] / sums["count"],
            "train_acc": sums["correct"] / sums["count"],
            "fwd_iters_mean": statistics.fmean(values["fwd_iters"]),
            "fwd_iters_max": max(values["fwd_iters"]),
            "fwd_residual_max": max(values["fwd_res"]),
            "fwd_residual_mean": statistics.fmean(values["fwd_res"]),
            "fwd_converged": statistics.fmean(values["fwd_conv"]),
            "bwd_iters_mean": statistics.fmean(values["bwd_iters"]),
            "bwd_residual_max": max(bwd_res) if bwd_res else None,
        }

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        return evaluate_model(model, self.data[2], self.data[3])

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        return {"solver": self.config.solver, "backward": self.config.backward}

    def describe(self, s: dict[str, Any]) -> list[str]:
        def fmt(key: str, spec: str) -> str:
            return "–" if s.get(key) is None else format(s[key], spec)

        return [
            f"forward solver {s['solver']}: {fmt('fwd_iters_mean', '.1f')} iterations per "
            f"training step (largest residual {fmt('fwd_residual_max', '.1e')}), "
            f"{s['eval_iters']} on the test set (largest residual {s['eval_residual_max']:.1e}, "
            f"{100 * s['eval_converged']:.0f}% of samples below tol {self.config.eval_tol})",
            f"backward {s['backward']}: {fmt('bwd_iters_mean', '.1f')} iterations per step; "
            f"{fmt('step_ms', '.1f')} ms per training step (median, last epoch)",
        ]

    def describe_eval(self, r: dict[str, Any]) -> list[str]:
        return [
            f"loss {r['test_loss']:.4f}; forward solver {r['solver']}: {r['eval_iters']} "
            f"iterations (budget {r['eval_max_iter']}, tol {r['eval_tol']:g}), largest residual "
            f"{r['eval_residual_max']:.2e}, {100 * r['eval_converged']:.0f}% of samples converged"
        ]


def train(
    config: DigitsConfig, *, on_epoch_end: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Train the digits DEQ with :func:`equilibria.zoo.trainer.train` (see there)."""
    return trainer.train(DigitsTask(config), on_epoch_end=on_epoch_end)


def load_model(checkpoint: str | Path, **overrides: Any) -> tuple[DigitsDEQ, DigitsConfig]:
    """Rebuild the model of a checkpoint from its saved config and load its weights.

    Args:
        checkpoint: ``checkpoint.safetensors`` or its run folder.
        overrides: config fields to change (e.g. ``eval_max_iter=100``, ``solver="broyden"``).
    """
    model, task = evaluation.load_model(DigitsTask, checkpoint, **overrides)
    return model, task.config  # type: ignore[return-value]
