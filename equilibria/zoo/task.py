"""The recipe interface: what a recipe supplies to the one trainer (:mod:`equilibria.zoo.trainer`).

A recipe is a :class:`Task` subclass: a config dataclass, data, a model, a loss and its metrics,
and a headline metric with its direction. Everything else (seeds and RNG state, CPU threads,
data-parallel training under ``torchrun``, the learning-rate schedule, timing, memory,
``metrics.jsonl``, checkpoints and exact resume, reports, progress bars, sweeps) is the trainer's.

Example (a sketch; see ``digits.py`` and ``mosaic.py`` for complete recipes)::

    class MyTask(Task):
        name = "mine"
        config_class = MyConfig          # frozen dataclass(RunOptions) with seed, lr, ...
        headline = Metric("test_acc", "test accuracy", percent=True)

        def setup(self, device): self.data = load(device)
        def build_model(self): return MyNet(self.config)
        def schedule(self): return Schedule(self.config.epochs, steps_per_epoch=10, warmup=10)
        def batches(self, epoch, info): yield from ...
        def train_step(self, net, model, batch): return StepOutput(loss_of(net, batch))
        def evaluate(self, model): return {"test_acc": ...}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .config import ConfigError, check_fields, option
from .distributed import DistInfo


@dataclass(frozen=True)
class RunOptions:
    """The trainer's options, inherited by every recipe's config dataclass. They are run control:
    a ``--resume`` may change them (the thread count only where the numbers do not depend on
    it; the trainer refuses another count on the CPU)."""

    threads: int = option(
        1,
        "torch CPU threads (0 = torch's default); a CPU run resumes only with the thread count "
        "it was trained with, which changes the numbers",
        resumable=True,
    )
    run_dir: str = option("", "run folder (default: runs/RECIPE/<timestamp>)", resumable=True)
    resume: bool = option(
        False, "continue the run in --run-dir from its checkpoint", resumable=True
    )
    quiet: bool = option(False, "no progress bar; print only the summary", resumable=True)
    measure_memory: bool = option(
        True, "measure peak memory on the first step of each epoch", resumable=True
    )
    report: bool = option(True, "write report.md with plots at the end", resumable=True)

    def __post_init__(self) -> None:
        """Check every field's type, and that ``resume`` comes with ``run_dir``; a recipe's
        config calls this first and adds its own checks."""
        check_fields(self)
        if self.resume and not self.run_dir:
            raise ConfigError(
                f"{type(self).__name__}: resume needs run_dir (the folder of the run to continue)"
            )


@dataclass(frozen=True)
class Metric:
    """A named number of a run: how to label, format and rank it.

    Attributes:
        key: its key in ``metrics.jsonl`` rows and summaries.
        label: human-readable name (tables, reports).
        higher_is_better: its direction (sweeps name the best variant by it).
        percent: stored as a fraction, shown as a percentage.
        fmt: format spec of the shown value.
    """

    key: str
    label: str
    higher_is_better: bool = True
    percent: bool = False
    fmt: str = ".4g"

    def show(self, value: Any) -> str:
        """The value as text (``–`` when missing)."""
        if value is None:
            return "–"
        if not isinstance(value, (int, float)):
            return str(value)
        return f"{100 * value:.2f}%" if self.percent else format(value, self.fmt)


# metrics every run has: the trainer's median step time and the default training loss
STEP_MS = Metric("step_ms", "ms / step", higher_is_better=False, fmt=".1f")
TRAIN_LOSS = Metric("train_loss", "train loss", higher_is_better=False, fmt=".4f")


@dataclass(frozen=True)
class Plot:
    """One figure of ``report.md``: per-epoch series, or (``trace``) a per-iteration list saved
    in some epochs' rows (e.g. a solver's residuals).

    Attributes:
        name: file stem of the PNG.
        title: figure title.
        ylabel: y-axis label.
        series: (row key, legend label) pairs.
        log: logarithmic y axis.
        trace: the keys hold lists; plot them against their index for a few epochs.
        hline: the config option whose value is drawn as a dashed line (e.g. a tolerance).
    """

    name: str
    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]
    log: bool = False
    trace: bool = False
    hline: str | None = None


@dataclass(frozen=True)
class Schedule:
    """Steps of a run: ``epochs`` epochs of ``steps_per_epoch`` optimizer steps (the last epoch
    may be cut to ``total`` steps), linear warm-up over ``warmup`` steps, then cosine decay."""

    epochs: int
    steps_per_epoch: int
    warmup: int
    total: int = 0

    def __post_init__(self) -> None:
        if not self.total:
            object.__setattr__(self, "total", self.epochs * self.steps_per_epoch)

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps of epoch ``epoch`` (1-based)."""
        return min(self.steps_per_epoch, self.total - (epoch - 1) * self.steps_per_epoch)

    def lr(self, step: int, peak: float) -> float:
        """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
        if step < self.warmup:
            return peak * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        return peak * 0.5 * (1.0 + math.cos(math.pi * (step - self.warmup) / span))


@dataclass
class StepOutput:
    """What one training step of a task returns.

    Attributes:
        loss: the scalar loss the trainer backpropagates.
        outputs: whatever :meth:`Task.step_metrics` needs after the optimizer step (e.g. logits).
    """

    loss: Tensor
    outputs: Any = None


class Task:
    """Base class of a recipe; one instance per run, built from its validated config.

    The config dataclass derives from :class:`RunOptions` (the trainer's options) and has
    ``seed`` and ``lr`` (and ``weight_decay`` for the default optimizer) besides its own.

    Class attributes:
        name: registry name.
        config_class: the config dataclass.
        headline: the metric a comparison ranks by.
        table_metrics: metrics of the sweep table (after the headline).
        epoch_columns: columns of the per-epoch table of ``report.md``.
        plots: figures of ``report.md``.
        eval_options: config fields ``equilibria eval`` may override.
        variants: named config changes that ``equilibria sweep`` compares.
        max_params: the most parameters a saved config may ask for (checked on the meta device
            before a model is built for ``eval`` or ``--resume``).
        extras: optional modules a run needs (imported before anything is written).
        distributed: whether the task trains under ``torchrun`` with several processes.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    headline: ClassVar[Metric]
    table_metrics: ClassVar[tuple[Metric, ...]] = ()
    epoch_columns: ClassVar[tuple[Metric, ...]] = ()
    plots: ClassVar[tuple[Plot, ...]] = ()
    eval_options: ClassVar[tuple[str, ...]] = ()
    variants: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    max_params: ClassVar[int] = 50_000_000
    # options the recipe gained after runs were saved: the value those runs were trained with
    # (resume, evaluation and sweeps read a saved config's missing option from here, not from
    # today's default)
    record_defaults: ClassVar[Mapping[str, Any]] = {}
    extras: ClassVar[tuple[str, ...]] = ()
    distributed: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"config must be a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config

    # --- what every recipe supplies ---------------------------------------------------------

    def setup(self, device: torch.device) -> None:
        """Load or generate the data on ``device`` (called once per run, after seeding)."""

    def check(self, info: DistInfo) -> None:
        """Refuse options that do not fit this run (e.g. process count), before anything is
        written; raise :class:`~equilibria.zoo.config.ConfigError`."""

    def build_model(self) -> nn.Module:
        """A freshly initialised model (the trainer seeds torch first)."""
        raise NotImplementedError

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW over every parameter at the config's ``lr`` and ``weight_decay``."""
        return torch.optim.AdamW(
            model.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )

    def schedule(self) -> Schedule:
        """Epochs, steps and warm-up of the run."""
        raise NotImplementedError

    def batches(self, epoch: int, info: DistInfo) -> Iterable[Any]:
        """This process's batches of epoch ``epoch`` (1-based), reproducible from the seed and
        the epoch (or from :meth:`state_dict`)."""
        raise NotImplementedError

    def train_step(self, net: nn.Module, model: nn.Module, batch: Any) -> StepOutput:
        """Forward one batch through ``net`` (``model``, possibly wrapped in DDP)."""
        raise NotImplementedError

    def step_metrics(
        self, model: nn.Module, batch: Any, out: StepOutput
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Numbers of one finished step (after backward and the optimizer step): ``(sums,
        values)``. Sums are added over the epoch's steps and over processes (e.g. correct
        counts); values are kept per step on this process (e.g. solver iterations) and reduced
        by :meth:`epoch_metrics`. Default: the loss as the value ``train_loss``."""
        return {}, {"train_loss": float(out.loss.detach())}

    def epoch_metrics(self, sums: dict[str, float], values: dict[str, list[Any]]) -> dict[str, Any]:
        """The training metrics of an epoch from its steps' outputs (default: sums as they are,
        means of the values)."""
        out: dict[str, Any] = dict(sums)
        for key, seq in values.items():
            kept = [v for v in seq if v is not None]
            out[key] = sum(kept) / len(kept) if kept else None
        return out

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Held-out metrics of ``model`` (the trainer calls it in eval mode without gradients)."""
        raise NotImplementedError

    # --- optional ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state of the data stream that a checkpoint must keep (default: none, the
        batches follow from the seed and the epoch)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (on resume)."""

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        """Recipe-specific entries of ``summary.json`` (besides the last epoch's metrics)."""
        return {}

    def describe(self, summary: dict[str, Any]) -> list[str]:
        """Lines printed after training, below the headline (default: none)."""
        return []

    def describe_eval(self, result: dict[str, Any]) -> list[str]:
        """Lines printed by ``equilibria eval``, below the headline (default: none)."""
        return []


class NumpyStreamTask(Task):
    """A task whose training batches are drawn fresh from a NumPy generator ``self.rng`` (set in
    :meth:`~Task.setup`), not from the seed and the epoch: the checkpoint keeps the generator's
    state, so a resumed run draws the batches an uninterrupted run would have drawn."""

    rng: Any

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import numpy as np

        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]  # a malformed state raises here
        self.rng = rng
