"""The ``flow`` recipe: optical flow on generated data, RAFT against DEQ-Flow of the same size.

Pairs of grey frames with exact flow are generated from scikit-image's photographs
(:mod:`equilibria.zoo.flow_data`; test pairs use other photographs than training). The model
(:mod:`equilibria.zoo.flow_model`) is a compact RAFT: ``--model raft`` unrolls its update block
``--iters`` times under RAFT's sequence loss; ``--model deq`` solves for the equilibrium of the same
block on the (hidden, flow) state with :class:`equilibria.DEQ`, trained with a phantom gradient and
fixed-point correction (``--correction-states``, losses weighted by ``--gamma``), or with
``--backward implicit``. :func:`sequence_reuse` measures fixed-point reuse on sequences: each pair's
solve starts from the previous pair's equilibrium with its flow carried forward.

Usage::

    equilibria train flow --model deq --seed 0
    equilibria train flow --model raft --steps 1500
    equilibria eval runs/flow/<run> --eval-iters 32
    equilibria sweep flow --run-dir runs/flow-table   # RAFT and DEQ-Flow x 3 seeds

Reference: Bai, Geng, Mangalam, Bansal, Feng & Kolter, "Deep Equilibrium Optical Flow
Estimation", CVPR 2022; Teed & Deng, "RAFT", ECCV 2020.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

import equilibria as eq

from . import trainer
from .config import ConfigError, check_range, option
from .flow_data import FlowSequences, make_sequences
from .flow_model import RAFT, DEQFlow, end_point_error, forward_warp, sequence_loss
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
    "ClippedAdamW",
    "FlowConfig",
    "FlowTask",
    "build_model",
    "evaluate_flow",
    "sequence_reuse",
    "train",
]

_TEST_SEED = 20_000  # the test pairs are the same for every run


@dataclass(frozen=True)
class FlowConfig(RunOptions):
    """Options of one flow run (each is an option ``--name-with-dashes``), validated on
    construction: a wrong type or value raises :class:`ConfigError` naming the option, the value
    and what is allowed."""

    model: Literal["raft", "deq"] = option(
        "deq", "'raft' (unrolled updates, sequence loss) or 'deq' (DEQ-Flow: equilibrium)"
    )
    # data
    size: int = option(64, "side of the square frames (a multiple of 4 * 2^(levels - 1))")
    max_objects: int = option(2, "moving foreground objects per pair: 0..max_objects")
    motion: float = option(2.0, "scale of the generated motion (2: ~7 px mean flow at size 64)")
    test_pairs: int = option(256, "held-out test pairs (other source photographs)")
    # model (same for both)
    width: int = option(16, "channels of the feature and context encoders")
    hidden: int = option(16, "channels of the GRU hidden state")
    context: int = option(16, "channels of the context features")
    motion_channels: int = option(24, "channels of the motion encoder")
    levels: int = option(2, "correlation pyramid levels")
    radius: int = option(2, "correlation lookup radius")
    # RAFT
    iters: int = option(12, "RAFT: unrolled update iterations in training")
    gamma: float = option(
        0.8, "loss weight decay: RAFT's sequence loss, DEQ-Flow's fixed-point correction"
    )
    # DEQ-Flow
    solver: Literal["anderson", "broyden", "picard"] = option("anderson", "DEQ forward solver")
    max_iter: int = option(12, "DEQ: solver budget in training")
    tol: float = option(1e-3, "DEQ: relative tolerance of the solve (training and test)")
    backward: Literal["phantom", "implicit"] = option("phantom", "DEQ: gradient method")
    phantom_steps: int = option(1, "DEQ: differentiable steps of the phantom gradient")
    phantom_damping: float = option(1.0, "DEQ: damping lambda of the phantom gradient, (0, 1]")
    correction_states: int = option(
        2, "DEQ: states supervised along the trajectory (fixed-point correction; 1 = off)"
    )
    flow_decay: float = option(
        0.9,
        "DEQ: the map's flow update is flow' = flow_decay * flow + delta, in (0, 1]; < 1 makes"
        " the flow path contractive so that the solve reaches a fixed point (1: RAFT's update)",
    )
    jacobian_weight: float = option(
        0.0, "DEQ: weight of the Jacobian penalty ||J||_F^2 / D at the equilibrium (0 = off)"
    )
    # test time
    eval_iters: int = option(
        12, "test-time update iterations: RAFT unrolls this many, DEQ-Flow's solver budget"
    )
    # optimisation
    steps: int = option(1500, "optimisation steps (each on freshly generated pairs)")
    batch_size: int = option(8, "pairs per step")
    lr: float = option(2e-3, "peak learning rate of AdamW (cosine decay after a warm-up)")
    weight_decay: float = option(1e-5, "AdamW weight decay")
    clip: float = option(1.0, "clip the gradient's global norm to this (RAFT's 1.0; 0 = off)")
    eval_every: int = option(
        250, "steps per epoch: the test pairs are evaluated and a checkpoint written after each"
    )
    seed: int = option(0, "seed of the initialisation and of the training pairs")

    def __post_init__(self) -> None:
        super().__post_init__()
        bounds = {
            "size": (16, 128), "max_objects": (0, 4), "test_pairs": (1, 10_000),
            "width": (2, 512), "hidden": (1, 512), "context": (1, 512),
            "motion_channels": (4, 512), "levels": (1, 4), "radius": (1, 8), "iters": (1, 100),
            "max_iter": (1, 500), "phantom_steps": (1, 50), "correction_states": (1, 50),
            "eval_iters": (1, 500), "steps": (1, 10**7), "batch_size": (1, 4096),
            "eval_every": (1, 10**7), "threads": (0, 256), "seed": (0, 2**32 - 1),
        }  # fmt: skip
        for name, (low, high) in bounds.items():
            check_range(self, name, low=low, high=high)
        check_range(self, "motion", low=0, high=4, low_open=True)
        check_range(self, "gamma", low=0, high=1, low_open=True)
        check_range(self, "phantom_damping", low=0, high=1, low_open=True)
        check_range(self, "tol", low=0)
        check_range(self, "lr", low=0, low_open=True)
        check_range(self, "weight_decay", low=0)
        check_range(self, "clip", low=0)
        check_range(self, "jacobian_weight", low=0)
        check_range(self, "flow_decay", low=0, high=1, low_open=True)
        multiple = 4 * 2 ** (self.levels - 1)
        if self.size % multiple:
            raise ConfigError(
                f"FlowConfig: size must be a multiple of {multiple} (features at 1/4, "
                f"levels={self.levels} pyramid levels), got {self.size}"
            )
        if self.model == "deq" and self.correction_states > self.max_iter:
            raise ConfigError(
                f"FlowConfig: correction_states must be <= max_iter={self.max_iter} (states "
                f"along the solver's trajectory), got {self.correction_states}"
            )


def build_model(config: FlowConfig) -> RAFT | DEQFlow:
    """The model of ``config`` (RAFT or DEQ-Flow; same encoders and update block)."""
    sizes = {"width": config.width, "hidden": config.hidden, "context": config.context,
             "motion": config.motion_channels, "levels": config.levels,
             "radius": config.radius}  # fmt: skip
    if config.model == "raft":
        return RAFT(iters=config.iters, **sizes)
    backward: eq.Backward = eq.Phantom(steps=config.phantom_steps, damping=config.phantom_damping)
    if config.backward == "implicit":
        backward = eq.Implicit()
    return DEQFlow(solver=config.solver, backward=backward,
                   correction_states=config.correction_states,
                   jacobian_samples=1 if config.jacobian_weight else 0, max_iter=config.max_iter,
                   tol=config.tol, eval_max_iter=config.eval_iters, eval_tol=config.tol,
                   flow_decay=config.flow_decay, **sizes)  # fmt: skip


def evaluate_flow(
    model: nn.Module,
    data: FlowSequences,
    *,
    iters: int | None = None,
    tol: float | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Test metrics of ``model`` (in eval mode, without gradients) on the first pair of each
    sequence of ``data``.

    Args:
        iters: test-time iterations (default: the model's eval setting).
        tol: DEQ only: this evaluation's tolerance (0 runs exactly ``iters`` iterations).

    Returns:
        ``epe`` (all pixels), ``epe_valid`` (non-occluded pixels), ``zero_flow_epe``,
        ``eval_iters`` (mean solver iterations per batch; RAFT: its unrolled count) and
        ``residual`` (DEQ only, else None: median over pairs of the relative residual of the
        solver's last iteration).
    """
    model.eval()
    epe_sum, valid_sum, valid_count, its = 0.0, 0.0, 0, []
    residuals: list[Tensor] = []
    n = data.frames.shape[0]
    kwargs: dict[str, Any] = {"iters": iters}
    if isinstance(model, DEQFlow):
        kwargs["tol"] = tol
    with torch.no_grad():
        for start in range(0, n, batch_size):
            frames = data.frames[start : start + batch_size]
            target = data.flows[start : start + batch_size, 0]
            valid = data.valid[start : start + batch_size, 0]
            out = model(frames[:, 0], frames[:, 1], **kwargs)
            epe = (out.predictions[-1] - target).norm(dim=1)  # (B, H, W)
            epe_sum += float(epe.mean()) * frames.shape[0]
            valid_sum += float(epe[valid].sum())
            valid_count += int(valid.sum())
            its.append(out.iterations)
            if out.residuals is not None:
                residuals.append(out.residuals[-1])
    zero = data.flows[:, 0].norm(dim=1)
    return {
        "epe": epe_sum / n,
        "epe_valid": valid_sum / max(valid_count, 1),
        "zero_flow_epe": float(zero.mean()),
        "eval_iters": statistics.fmean(its),
        "residual": float(torch.cat(residuals).median()) if residuals else None,
    }


