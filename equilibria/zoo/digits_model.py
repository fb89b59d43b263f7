"""The digits recipe's data and model: scikit-learn's 8×8 digits and an MDEQ-style DEQ.

Data: the 1797 digits shipped with scikit-learn (no download), split once into 1437 training and
360 test images (stratified, ``random_state=0``), scaled with the training mean and std; training
images are shifted by up to one pixel (seeded, optional; the pixels shifted in are background).

Model (single-resolution, after Bai, Koltun & Kolter, "Multiscale Deep Equilibrium Models",
NeurIPS 2020):

* injection x = conv3×3(image): (B, 1, 8, 8) -> (B, C, 8, 8);
* cell f(z, x) = GroupNorm(ReLU(conv3×3(z; W) + x)), with W weight-normalised per filter to a
  fixed norm ``gain`` (computed once per forward call, not per iteration): the gain bounds how
  strongly z feeds back into itself, so the equilibrium stays easy to find while training;
* z* = f(z*, x) by the chosen solver, gradients by the chosen backward method;
* head: linear on the flattened z* (C·64 -> 10).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import equilibria as eq
from equilibria._validate import check_float

if TYPE_CHECKING:
    from .digits import DigitsConfig

TEST_SIZE = 360
TRAIN_SIZE = 1797 - TEST_SIZE


# ----------------------------------------------------------------------------------------------
# Data


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
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
    background = float(np.float32(-mean / std))  # a blank pixel (0) after the scaling
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test], background


def background_value() -> float:
    """The standardised value of a blank pixel (0 before scaling): -mean / std of the training
    images, about -0.81. Every image of the split has blank pixels, so it is also each image's
    minimum; 0 after the scaling is the mean intensity, a grey stroke."""
    return _digits()[4]


def load_data(
    *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, subset: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fixed split as tensors: train images (N, 1, 8, 8), labels (N,), test images, labels.

    Args:
        device: where the tensors live.
        dtype: image dtype.
        subset: keep only the first ``subset`` training images (0 = all).
    """
    x_train, y_train, x_test, y_test, _ = _digits()
    if subset:
        x_train, y_train = x_train[:subset], y_train[:subset]

    def images(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a).to(device=device, dtype=dtype).unsqueeze(1)

    def labels(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a).to(device)

    return images(x_train), labels(y_train), images(x_test), labels(y_test)


def shift_images(images: Tensor, shifts: Tensor, fill: float = 0.0) -> Tensor:
    """Shift each image by (dy, dx) in {-1, 0, 1}² given as ``shifts`` (B, 2) in {0, 1, 2}.

    Args:
        images: (B, 1, H, W).
        shifts: (B, 2) integers in {0, 1, 2}: 1 + (dy, dx).
        fill: the value of the pixels shifted in: the images' background. For standardised
            digits that is :func:`background_value` (about -0.81), not the default 0, which
            is the mean intensity: a grey stroke along the edge shifted in.
    """
    fill = check_float("fill", fill)
    b, _, h, w = images.shape
    padded = F.pad(images, (1, 1, 1, 1), value=fill)  # (B, 1, h + 2, w + 2)
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
