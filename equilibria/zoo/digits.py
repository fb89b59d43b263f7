"""The ``digits`` recipe: an MDEQ-style convolutional DEQ classifier on scikit-learn's digits.

Data: the 1797 8×8 digits shipped with scikit-learn (no download), split once into 1437 training
and 360 test images (stratified, ``random_state=0``), scaled with the training mean and std.
Training images are shifted by up to one pixel (seeded, optional).

Model (single-resolution MDEQ-style, ALGORITHMS.md §1-2):

* injection x = conv3×3(image): (B, 1, 8, 8) -> (B, C, 8, 8);
* cell f(z, x) = GroupNorm(ReLU(conv3×3(z; W) + x)), with W weight-normalised per filter to a
  fixed norm ``gain`` (computed once per forward call, not per iteration): the gain bounds how
  strongly z feeds back into itself, so the equilibrium stays easy to find while training;
* z* = f(z*, x) by the chosen solver, gradients by the chosen backward method;
* head: linear on the flattened z* (C·64 -> 10).

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

import dataclasses
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import equilibria as eq

from . import distributed
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .config import ConfigError, check_fields, check_range, differences, from_dict, option, to_dict
from .distributed import DistInfo
from .memory import PeakMemory
from .registry import get_recipe
from .runs import (
    SUMMARY,
    MissingExtraError,
    ReportFailedError,
    RunFolder,
    default_run_dir,
    require_extras,
    write_json,
)

RECIPE = "digits"
TEST_SIZE = 360
TRAIN_SIZE = 1797 - TEST_SIZE
SolverName = Literal["anderson", "picard", "broyden"]
BackwardName = Literal["implicit", "phantom", "neumann", "jfb", "unrolled"]


@dataclass(frozen=True)
class DigitsConfig:
    """Options of the ``digits`` recipe (each is a command-line option ``--name-with-dashes``).

    Validated on construction: a wrong type or value raises :class:`ConfigError` naming the
    option, the value and what is allowed.
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
    augment: bool = option(True, "shift training images by up to one pixel")
    train_subset: int = option(
        0, f"use only the first N of the {TRAIN_SIZE} training images (0 = all)"
    )
    seed: int = option(0, "seed of initialisation, data order and augmentation")
    dtype: Literal["float32", "float64"] = option("float32", "floating-point precision")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "device (auto: CUDA if available)")
    # run control (may change on --resume)
    threads: int = option(
        1,
        "torch CPU threads; 1 is fastest for this small model and robust when other processes "
        "share the cores (0 = torch's default); a CPU run resumes only with the thread count it "
        "was trained with, which changes the numbers",
        resumable=True,
    )
    run_dir: str = option("", "run folder (default: runs/digits/<timestamp>)", resumable=True)
    resume: bool = option(
        False, "continue the run in --run-dir from its checkpoint", resumable=True
    )
    quiet: bool = option(False, "no progress bars; print only the summary", resumable=True)
    measure_memory: bool = option(
        True, "measure peak memory on the first step of each epoch", resumable=True
    )
    report: bool = option(True, "write report.md with plots at the end", resumable=True)

    def __post_init__(self) -> None:
        check_fields(self)
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
        if self.resume and not self.run_dir:
            raise ConfigError(f"{name}: resume needs run_dir (the folder of the run to continue)")


# ----------------------------------------------------------------------------------------------
# Data


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = data.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = data.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=TEST_SIZE, random_state=0, stratify=labels
    )
    mean, std = images[idx_train].mean(), images[idx_train].std()
    images = (images - mean) / std
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