def sequence_reuse(
    model: DEQFlow, data: FlowSequences, *, tol: float, max_iter: int
) -> dict[str, Any]:
    """Fixed-point reuse on sequences: every pair after the first is solved twice to ``tol``,
    from the default start (cold) and from the previous pair's equilibrium with its flow carried
    forward (:func:`~equilibria.zoo.flow_model.forward_warp`) (warm).

    Returns:
        ``cold_iters`` / ``warm_iters`` (mean per sample and pair of the iterations until its
        relative residual first fell below ``tol``, ``max_iter`` if never), ``cold_epe`` /
        ``warm_epe`` and ``iter_saving`` = 1 - warm / cold.
    """
    if not isinstance(model, DEQFlow):
        raise TypeError(f"model must be a DEQFlow, got {type(model).__name__}")
    if data.frames.shape[1] < 3:
        raise ValueError(
            f"data must hold sequences of >= 3 frames (reuse starts at the second pair), got "
            f"{data.frames.shape[1]} frames"
        )
    model.eval()
    frames, flows = data.frames, data.flows
    cold_its, warm_its, cold_epe, warm_epe = [], [], [], []

    def iterations(residuals: Tensor) -> Tensor:
        """(nstep, B) residuals -> (B,) cell evaluations until the first iterate below tol."""
        below = residuals <= tol
        first = below.float().argmax(0) + 1
        return torch.where(below.any(0), first, residuals.shape[0]).float()

    with torch.no_grad():
        state = None
        for t in range(frames.shape[1] - 1):
            f1, f2, target = frames[:, t], frames[:, t + 1], flows[:, t]
            cold = model(f1, f2, iters=max_iter, tol=tol)
            if state is not None:
                hidden, low = state
                warm = model(f1, f2, iters=max_iter, tol=tol, init=(hidden, forward_warp(low)))
                assert cold.residuals is not None and warm.residuals is not None
                cold_its.append(iterations(cold.residuals))
                warm_its.append(iterations(warm.residuals))
                cold_epe.append(float(end_point_error(cold.predictions[-1], target)))
                warm_epe.append(float(end_point_error(warm.predictions[-1], target)))
                state = warm.state
            else:
                state = cold.state
    cold_mean = float(torch.cat(cold_its).mean())
    warm_mean = float(torch.cat(warm_its).mean())
    return {
        "cold_iters": cold_mean,
        "warm_iters": warm_mean,
        "cold_epe": statistics.fmean(cold_epe),
        "warm_epe": statistics.fmean(warm_epe),
        "iter_saving": 1.0 - warm_mean / cold_mean,
    }


