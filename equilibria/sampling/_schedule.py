"""Sampling schedules: one reference update per step, exact diffusers semantics.

A schedule is the per-step map ``x_{k+1} = step_k(x_k, model(x_k, t_k), noise_k)`` of a sampler;
:mod:`equilibria.sampling._system` stacks its T steps into one lower-triangular fixed point. The
math follows diffusers' ``DDIMScheduler.step`` (Song, Meng & Ermon 2021, "Denoising Diffusion
Implicit Models", eq. 12; dynamic thresholding from Saharia et al. 2022, "Imagen"), with the
previous ``ᾱ`` taken from the next sampling timestep, or ``final_alpha_cumprod`` at the last step.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from .._validate import check_float

if TYPE_CHECKING:
    pass

PredictionType = Literal["epsilon", "v_prediction", "sample"]
_PREDICTIONS = ("epsilon", "v_prediction", "sample")
_QUANTILE_MAX = 1 << 24  # torch.quantile's input limit


@dataclass(frozen=True)
class Thresholding:
    """Dynamic thresholding of the predicted ``x_0`` (Saharia et al. 2022, "Imagen", §2.3).

    Per sample, ``s`` is the ``ratio`` quantile of ``|x_0|`` clamped to ``[1, max_value]``; ``x_0``
    is clamped to ``[-s, s]`` and divided by ``s`` (diffusers' ``_threshold_sample``).

    Args:
        ratio: the quantile, in (0, 1] (diffusers' ``dynamic_thresholding_ratio``).
        max_value: the upper bound of ``s``, > 0 (diffusers' ``sample_max_value``).
    """

    ratio: float = 0.995
    max_value: float = 1.0

    def __post_init__(self) -> None:
        check_float("Thresholding ratio", self.ratio, low=0.0, high=1.0)
        check_float("Thresholding max_value", self.max_value, low=0.0)

    def __call__(self, x0: Tensor) -> Tensor:
        """Threshold ``x0`` (M, *shape) row by row."""
        dtype = x0.dtype
        flat = x0.reshape(x0.shape[0], -1)
        if flat.dtype not in (torch.float32, torch.float64):  # quantile needs float/double
            flat = flat.float()
        # torch.quantile takes at most 2**24 elements: a round's rows go through in pieces
        per = max(1, _QUANTILE_MAX // max(1, flat.shape[1]))
        s = torch.cat([torch.quantile(p.abs(), self.ratio, dim=1) for p in flat.split(per)])
        s = torch.clamp(s, min=1, max=self.max_value).unsqueeze(1)
        flat = torch.clamp(flat, -s, s) / s
        return flat.reshape(x0.shape).to(dtype)


class Schedule(abc.ABC):
    """What the joint system needs from a sampler: T steps, each a function of one state.

    Attributes read by the system and the solvers: ``timesteps`` (T,) int64, the model's
    timestep at each step; ``len(schedule)`` = T; :attr:`stochastic` (whether steps take noise);
    :meth:`step`; :meth:`step_variance` (the per-step noise variance ParaDiGMS' tolerance is
    scaled by).
    """

    timesteps: Tensor

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    @abc.abstractmethod
    def stochastic(self) -> bool:
        """Whether :meth:`step` adds noise (then every step takes a pre-drawn noise tensor)."""

    @abc.abstractmethod
    def step(
        self, x: Tensor, model_output: Tensor, k: int | Tensor, noise: Tensor | None = None
    ) -> Tensor:
        """One update from step index ``k`` to ``k + 1``; ``k`` an int or an (M,) int64 tensor
        giving each row of ``x`` (M, *shape) its own step."""

    @abc.abstractmethod
    def step_variance(self) -> Tensor:
        """(T,) float64: the DDPM posterior variance of each step (positive)."""


def _check_schedule_tensor(alphas_cumprod: Any) -> Tensor:
    if not isinstance(alphas_cumprod, Tensor):
        try:
            alphas_cumprod = torch.as_tensor(alphas_cumprod)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                "alphas_cumprod must be a 1-D tensor of the training schedule, got "
                f"{type(alphas_cumprod).__name__}"
            ) from None
    if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 1:
        raise ValueError(
            "alphas_cumprod must be a non-empty 1-D tensor (one value per training timestep), "
            f"got shape {tuple(alphas_cumprod.shape)}"
        )
    if not (alphas_cumprod.is_floating_point() or alphas_cumprod.dtype == torch.int64):
        raise TypeError(f"alphas_cumprod must be floating point, got {alphas_cumprod.dtype}")
    a = alphas_cumprod.detach().to("cpu", torch.float64)
    bad = ~(torch.isfinite(a) & (a > 0) & (a < 1))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"alphas_cumprod must lie in (0, 1) at every training timestep, got {a[i].item()} "
            f"at timestep {i}"
        )
    if (a[1:] > a[:-1]).any():
        i = int((a[1:] > a[:-1]).nonzero()[0, 0]) + 1
        raise ValueError(
            "alphas_cumprod must be non-increasing (more noise at later timesteps), got "
            f"{a[i].item()} at timestep {i} after {a[i - 1].item()}"
        )
    return a


def _check_timesteps(timesteps: Any, n_train: int) -> Tensor:
    if not isinstance(timesteps, Tensor):
        try:
            timesteps = torch.as_tensor(timesteps)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"timesteps must be a 1-D int64 tensor, got {type(timesteps).__name__}"
            ) from None
    if timesteps.ndim != 1 or timesteps.numel() < 1:
        raise ValueError(
            f"timesteps must be a non-empty 1-D tensor, got shape {tuple(timesteps.shape)}"
        )
    if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps must be integers (int64), got {timesteps.dtype}")
    t = timesteps.detach().to("cpu", torch.int64)
    if (t < 0).any() or (t >= n_train).any():
        raise ValueError(
            f"timesteps must lie in [0, {n_train - 1}] (len(alphas_cumprod) = {n_train}), got "
            f"min {int(t.min())}, max {int(t.max())}"
        )
    if (t[1:] >= t[:-1]).any():
        i = int((t[1:] >= t[:-1]).nonzero()[0, 0]) + 1
        raise ValueError(
            f"timesteps must be strictly decreasing, got {int(t[i])} at index {i} after "
            f"{int(t[i - 1])}"
        )
    return t


def _rows(c: Tensor, k: int | Tensor, like: Tensor) -> Tensor:
    """Per-row coefficient ``c[k]`` shaped to broadcast against ``like`` (M, *shape)."""
    if isinstance(k, Tensor):
        v = c.to(like.device)[k.to(like.device)]
        return v.to(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))
    return c[k].to(like.device, like.dtype)


@dataclass(frozen=True, eq=False)
class DDIM(Schedule):
    """DDIM sampling (Song et al. 2021) over the given timesteps, diffusers' update exactly.

    Use it to describe a sampler for :func:`equilibria.sampling.sample`; ``DDIM.from_diffusers``
    reads a configured ``diffusers.DDIMScheduler``.

    Args:
        alphas_cumprod: (n_train,) the training schedule ``ᾱ_t``, each in (0, 1), non-increasing
            (kept in float64 on the CPU).
        timesteps: (T,) int64 sampling timesteps, strictly decreasing, in ``[0, n_train)``.
        eta: the noise scale in [0, 1] (0: deterministic DDIM; 1: DDPM's posterior variance).
        final_alpha_cumprod: ``ᾱ`` after the last step, in ``[alphas_cumprod[timesteps[-1]], 1]``
            (diffusers: 1 when ``set_alpha_to_one`` else ``alphas_cumprod[0]``).
        prediction_type: what the model predicts: ``"epsilon"``, ``"v_prediction"`` or
            ``"sample"``.
        clip_sample: None, or the range ``r > 0``: the predicted ``x_0`` is clamped to [-r, r].
        thresholding: None, or a :class:`Thresholding` (not together with ``clip_sample``).

    Example:
        >>> betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        >>> sched = DDIM(torch.cumprod(1 - betas, 0), torch.arange(999, -1, -40))
        >>> x_next = sched.step(x, eps, 0)  # from timesteps[0] to timesteps[1]
    """

    alphas_cumprod: Tensor
    timesteps: Tensor
    eta: float = 0.0
    final_alpha_cumprod: float = 1.0
    prediction_type: PredictionType = "epsilon"
    clip_sample: float | None = None
    thresholding: Thresholding | None = None

    def __post_init__(self) -> None:
        a = _check_schedule_tensor(self.alphas_cumprod)
        t = _check_timesteps(self.timesteps, a.shape[0])
        set_ = object.__setattr__
        set_(self, "alphas_cumprod", a)
        set_(self, "timesteps", t)
        set_(self, "eta", check_float("eta", self.eta, low=0.0, high=1.0, low_open=False))
        set_(
            self,
            "final_alpha_cumprod",
            check_float("final_alpha_cumprod", self.final_alpha_cumprod, low=0.0, high=1.0),
        )
        if self.prediction_type not in _PREDICTIONS:
            allowed = ", ".join(repr(p) for p in _PREDICTIONS)
            raise ValueError(
                f"prediction_type must be one of {allowed}, got {self.prediction_type!r}"
            )
        if self.clip_sample is not None:
            set_(self, "clip_sample", check_float("clip_sample", self.clip_sample, low=0.0))
        if self.thresholding is not None and not isinstance(self.thresholding, Thresholding):
            raise TypeError(
                "thresholding must be None or a sampling.Thresholding(ratio=..., max_value=...), "
                f"got {type(self.thresholding).__name__}"
            )
        if self.clip_sample is not None and self.thresholding is not None:
            raise ValueError(
                "clip_sample and thresholding exclude each other (diffusers applies only "
                f"thresholding when both are set), got clip_sample={self.clip_sample} and "
                f"thresholding={self.thresholding}"
            )
        if self.final_alpha_cumprod < float(a[t[-1]]):
            raise ValueError(
                f"final_alpha_cumprod must be in [alphas_cumprod[{int(t[-1])}], 1] = "
                f"[{float(a[t[-1]])}, 1] (the last step may not add noise: its variance would be "
                f"negative), got {self.final_alpha_cumprod}"
            )
        at = a[t]  # (T,) ᾱ at each step's timestep
        ap = torch.cat([a[t[1:]], torch.tensor([self.final_alpha_cumprod], dtype=torch.float64)])
        # DDPM posterior variance of the step (DDIM's σ² at η = 1), eq. 16 of Song et al.
        var = (1 - ap) / (1 - at) * (1 - at / ap)
        std = self.eta * var.sqrt()
        set_(self, "_at", at)
        set_(self, "_ap", ap)
        set_(self, "_var", var)
        set_(self, "_sqrt_at", at.sqrt())
        set_(self, "_sqrt_bt", (1 - at).sqrt())
        set_(self, "_sqrt_ap", ap.sqrt())
        set_(self, "_std", std)
        set_(self, "_dir", (1 - ap - std**2).clamp(min=0).sqrt())

    def __repr__(self) -> str:
        t = self.timesteps
        steps = f"[{int(t[0])}, ..., {int(t[-1])}]" if len(t) > 2 else str(t.tolist())
        extra = "".join(
            f", {k}={v!r}"
            for k, v in (("clip_sample", self.clip_sample), ("thresholding", self.thresholding))
            if v is not None
        )
        return (
            f"DDIM(T={len(t)}, timesteps={steps}, n_train={self.alphas_cumprod.shape[0]}, "
            f"eta={self.eta:g}, final_alpha_cumprod={self.final_alpha_cumprod:g}, "
            f"prediction_type={self.prediction_type!r}{extra})"
        )

    @classmethod
    def from_diffusers(cls, scheduler: Any, *, eta: float | None = None) -> DDIM:
        """The DDIM of a configured ``diffusers.DDIMScheduler`` (after ``set_timesteps``).

        ``eta`` is the η of diffusers' ``DDIMScheduler.step`` (a ``step`` argument there, not a
        config entry; default 0.0; DDPM schedulers are η = 1). Options the library cannot
        reproduce exactly are refused by name (see ``equilibria/sampling/_diffusers.py``).
        Needs ``diffusers`` (the ``diffusion`` extra).
        """
        from ._diffusers import ddim_from_diffusers

        return ddim_from_diffusers(scheduler, eta=eta)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def step_variance(self) -> Tensor:
        return self._var  # type: ignore[attr-defined]

    def step(
        self, x: Tensor, model_output: Tensor, k: int | Tensor, noise: Tensor | None = None
    ) -> Tensor:
        """One DDIM update of ``x`` (M, *shape) from step index ``k`` (timestep
        ``timesteps[k]``) to ``k + 1``, diffusers' ``DDIMScheduler.step`` exactly.

        Args:
            x: (M, *shape) the states at step ``k``.
            model_output: (M, *shape) the model's prediction at ``(x, timesteps[k])``.
            k: the step index, an int in [0, T) or an (M,) integer tensor (one per row).
            noise: (M, *shape) standard normal noise, required when ``eta > 0``.
        """
        T = len(self)
        if isinstance(k, Tensor):
            if k.ndim != 1 or k.shape[0] != x.shape[0]:
                raise ValueError(
                    f"k must be an int or one step index per row of x ({x.shape[0]}), got "
                    f"shape {tuple(k.shape)}"
                )
            if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
                raise TypeError(f"k must hold integer step indices (int64), got {k.dtype}")
            # a negative index would wrap around to the last steps' coefficients
            if k.numel() and bool(((k < 0) | (k >= T)).any()):
                raise ValueError(
                    f"k must hold step indices in [0, {T}), got min {int(k.min())}, max "
                    f"{int(k.max())}"
                )
            # as indices: a uint8 tensor would index as a mask (all rows' coefficients)
            k = k.long()
        elif isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < T:
            raise ValueError(f"k must be a step index in [0, {T}), got {k!r}")
        if model_output.shape != x.shape:
            raise ValueError(
                f"model_output must have the shape of x {tuple(x.shape)}, got "
                f"{tuple(model_output.shape)}"
            )
        sa = _rows(self._sqrt_at, k, x)  # type: ignore[attr-defined]  # √ᾱ_t
        sb = _rows(self._sqrt_bt, k, x)  # type: ignore[attr-defined]  # √(1-ᾱ_t)
        if self.prediction_type == "epsilon":
            x0 = (x - sb * model_output) / sa
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (x - sa * x0) / sb
        else:  # v_prediction (Salimans & Ho 2022)
            x0 = sa * x - sb * model_output
            eps = sa * model_output + sb * x
        if self.thresholding is not None:
            x0 = self.thresholding(x0)
        elif self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        out = _rows(self._sqrt_ap, k, x) * x0 + _rows(self._dir, k, x) * eps  # type: ignore[attr-defined]
        if self.eta > 0:
            if noise is None:
                raise ValueError("noise is required when eta > 0 (standard normal, shaped like x)")
            if noise.shape != x.shape:
                raise ValueError(
                    f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}"
                )
            out = out + _rows(self._std, k, x) * noise  # type: ignore[attr-defined]
        return out