def load_data(
    *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, subset: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fixed split as tensors: train images (N, 1, 8, 8), labels (N,), test images, labels.

    Args:
        device: where the tensors live.
        dtype: image dtype.
        subset: keep only the first ``subset`` training images (0 = all).
    """
    x_train, y_train, x_test, y_test = _digits()
    if subset:
        x_train, y_train = x_train[:subset], y_train[:subset]

    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a).to(device=device, dtype=dtype).unsqueeze(1)

    def labels(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a).to(device)

    return images(x_train), labels(y_train), images(x_test), labels(y_test)


def shift_images(images: Tensor, shifts: Tensor) -> Tensor:
    """Shift each image by (dy, dx) in {-1, 0, 1}² given as ``shifts`` (B, 2) in {0, 1, 2}.

    Pixels shifted in are zero-padded.
    """
    b, _, h, w = images.shape
    padded = F.pad(images, (1, 1, 1, 1))  # (B, 1, h + 2, w + 2)
    rows = shifts[:, :1] + torch.arange(h, device=images.device)  # (B, h)
    cols = shifts[:, 1:] + torch.arange(w, device=images.device)  # (B, w)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# Model


class DigitsCell(nn.Module):
    """f(z, (x, W)) = GroupNorm(ReLU(conv3x3(z; W) + x)) on (B, C, 8, 8) states.

    The conv weight is passed in with the injection (see :meth:`weight`) so that its
    normalisation is computed once per forward call, not once per solver iteration.

    Args:
        width: channels C.
        groups: GroupNorm groups.
        gain: norm of every filter of W.
    """

    def __init__(self, width: int, groups: int, gain: float) -> None:
        super().__init__()
        self.direction = nn.Parameter(torch.empty(width, width, 3, 3))
        nn.init.kaiming_uniform_(self.direction, a=math.sqrt(5))
        self.norm = nn.GroupNorm(groups, width)
        self.gain = gain

    def weight(self) -> Tensor:
        """W = gain · V / ||V|| per output filter: (C, C, 3, 3)."""
        v = self.direction
        return self.gain * v / torch.linalg.vector_norm(v.flatten(1), dim=1).view(-1, 1, 1, 1)

    def forward(self, z: Tensor, x: tuple[Tensor, Tensor]) -> Tensor:
        injection, weight = x
        return self.norm(F.relu(F.conv2d(z, weight, padding=1) + injection))


def make_solver(config: DigitsConfig) -> eq.Solver:
    """The forward solver object named by ``config.solver``."""
    if config.solver == "anderson":
        return eq.Anderson(m=config.anderson_m)
    return eq.Picard() if config.solver == "picard" else eq.Broyden()


def make_backward(config: DigitsConfig) -> eq.Backward:
    """The backward method object named by ``config.backward``."""
    if config.backward == "implicit":
        return eq.Implicit(
            solver=make_solver(config), tol=config.implicit_tol, max_iter=config.implicit_max_iter
        )
    if config.backward == "phantom":
        return eq.Phantom(steps=config.phantom_steps, damping=config.phantom_damping)
    if config.backward == "neumann":
        return eq.Neumann(steps=config.phantom_steps, damping=config.phantom_damping)
    return eq.JFB() if config.backward == "jfb" else eq.Unrolled()


def _zeros_like_injection(x: tuple[Tensor, Tensor]) -> Tensor:
    return torch.zeros_like(x[0])


class DigitsDEQ(nn.Module):
    """The digits classifier: injection conv, equilibrium cell, linear head.

    Args:
        config: the recipe's options (model, solver and backward fields are used).

    Example:
        >>> model = DigitsDEQ(DigitsConfig(backward="implicit"))
        >>> logits = model(images)  # (B, 10); model.deq.last_solution has the solver statistics
    """

    def __init__(self, config: DigitsConfig) -> None:
        super().__init__()
        c = config.width
        self.inject = nn.Conv2d(1, c, 3, padding=1)
        self.deq = eq.DEQ(
            DigitsCell(c, config.groups, config.gain),
            solver=make_solver(config),
            backward=make_backward(config),
            tol=config.tol,
            max_iter=config.max_iter,
            eval_tol=config.eval_tol,
            eval_max_iter=config.eval_max_iter,
            init=_zeros_like_injection,
        )
        self.head = nn.Linear(c * 64, 10)

    def forward(self, images: Tensor, states: int | None = None) -> Tensor | list[Tensor]:
        """Logits (B, 10), or a list of ``states`` logits along the trajectory (correction)."""
        x = (self.inject(images), self.deq.cell.weight())  # (B, C, 8, 8), (C, C, 3, 3)
        if states:
            return [self.head(z.flatten(1)) for z in self.deq(x, states=states)]
        return self.head(self.deq(x).flatten(1))


def build_model(config: DigitsConfig) -> DigitsDEQ:
    """A freshly initialised model (seeded by ``config.seed``) in the config's dtype."""
    torch.manual_seed(config.seed)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    return DigitsDEQ(config).to(dtype)


def batch_loss(
    model: nn.Module, images: Tensor, labels: Tensor, config: DigitsConfig
) -> tuple[Tensor, Tensor]:
    """(training loss, logits of the final state) for one batch.

    With fixed-point correction the loss is sum_i gamma^(n-1-i) CE(state i).
    """
    if config.correction_states:
        logits = model(images, states=config.correction_states)
        losses = [F.cross_entropy(out, labels) for out in logits]
        return eq.correction_loss(losses, gamma=config.correction_gamma), logits[-1]
    logits = model(images)
    return F.cross_entropy(logits, labels), logits


def backward_iterations(sol: eq.Solution, config: DigitsConfig) -> float:
    """Backward iterations of one step: the adjoint solve's for implicit, else the method's
    fixed count (phantom k, Neumann k - 1 VJPs, JFB 1, unrolled = forward iterations)."""
    if config.backward == "implicit":
        return float(sol.backward.nstep or 0)
    if config.backward == "phantom":
        return float(config.phantom_steps)
    if config.backward == "neumann":
        return float(config.phantom_steps - 1)
    return 1.0 if config.backward == "jfb" else float(sol.nstep)


@torch.no_grad()
def evaluate_model(model: DigitsDEQ, images: Tensor, labels: Tensor) -> dict[str, Any]:
    """Test loss, accuracy and solver statistics in eval mode (eval budget)."""
    was_training = model.training
    model.eval()
    logits = model(images)
    model.train(was_training)
    sol = model.deq.last_solution
    assert sol is not None
    return {
        "test_loss": float(F.cross_entropy(logits, labels)),
        "test_acc": float((logits.argmax(1) == labels).double().mean()),
        "eval_iters": sol.nstep,
        "eval_residual_max": float(sol.residual.max()),
        "eval_residual_mean": float(sol.residual.mean()),
        "eval_converged": float(sol.converged.double().mean()),
        "eval_trace": [float(r) for r in sol.trace],
    }


def make_optimizer(model: nn.Module, config: DigitsConfig) -> torch.optim.Optimizer:
    """AdamW or plain SGD over all parameters, as ``config.optimizer`` says."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------------------------
# Training


def train(
    config: DigitsConfig, *, on_epoch_end: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Train the digits DEQ; write the run folder (rank 0) and return the summary.

    Under ``torchrun`` (``WORLD_SIZE > 1``) it trains with DistributedDataParallel on the same
    global batches as a single process.

    Args:
        config: the options.
        on_epoch_end: called with the epoch number after each epoch's checkpoint is written
            (tests use it to interrupt a run).

    Returns:
        The summary also written to ``summary.json``: final test accuracy, solver statistics,
        timings, peak memory and paths.

    Raises:
        ConfigError: invalid options, a run folder that already holds a run (without
            ``resume``), or a resume whose options differ from the saved run.
        MissingExtraError: an optional dependency is not installed (checked before the run
            folder is written).
        CheckpointError: ``resume`` with a truncated or corrupted checkpoint (the file is left
            as it is). A run killed before its first checkpoint resumes from the start.
        RunFailedError: training stopped with another error (its cause) after the run folder
            was set up; ``summary.json`` records it, and ``resume`` continues from the last
            checkpoint. Interruptions (KeyboardInterrupt) pass through unrecorded.
        ReportFailedError: training finished and ``summary.json`` holds its results, but writing
            ``report.md`` failed (``equilibria report`` writes it again).
    """
    if not isinstance(config, DigitsConfig):
        raise TypeError(f"config must be a DigitsConfig, got {type(config).__name__}")
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    info = distributed.setup(config.device)
    try:
        return _train(config, info, on_epoch_end)
    finally:
        distributed.teardown(info)
        torch.set_num_threads(threads)


def _train(
    config: DigitsConfig, info: DistInfo, on_epoch_end: Callable[[int], None] | None
) -> dict[str, Any]:
    wall_start = time.perf_counter()
    # a rule for new runs only: a saved run that predates it must still load and resume
    if not config.resume and config.warmup_epochs > config.epochs:
        raise ConfigError(
            f"DigitsConfig: warmup_epochs must be <= epochs={config.epochs} (else the learning "
            f"rate never reaches its peak), got {config.warmup_epochs}"
        )
    if config.batch_size % info.world_size:
        raise ConfigError(
            f"batch_size={config.batch_size} must be divisible by the number of processes "
            f"({info.world_size})"
        )
    # the recipe's extras (one list, in the registry), and matplotlib for the report
    extras = get_recipe(RECIPE).extras
    require_extras(*extras, *(("matplotlib",) if config.report else ()))
    run = RunFolder(config.run_dir or (default_run_dir(RECIPE) if info.is_main else "."))
    config = dataclasses.replace(config, run_dir=str(run.path))
    saved_config = to_dict(config)
    ckpt = None
    # rank 0 decides whether the folder holds a run; every rank then fails with the same error
    if not config.resume:
        run.check_new(holds=distributed.broadcast_flag(info.is_main and run.holds_run(), info))
    if config.resume:
        run.check_resume(RECIPE, saved_config, DigitsConfig)
        if run.checkpoint.exists():  # else: stopped before its first checkpoint, start over
            ckpt = load_checkpoint(run.checkpoint, recipe=RECIPE)
            diff = differences(ckpt.config, saved_config, DigitsConfig)
            if diff:
                raise CheckpointError(f"{ckpt.path}: checkpoint of another configuration: {diff}")
            _check_same_setting(ckpt, info)
            _check_restorable(ckpt, config)
    elif info.is_main:
        run.start(RECIPE, saved_config)
    distributed.barrier(info)
    try:
        return _fit(config, saved_config, ckpt, run, info, on_epoch_end, wall_start)
    except (ConfigError, MissingExtraError, ReportFailedError):
        raise
    except Exception as e:  # recorded in the folder (rank 0), so a rerun there says so
        raise run.fail(e, record=info.is_main) from e


def _check_same_setting(ckpt: Checkpoint, info: DistInfo) -> None:
    """Refuse a resume whose process count or CPU thread count differs from the saved run's:
    either changes the numbers (another split of each batch, other reductions), so the result
    would not be the uninterrupted run's. Checkpoints that predate the record pass."""
    saved = ckpt.extra.get("metrics", {}) if isinstance(ckpt.extra, dict) else {}
    now = {"world_size": info.world_size}
    if info.device.type == "cpu":
        now["threads"] = torch.get_num_threads()
    hints = {
        "world_size": "run it under torchrun with --nproc-per-node {saved}",
        "threads": "pass --threads {saved}",
    }
    for key, value in now.items():
        was = saved.get(key)
        if isinstance(was, int) and was != value:
            raise ConfigError(
                f"--resume: the run in {ckpt.path.parent} was trained with {key}={was}, this "
                f"process has {value}; that changes the numbers, so the resumed run would not "
                f"match an uninterrupted one: {hints[key].format(saved=was)}"
            )


def _check_restorable(ckpt: Checkpoint, config: DigitsConfig) -> None:
    """Load the checkpoint into a throwaway model and optimizer, before the folder is touched.

    Its metadata (the optimizer's state layout) is not covered by the tensors' checksum, so a
    damaged one is found here and reported as a checkpoint problem rather than as a training
    failure recorded over the run's summary.
    """
    model = build_model(config)
    optimizer = make_optimizer(model, config)
    try:
        model.load_state_dict(ckpt.model)
        if ckpt.optimizer is None:
            raise ValueError("the checkpoint holds no optimizer state")
        optimizer.load_state_dict(ckpt.optimizer)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{ckpt.path}: its state cannot be restored into the model and optimizer of its "
            f"configuration ({type(e).__name__}: {e}); resume from an intact checkpoint or "
            "start a new run"
        ) from e