# ---------------------------------------------------------------------------------------------
# The recipe on the trainer.


class ClippedAdamW(torch.optim.AdamW):
    """AdamW whose :meth:`step` first scales the gradients of all its parameters so that their
    global L2 norm is at most ``max_norm`` (``torch.nn.utils.clip_grad_norm_``), as RAFT and
    DEQ-Flow train (Teed & Deng, ECCV 2020: clip 1.0). Its state dict is AdamW's."""

    def __init__(self, params: Any, *, max_norm: float, **kwargs: Any) -> None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
            raise TypeError(f"max_norm must be a finite number > 0, got {max_norm!r}")
        if not 0 < max_norm < float("inf"):
            raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
        super().__init__(params, **kwargs)
        self.max_norm = float(max_norm)

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:  # the gradients to clip are the ones the closure computes
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            grads = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                torch.nn.utils.clip_grad_norm_(grads, self.max_norm)
            super().step()
        return loss


VARIANTS: dict[str, dict[str, Any]] = {
    "RAFT (12 unrolled)": {"model": "raft"},
    "DEQ-Flow (phantom + correction)": {"model": "deq"},
    "DEQ-Flow (implicit)": {"model": "deq", "backward": "implicit", "correction_states": 1},
}


class FlowTask(NumpyStreamTask):
    """The flow recipe for :func:`equilibria.zoo.trainer.train`: an epoch is ``eval_every``
    steps, each on a fresh batch of pairs drawn from one seeded stream (checkpointed)."""

    name = "flow"
    config_class = FlowConfig
    headline = Metric("epe", "test EPE (px)", higher_is_better=False, fmt=".3f")
    table_metrics = (
        Metric("epe_valid", "EPE non-occl.", higher_is_better=False, fmt=".3f"),
        Metric("eval_iters", "test it.", higher_is_better=False, fmt=".1f"),
        STEP_MS,
        Metric("peak_mem_mb", "peak MB", higher_is_better=False, fmt=".1f"),
    )
    epoch_columns = (
        TRAIN_LOSS,
        Metric("epe", "test EPE", higher_is_better=False, fmt=".3f"),
        Metric("epe_valid", "EPE non-occl.", higher_is_better=False, fmt=".3f"),
        Metric("fwd_iters_mean", "fwd it.", higher_is_better=False, fmt=".1f"),
        Metric("eval_iters", "test it.", higher_is_better=False, fmt=".1f"),
        STEP_MS,
    )
    plots = (
        Plot("loss", "training loss", "weighted L1", (("train_loss", "train"),), log=True),
        Plot("epe", "test end-point error", "EPE (px)",
             (("epe", "all pixels"), ("epe_valid", "non-occluded"))),
    )  # fmt: skip
    eval_options = ("eval_iters", "tol", "solver")
    variants = VARIANTS
    extras = ("skimage", "safetensors")

    def setup(self, device: torch.device) -> None:
        c = self.config
        self.data_options = {"size": c.size, "max_objects": c.max_objects, "motion": c.motion}
        rng = np.random.default_rng(_TEST_SEED)
        self.test = make_sequences(rng, "test", c.test_pairs, frames=2, **self.data_options)
        self.rng = np.random.default_rng(c.seed)  # the training pairs, one stream

    def build_model(self) -> nn.Module:
        return build_model(self.config)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW that clips the gradient's global norm to ``clip`` before each step (RAFT's
        training; no clipping with ``clip=0``)."""
        c = self.config
        if not c.clip:
            return super().make_optimizer(model)
        return ClippedAdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                            max_norm=c.clip)  # fmt: skip

    def schedule(self) -> Schedule:
        c = self.config
        epochs = -(-c.steps // c.eval_every)
        return Schedule(epochs, c.eval_every, max(1, c.steps // 20), total=c.steps)

    def batches(self, epoch: int, info: Any) -> Iterator[FlowSequences]:
        for _ in range(self.schedule().steps_in(epoch)):
            yield make_sequences(self.rng, "train", self.config.batch_size, frames=2,
                                 **self.data_options)  # fmt: skip

    def train_step(self, net: nn.Module, model: nn.Module, batch: Any) -> StepOutput:
        out = net(batch.frames[:, 0], batch.frames[:, 1])
        loss = sequence_loss(out.predictions, batch.flows[:, 0], self.config.gamma)
        if out.jacobian is not None:
            loss = loss + self.config.jacobian_weight * out.jacobian
        return StepOutput(loss, out.iterations)

    def step_metrics(
        self, model: nn.Module, batch: Any, out: StepOutput
    ) -> tuple[dict[str, float], dict[str, Any]]:
        return {}, {"train_loss": float(out.loss.detach()), "fwd_iters": out.outputs}

    def epoch_metrics(self, sums: dict[str, float], values: dict[str, list[Any]]) -> dict:
        return {
            "train_loss": statistics.fmean(values["train_loss"]),
            "fwd_iters_mean": statistics.fmean(values["fwd_iters"]),
        }

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        # RAFT's own ``iters`` is its training unroll: test time unrolls ``eval_iters``
        return evaluate_flow(model, self.test, iters=self.config.eval_iters)

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.config.model, "ms_per_step": last.get("step_ms")}

    def describe(self, s: dict[str, Any]) -> list[str]:
        ms = "–" if s.get("step_ms") is None else f"{s['step_ms']:.1f}"
        return [
            f"{s['model']}: test EPE {s['epe']:.3f} px (non-occluded {s['epe_valid']:.3f}, zero "
            f"flow {s['zero_flow_epe']:.3f}) with {s['eval_iters']:.1f} test iterations; "
            f"{ms} ms per training step"
        ]

    def describe_eval(self, r: dict[str, Any]) -> list[str]:
        return [
            f"EPE non-occluded {r['epe_valid']:.3f} px, zero flow {r['zero_flow_epe']:.3f} px, "
            f"{r['eval_iters']:.1f} test iterations"
        ]


def train(
    config: FlowConfig, *, on_epoch_end: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Train one flow model with :func:`equilibria.zoo.trainer.train` (see there)."""
    return trainer.train(FlowTask(config), on_epoch_end=on_epoch_end)
