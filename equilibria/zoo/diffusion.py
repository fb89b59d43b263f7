"""The ``diffusion`` recipe: a small ε-model on scikit-learn's digits, sampled sequentially and in
parallel (one joint fixed point over all DDIM steps), scored by a Fréchet distance.

Training is DDPM's ε-objective (Ho et al., NeurIPS 2020): ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t)‖²
with t uniform over ``train_timesteps`` steps of the linear β schedule. Evaluation draws
``eval_samples`` samples from fixed noise with DDIM over ``sample_steps`` steps twice: by the
sequential loop (``solver="sequential"``) and by the parallel solver ``solver`` (default: the
library's default), and reports the Fréchet distance (FD) of each to the test split in the feature
space of a fixed digits classifier (:mod:`equilibria.zoo.diffusion_model`), the parallel solver's
rounds (sequential batched model calls) and NFE, and the largest relative difference between the
two samples. Headline: FD of the parallel samples; ``fd_train_images`` (the 1437 training
images against the same reference) is the floor a perfect model would reach. A PNG grid of
samples is written to the run folder (``samples.png``).

For other code (e.g. ``benchmarks/sampling.py``): :func:`load_eps_model` loads a trained model as
``model(x, t) -> eps`` with its training schedule ᾱ; :func:`ddim_schedule` makes the DDIM
schedule the recipe samples with::

    from equilibria.zoo.diffusion import load_eps_model, ddim_schedule
    model, alphas_cumprod = load_eps_model("runs/diffusion/<run>")   # a run folder or checkpoint
    sched = ddim_schedule(alphas_cumprod, steps=100)                   # sampling.DDIM
    x0, sol = sampling.sample(model, torch.randn(16, 1, 8, 8), sched)

:func:`trained_eps_model` does the same but trains the recipe in the folder first if it holds no
finished run (``trained_eps_model("runs/diffusion/bench")``, as ``benchmarks/inversion.py`` does).

Usage::

    equilibria train diffusion --seed 0
    equilibria eval runs/diffusion/<run> --solver picard
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import evaluation, trainer
from .config import ConfigError, check_range, differences, option, to_dict
from .diffusion_model import (
    EpsMLP,
    feature_net,
    frechet_distance,
    image_grid,
    linear_alphas_cumprod,
    load_digits01,
)
from .distributed import DistInfo
from .runs import read_json
from .task import STEP_MS, TRAIN_LOSS, Metric, Plot, RunOptions, Schedule, StepOutput, Task

__all__ = [
    "DiffusionConfig",
    "DiffusionTask",
    "ddim_schedule",
    "load_eps_model",
    "sample_quality",
    "train",
    "trained_eps_model",
]

RECIPE = "diffusion"
_EVAL_NOISE_SEED = 20_221_128  # the evaluation noise is the same for every run and epoch
_TEST_LOSS_SEED = 7


@dataclass(frozen=True)
class DiffusionConfig(RunOptions):
    """Options of the ``diffusion`` recipe (each is a command-line option ``--name-with-dashes``).

    Validated on construction: a wrong type or value raises ``ConfigError`` naming the option,
    the value and what is allowed.
    """

    width: int = option(160, "hidden width of the epsilon-MLP")
    depth: int = option(3, "residual blocks of the epsilon-MLP")
    emb: int = option(64, "size of the sinusoidal time embedding (even)")
    train_timesteps: int = option(1000, "diffusion steps of the training schedule (linear betas)")
    steps: int = option(10_000, "optimisation steps")
    eval_every: int = option(2500, "optimisation steps per epoch (evaluated and checkpointed)")
    batch_size: int = option(128, "training images per step")
    lr: float = option(2e-3, "peak learning rate of AdamW (warm-up, then cosine decay)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    seed: int = option(0, "seed of initialisation, data order, timesteps and noise")
    sample_steps: int = option(50, "DDIM sampling steps T in evaluation")
    eta: float = option(
        0.0, "DDIM eta in evaluation (0: deterministic; > 0: fixed pre-drawn noise)"
    )
    eval_samples: int = option(360, "samples drawn in evaluation (FD reference: 360 test images)")
    solver: str = option("default", "parallel solver of the joint DDIM fixed point")
    tol: float = option(1e-3, "tolerance of the parallel solver")
    max_rounds: int = option(0, "round budget of the parallel solver (0 = the solver's default)")

    def __post_init__(self) -> None:
        super().__post_init__()
        bounds = {
            "width": (4, 4096),
            "depth": (1, 64),
            "emb": (2, 4096),
            "train_timesteps": (2, 100_000),
            "steps": (1, 10**7),
            "eval_every": (1, 10**7),
            "batch_size": (1, 1437),
            "seed": (0, 2**32 - 1),
            "sample_steps": (1, self.train_timesteps),
            "eval_samples": (2, 100_000),
            "max_rounds": (0, 10**6),
            "threads": (0, 256),
        }
        for name, (low, high) in bounds.items():
            check_range(self, name, low=low, high=high)
        check_range(self, "lr", low=0, low_open=True)
        check_range(self, "tol", low=0, low_open=True)
        check_range(self, "eta", low=0, high=1)
        check_range(self, "weight_decay", low=0)
        if self.emb % 2:
            raise ConfigError(f"DiffusionConfig: emb must be even, got {self.emb}")


def ddim_schedule(alphas_cumprod: Tensor, steps: int, eta: float = 0.0) -> Any:
    """``sampling.DDIM`` over ``steps`` evenly spaced timesteps of the training schedule
    (diffusers' "leading" spacing: t_k = k·⌊N/T⌋, decreasing; ᾱ after the last step = 1)."""
    from equilibria import sampling

    if not isinstance(alphas_cumprod, Tensor) or alphas_cumprod.dim() != 1:
        got = tuple(alphas_cumprod.shape) if isinstance(alphas_cumprod, Tensor) else alphas_cumprod
        raise ValueError(f"alphas_cumprod must be a 1-d tensor (N,), got {got!r}")
    n = alphas_cumprod.shape[0]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n:
        raise ValueError(
            f"steps must be an int in [1, {n}] (the training schedule's length), got {steps!r}"
        )
    timesteps = torch.arange(steps, dtype=torch.int64).flip(0) * (n // steps)
    return sampling.DDIM(alphas_cumprod, timesteps, eta=eta, final_alpha_cumprod=1.0)


def build_model(config: DiffusionConfig) -> EpsMLP:
    return EpsMLP(config.width, config.depth, config.emb)


@torch.no_grad()
def sample_quality(
    model: Callable[[Tensor, Tensor], Tensor],
    sched: Any,
    x_T: Tensor,
    features: nn.Module,
    reference: Tensor,
    *,
    solver: str = "default",
    tol: float = 1e-3,
    max_rounds: int | None = None,
    noise: Tensor | None = None,
) -> tuple[dict[str, Any], Tensor]:
    """Sample from ``x_T`` sequentially and with ``solver``; FD of each to ``reference`` features.

    The samples are clamped to the image range [-1, 1] before their features are taken (as
    images are saved); ``noise`` is the pre-drawn noise of a stochastic schedule.

    Returns:
        (metrics, the parallel samples).
    """
    from equilibria import sampling

    tic = time.process_time()
    x_seq, sol_seq = sampling.sample(model, x_T, sched, solver="sequential", noise=noise)
    seq_cpu = time.process_time() - tic
    tic = time.process_time()
    x_par, sol = sampling.sample(model, x_T, sched, solver=solver, tol=tol, max_rounds=max_rounds,
                                 noise=noise)  # fmt: skip
    par_cpu = time.process_time() - tic
    diff = (x_par - x_seq).flatten(1).norm(dim=1) / x_seq.flatten(1).norm(dim=1).clamp_min(1e-12)
    fd_seq = frechet_distance(features.features(x_seq.clamp(-1, 1)), reference)
    fd_par = frechet_distance(features.features(x_par.clamp(-1, 1)), reference)
    converged = torch.as_tensor(sol.converged)
    return {
        "fd_parallel": fd_par,
        "fd_sequential": fd_seq,
        "fd_gap": abs(fd_par - fd_seq),
        "max_rel_diff": float(diff.max()),
        "rounds": int(sol.rounds),
        "nfe": int(sol.nfe),
        "seq_rounds": int(sol_seq.rounds),
        "converged": float(converged.double().mean()),
        "solver": str(sol.solver),
        "seq_cpu_s": seq_cpu,
        "par_cpu_s": par_cpu,
    }, x_par


class DiffusionTask(Task):
    """The diffusion recipe for :func:`equilibria.zoo.trainer.train`."""

    name = RECIPE
    config_class = DiffusionConfig
    headline = Metric("fd_parallel", "FD (parallel)", higher_is_better=False, fmt=".2f")
    table_metrics = (
        Metric("fd_sequential", "FD (sequential)", higher_is_better=False, fmt=".2f"),
        Metric("rounds", "rounds", higher_is_better=False),
        Metric("nfe", "NFE", higher_is_better=False),
        Metric("max_rel_diff", "max rel. diff", higher_is_better=False, fmt=".1e"),
        Metric("fd_train_images", "FD (training images)", higher_is_better=False, fmt=".2f"),
        STEP_MS,
    )
    epoch_columns = (
        TRAIN_LOSS,
        Metric("test_loss", "test loss", higher_is_better=False, fmt=".4f"),
        Metric("fd_sequential", "FD seq.", higher_is_better=False, fmt=".2f"),
        Metric("fd_parallel", "FD par.", higher_is_better=False, fmt=".2f"),
        Metric("rounds", "rounds", higher_is_better=False),
        Metric("max_rel_diff", "max rel. diff", higher_is_better=False, fmt=".1e"),
    )
    plots = (
        Plot("loss", "denoising loss", "MSE", (("train_loss", "train"), ("test_loss", "test")),
             log=True),
        Plot("fd", "Fréchet distance to the test split", "FD",
             (("fd_sequential", "sequential"), ("fd_parallel", "parallel")), log=True),
    )  # fmt: skip
    eval_options = ("solver", "tol", "max_rounds", "sample_steps", "eval_samples", "eta")
    max_params = 5_000_000
    extras = ("sklearn", "safetensors", "tqdm")

    def setup(self, device: torch.device) -> None:
        c = self.config
        self.alphas_cumprod = linear_alphas_cumprod(c.train_timesteps)
        x_train, _, x_test, _ = load_digits01(torch.float32)
        self.x_train, self.x_test = x_train.to(device), x_test.to(device)
        self.features = feature_net(c.run_dir or None)
        self.reference = self.features.features(x_test.double())
        # the floor: real images (the training split) against the same reference
        self.fd_real = frechet_distance(self.features.features(x_train.double()), self.reference)
        gen = torch.Generator().manual_seed(_EVAL_NOISE_SEED)
        self.eval_noise = torch.randn(c.eval_samples, 1, 8, 8, generator=gen)
        self.step_noise = None
        if c.eta > 0:  # the same pre-drawn noise for both samplers
            shape = (c.sample_steps, c.eval_samples, 1, 8, 8)
            self.step_noise = torch.randn(shape, generator=gen)
        gen = torch.Generator().manual_seed(_TEST_LOSS_SEED)
        n = x_test.shape[0]
        self.test_t = torch.randint(0, c.train_timesteps, (n,), generator=gen)
        self.test_eps = torch.randn(x_test.shape, generator=gen)

    def build_model(self) -> nn.Module:
        return build_model(self.config)

    def schedule(self) -> Schedule:
        c = self.config
        return Schedule(-(-c.steps // c.eval_every), c.eval_every, max(1, c.steps // 50),
                        total=c.steps)  # fmt: skip

    def _noised(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        a = self.alphas_cumprod[t].to(x0.dtype).view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def batches(self, epoch: int, info: DistInfo) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        c = self.config
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + epoch)
        n = self.x_train.shape[0]
        for _ in range(self.schedule().steps_in(epoch)):
            idx = torch.randint(0, n, (c.batch_size,), generator=gen)
            t = torch.randint(0, c.train_timesteps, (c.batch_size,), generator=gen)
            eps = torch.randn(c.batch_size, 1, 8, 8, generator=gen)
            yield self.x_train[idx], t, eps

    def train_step(self, net: nn.Module, model: nn.Module, batch: Any) -> StepOutput:
        x0, t, eps = batch
        return StepOutput(F.mse_loss(net(self._noised(x0, t, eps), t), eps))

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        c = self.config
        test_loss = F.mse_loss(
            model(self._noised(self.x_test, self.test_t, self.test_eps), self.test_t),
            self.test_eps,
        )
        sched = ddim_schedule(self.alphas_cumprod, c.sample_steps, eta=c.eta)
        metrics, samples = sample_quality(
            model, sched, self.eval_noise, self.features, self.reference,
            solver=c.solver, tol=c.tol, max_rounds=c.max_rounds or None, noise=self.step_noise,
        )  # fmt: skip
        if c.report and c.run_dir and Path(c.run_dir).is_dir():
            image_grid(samples[:128], Path(c.run_dir) / "samples.png")
        return {"test_loss": float(test_loss), **metrics, "fd_train_images": self.fd_real}

    def summary(self, last: dict[str, Any]) -> dict[str, Any]:
        return {"samples_png": "samples.png", "sample_steps": self.config.sample_steps}

    def describe(self, s: dict[str, Any]) -> list[str]:
        return [
            f"FD sequential {s['fd_sequential']:.2f}, parallel ({s['solver']}) "
            f"{s['fd_parallel']:.2f}; {s['rounds']} rounds vs {s['seq_rounds']} sequential "
            f"steps, NFE {s['nfe']}; largest relative difference {s['max_rel_diff']:.1e}"
        ]

    def describe_eval(self, r: dict[str, Any]) -> list[str]:
        return self.describe(r)


def train(
    config: DiffusionConfig, *, on_epoch_end: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Train the ε-model with :func:`equilibria.zoo.trainer.train` (see there)."""
    return trainer.train(DiffusionTask(config), on_epoch_end=on_epoch_end)


def load_eps_model(
    checkpoint: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[EpsMLP, Tensor]:
    """A trained ε-model as ``model(x, t) -> eps`` (eval mode, no gradients needed) and its
    training schedule ᾱ (float64), from ``checkpoint.safetensors`` or its run folder.

    Args:
        checkpoint: the run folder or its checkpoint file.
        dtype: parameter dtype of the returned model (inputs are cast to it, outputs back).
    """
    model, task = evaluation.load_model(DiffusionTask, checkpoint)
    config: DiffusionConfig = task.config  # type: ignore[assignment]
    model = model.to(dtype).eval().requires_grad_(False)
    return model, linear_alphas_cumprod(config.train_timesteps)  # type: ignore[return-value]


def trained_eps_model(
    run_dir: str | Path, *, dtype: torch.dtype = torch.float32, **config: Any
) -> tuple[EpsMLP, Tensor]:
    """:func:`load_eps_model` of ``run_dir``, training the recipe there first (the defaults,
    updated by ``config``; CPU minutes) if the folder holds no finished run.

    Raises:
        ConfigError: if the folder holds a finished run whose saved ``config.json`` differs from
            an option given in ``config`` (that model was not trained with it).
    """
    run = Path(run_dir)
    if config and (run / "summary.json").is_file() and (run / "config.json").is_file():
        wanted = to_dict(DiffusionConfig(**config))
        saved = read_json(run / "config.json").get("config", {})
        diff = [d for d in differences(saved, wanted, DiffusionConfig) if d[0] in config]
        if diff:
            lines = "; ".join(f"{k}: saved {a!r}, asked {b!r}" for k, a, b in diff)
            raise ConfigError(
                f"trained_eps_model: {run} holds a finished run trained with other options "
                f"({lines}); pass the saved options or another run_dir"
            )
    if not (run / "summary.json").is_file():
        resume = (run / "config.json").is_file()
        options = {"quiet": True, **config, "run_dir": str(run), "resume": resume}
        train(DiffusionConfig(**options))
    return load_eps_model(run, dtype=dtype)