def _fit(
    config: DigitsConfig,
    saved_config: dict[str, Any],
    ckpt: Checkpoint | None,
    run: RunFolder,
    info: DistInfo,
    on_epoch_end: Callable[[int], None] | None,
    wall_start: float,
) -> dict[str, Any]:
    """Training and evaluation of :func:`_train` once the run folder is set up."""
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    random.seed(config.seed)
    np.random.seed(config.seed)  # noqa: NPY002 (seeds the global RNG that user code may use)
    model = build_model(config).to(info.device)
    optimizer = make_optimizer(model, config)
    epoch, step = 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        assert ckpt.optimizer is not None
        optimizer.load_state_dict(ckpt.optimizer)
        restore_rng(ckpt.rng)
        epoch, step = ckpt.epoch, ckpt.step
    if config.resume and info.is_main:
        run.remove_temporaries()
        run.truncate_metrics(epoch)
    net: nn.Module = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    data = load_data(device=info.device, dtype=dtype, subset=config.train_subset)
    n_train = data[0].shape[0]
    steps_per_epoch = n_train // config.batch_size
    total = config.epochs * steps_per_epoch
    show = info.is_main and not config.quiet
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, initial=step, disable=not show, desc=f"{RECIPE} {config.backward}",
        unit="step", dynamic_ncols=True, leave=False,
    )  # fmt: skip
    last: dict[str, Any] = {}
    with bar:
        while epoch < config.epochs:
            epoch += 1
            tic = time.perf_counter()
            row = _train_epoch(net, model, optimizer, data, config, info, epoch, step, bar)
            step += steps_per_epoch
            row["epoch_time_s"] = time.perf_counter() - tic
            row.update(evaluate_model(model, data[2], data[3]))
            row["time_s"] = time.perf_counter() - tic
            last = row
            if info.is_main:
                run.append_metrics(row)
                save_checkpoint(
                    run.checkpoint, recipe=RECIPE, config=saved_config, epoch=epoch, step=step,
                    model=model, optimizer=optimizer, extra={"metrics": _scalars(row)},
                )  # fmt: skip
                if show:
                    bar.write(_epoch_line(row, config.epochs))
            distributed.barrier(info)
            if on_epoch_end is not None:
                on_epoch_end(epoch)
    if not last:  # resumed a finished run: its last epoch's statistics, evaluated once more
        rows = run.read_metrics() if info.is_main else []
        last = {**(rows[-1] if rows else {}), "epoch": epoch, "step": step}
        last.update(evaluate_model(model, data[2], data[3]))
    summary = _summary(run, config, info, model, last, time.perf_counter() - wall_start)
    if info.is_main:
        write_json(run.path / SUMMARY, summary)
        if config.report:
            from .report import write_report

            try:
                summary["report"] = str(write_report(run.path))
            except Exception as e:  # the run is done and summarised: do not record it as failed
                raise ReportFailedError(
                    f"training finished and {run.path / SUMMARY} holds its results, but writing "
                    f"the report failed ({type(e).__name__}: {e}); rerun it with "
                    f"`equilibria report {run.path}`"
                ) from e
            write_json(run.path / SUMMARY, summary)
    return summary


def _train_epoch(
    net: nn.Module,
    model: DigitsDEQ,
    optimizer: torch.optim.Optimizer,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    config: DigitsConfig,
    info: DistInfo,
    epoch: int,
    step: int,
    bar: Any,
) -> dict[str, Any]:
    x_train, y_train = data[0], data[1]
    n = x_train.shape[0]
    b = config.batch_size
    steps = n // b
    total = config.epochs * steps
    # same permutation and shifts on every process and for any number of processes
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    shifts = torch.randint(0, 3, (n, 2), generator=gen)
    net.train()
    loss_sum, correct, count = 0.0, 0.0, 0.0
    fwd_iters, fwd_res, fwd_conv, bwd_iters, bwd_res, step_ms = [], [], [], [], [], []
    peak, mem_method = None, None
    for k in range(steps):
        idx = distributed.local_slice(perm[k * b : (k + 1) * b], info)
        images = x_train[idx.to(x_train.device)]
        if config.augment:
            images = shift_images(images, shifts[idx].to(images.device))
        labels = y_train[idx.to(y_train.device)]
        lr = lr_at(step + k, total, config.warmup_epochs * steps, config.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        measure = config.measure_memory and k == 0
        optimizer.zero_grad(set_to_none=True)
        tic = time.perf_counter()
        with PeakMemory(info.device, enabled=measure) as mem:
            loss, logits = batch_loss(net, images, labels, config)
            loss.backward()
        optimizer.step()
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        if measure:
            peak, mem_method = mem.peak_bytes, mem.method
        else:  # the memory tracker slows its step down: keep it out of the timings
            step_ms.append(1e3 * (time.perf_counter() - tic))
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite training loss at epoch {epoch}, step {k}")
        sol = model.deq.last_solution
        assert sol is not None
        loss_sum += float(F.cross_entropy(logits.detach(), labels)) * labels.numel()
        correct += float((logits.detach().argmax(1) == labels).sum())
        count += labels.numel()
        fwd_iters.append(sol.nstep)
        fwd_res.append(float(sol.residual.max()))
        fwd_conv.append(float(sol.converged.double().mean()))
        bwd_iters.append(backward_iterations(sol, config))
        if sol.backward.residual is not None:
            bwd_res.append(float(sol.backward.residual.max()))
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{loss_value:.3f}", fwd=sol.nstep, refresh=False)
    loss_sum, correct, count = distributed.all_sum([loss_sum, correct, count], info)
    return {
        "epoch": epoch,
        "step": step + steps,
        "lr": lr,
        "train_loss": loss_sum / count,
        "train_acc": correct / count,
        "fwd_iters_mean": statistics.fmean(fwd_iters),
        "fwd_iters_max": max(fwd_iters),
        "fwd_residual_max": max(fwd_res),
        "fwd_residual_mean": statistics.fmean(fwd_res),
        "fwd_converged": statistics.fmean(fwd_conv),
        "bwd_iters_mean": statistics.fmean(bwd_iters),
        "bwd_residual_max": max(bwd_res) if bwd_res else None,
        "step_ms": statistics.median(step_ms) if step_ms else None,
        "peak_mem_mb": None if peak is None else peak / 2**20,
        "mem_method": mem_method,
        "world_size": info.world_size,
        "threads": torch.get_num_threads(),
    }


def _scalars(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not isinstance(v, list)}


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    mem = "" if row["peak_mem_mb"] is None else f" | mem {row['peak_mem_mb']:.1f} MB"
    return (
        f"epoch {row['epoch']:>3}/{epochs} | loss {row['train_loss']:.4f} | "
        f"train {100 * row['train_acc']:.2f}% | test {100 * row['test_acc']:.2f}% | "
        f"fwd it {row['fwd_iters_mean']:.1f} (res {row['fwd_residual_max']:.1e}) | "
        f"bwd it {row['bwd_iters_mean']:.1f} | eval it {row['eval_iters']} | "
        f"{row['epoch_time_s']:.1f}s{mem}"
    )


def _summary(
    run: RunFolder,
    config: DigitsConfig,
    info: DistInfo,
    model: DigitsDEQ,
    last: dict[str, Any],
    wall_s: float,
) -> dict[str, Any]:
    rows = run.read_metrics() if info.is_main else [last]
    peaks = [r["peak_mem_mb"] for r in rows if r.get("peak_mem_mb") is not None]
    return {
        "recipe": RECIPE,
        "run_dir": str(run.path),
        "checkpoint": str(run.checkpoint),
        "epochs": last.get("epoch"),
        "test_acc": last["test_acc"],
        "test_loss": last["test_loss"],
        "eval_iters": last["eval_iters"],
        "eval_residual_max": last["eval_residual_max"],
        "eval_converged": last["eval_converged"],
        "fwd_iters_mean": last.get("fwd_iters_mean"),
        "fwd_residual_max": last.get("fwd_residual_max"),
        "bwd_iters_mean": last.get("bwd_iters_mean"),
        "step_ms": last.get("step_ms"),
        "train_time_s": sum(r.get("epoch_time_s", 0.0) for r in rows),
        "wall_time_s": wall_s,
        "peak_mem_mb": max(peaks) if peaks else None,
        "mem_method": last.get("mem_method"),
        "params": sum(p.numel() for p in model.parameters()),
        "world_size": info.world_size,
        "device": str(info.device),
        "threads": torch.get_num_threads(),
        "solver": config.solver,
        "backward": config.backward,
        "config": to_dict(config),
    }


# ----------------------------------------------------------------------------------------------
# Evaluation of a checkpoint


def load_model(checkpoint: str | Path, **overrides: Any) -> tuple[DigitsDEQ, DigitsConfig]:
    """Rebuild the model of a checkpoint from its saved config and load its weights.

    Args:
        checkpoint: ``checkpoint.safetensors`` or its run folder.
        overrides: config fields to change (e.g. ``eval_max_iter=100``, ``solver="broyden"``).
    """
    ckpt = load_checkpoint(checkpoint, recipe=RECIPE)
    # the saved config is metadata, outside the tensors' checksum: check it on its own first,
    # so that a damaged one is a checkpoint error and a bad override a config error
    try:
        saved = from_dict(DigitsConfig, {**ckpt.config, "resume": False})
    except ConfigError as e:
        raise CheckpointError(f"{ckpt.path}: its saved config is not valid ({e})") from None
    config = from_dict(DigitsConfig, {**to_dict(saved), **overrides}) if overrides else saved
    model = build_model(config)
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        raise CheckpointError(
            f"{ckpt.path}: its tensors do not fit the model of its saved config ({e})"[:400]
        ) from None
    return model, config


def evaluate(
    checkpoint: str | Path,
    *,
    eval_max_iter: int | None = None,
    eval_tol: float | None = None,
    solver: SolverName | None = None,
) -> dict[str, Any]:
    """Test accuracy and solver statistics of a saved model (``equilibria eval``).

    Args:
        checkpoint: ``checkpoint.safetensors`` or its run folder.
        eval_max_iter: override the saved evaluation budget.
        eval_tol: override the saved evaluation tolerance.
        solver: override the saved forward solver.
    """
    overrides: dict[str, Any] = {}
    if eval_max_iter is not None:
        overrides["eval_max_iter"] = eval_max_iter
    if eval_tol is not None:
        overrides["eval_tol"] = eval_tol
    if solver is not None:
        overrides["solver"] = solver
    model, config = load_model(checkpoint, **overrides)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    _, _, x_test, y_test = load_data(dtype=dtype)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        tic = time.perf_counter()
        result = evaluate_model(model, x_test, y_test)
        result["eval_time_s"] = time.perf_counter() - tic
    finally:
        torch.set_num_threads(threads)
    result.update(
        checkpoint=str(checkpoint),
        solver=config.solver,
        eval_tol=config.eval_tol,
        eval_max_iter=config.eval_max_iter,
        backward=config.backward,
    )
    return result
