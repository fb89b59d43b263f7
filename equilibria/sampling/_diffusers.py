"""diffusers interop: a :class:`~equilibria.sampling.DDIM` from a diffusers scheduler, and a model
adapter for diffusers' ``UNet2DModel``.

Imported only when used (``DDIM.from_diffusers`` imports it), so ``import equilibria`` does not
need diffusers.

What is read from the scheduler (after ``scheduler.set_timesteps(T)``):

* ``DDIMScheduler`` / ``DDIMParallelScheduler``: ``alphas_cumprod`` (so ``beta_schedule``,
  ``trained_betas`` are honoured through it; ``rescale_betas_zero_snr`` is refused: it sets
  ᾱ = 0 at the last training step, outside a DDIM schedule's (0, 1)), ``timesteps`` (so
  ``timestep_spacing`` and ``steps_offset`` are), ``final_alpha_cumprod`` (``set_alpha_to_one``),
  ``prediction_type``, ``clip_sample`` + ``clip_sample_range``, ``thresholding`` +
  ``dynamic_thresholding_ratio`` + ``sample_max_value``. diffusers' ``DDIMScheduler.step`` steps
  from timestep ``t`` to ``t - num_train_timesteps // T``, not to the next entry of its own
  ``timesteps``: the two agree for ``"leading"`` spacing (with ``steps_offset`` below the step
  ratio) and for ``"trailing"`` spacing when T divides ``num_train_timesteps``; for any other
  setting (``"linspace"`` spacing, mostly) the loop mixes two schedules, and we refuse it by name
  rather than sample a different chain. η is a ``step`` argument in diffusers, hence the ``eta=``
  argument here.
* ``DDPMScheduler`` / ``DDPMParallelScheduler``: ancestral DDPM sampling is DDIM with η = 1 and
  ᾱ_final = 1 (same mean and variance as the posterior q(x_{t'} | x_t, x̂_0) whenever x̂_0 and ε̂
  are computed from one model output; Song et al. 2021, eq. 16), so it maps to
  ``DDIM(eta=1.0)``. Its ``variance_type`` must be ``"fixed_small"`` or ``"fixed_small_log"``
  (the same standard deviation), and ``clip_sample`` / ``thresholding`` must be off (DDPM then
  mixes the clipped x̂_0 with x_t, which no DDIM step does).
* Any other scheduler is refused by its class name.

``use_clipped_model_output`` (an argument of diffusers' ``step``, default False) is not
supported: the DDIM step keeps the model's ε̂ after clipping x̂_0, as diffusers does by default.

Reference: Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021; Saharia et al.,
"Photorealistic Text-to-Image Diffusion Models with Deep Language Understanding" (dynamic
thresholding), NeurIPS 2022; Lin et al., "Common Diffusion Noise Schedules and Sample Steps are
Flawed" (zero terminal SNR, trailing spacing), WACV 2024.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["UNetModel", "ddim_from_diffusers"]

_DDIM = ("DDIMScheduler", "DDIMParallelScheduler")
_DDPM = ("DDPMScheduler", "DDPMParallelScheduler")
_PREDICTION = {"epsilon": "epsilon", "sample": "sample", "v_prediction": "v_prediction"}
_DDPM_VARIANCES = ("fixed_small", "fixed_small_log")


def _prediction_type(config: Any, name: str) -> str:
    value = config.prediction_type
    if value not in _PREDICTION:
        raise ValueError(
            f"{name}.config.prediction_type must be one of {sorted(_PREDICTION)}, got {value!r}"
        )
    return _PREDICTION[value]


def _check_ddim_chain(timesteps: list[int], train_steps: int, name: str, config: Any) -> None:
    """Refuse settings where diffusers' ``step`` does not step to the next listed timestep."""
    ratio = train_steps // len(timesteps)
    for k, t in enumerate(timesteps):
        prev = t - ratio  # what DDIMScheduler.step uses for alpha_prod_t_prev
        last = k == len(timesteps) - 1
        if (last and prev >= 0) or (not last and prev != timesteps[k + 1]):
            target = "final_alpha_cumprod" if last else f"timestep {timesteps[k + 1]}"
            raise ValueError(
                f"{name} with timestep_spacing={config.timestep_spacing!r}, "
                f"steps_offset={config.steps_offset}, num_train_timesteps={train_steps} and "
                f"{len(timesteps)} steps is not supported: its step() goes from timestep {t} to "
                f"alpha_cumprod[{prev}] (t - num_train_timesteps // T) while its timesteps go on "
                f"to {target}, two different chains; use timestep_spacing='leading' (with "
                f"steps_offset < {ratio}) or 'trailing' with T dividing num_train_timesteps"
            )


def ddim_from_diffusers(scheduler: Any, *, eta: float | None = None) -> Any:
    """The :class:`~equilibria.sampling.DDIM` that samples what a diffusers scheduler's loop does.

    Args:
        scheduler: a diffusers ``DDIMScheduler``, ``DDIMParallelScheduler``, ``DDPMScheduler`` or
            ``DDPMParallelScheduler`` after ``set_timesteps(T)`` (a DDPM scheduler without it
            samples all ``num_train_timesteps`` steps, as diffusers does).
        eta: η of ``DDIMScheduler.step`` (default 0.0); DDPM is η = 1 (only 1.0 or None allowed).

    Returns:
        ``sampling.DDIM`` with the scheduler's training schedule (float64), timesteps, final ᾱ,
        prediction type, clipping and thresholding.

    Raises:
        TypeError: not a supported scheduler (named in the message).
        ValueError: a setting of the scheduler that no DDIM step reproduces (named).

    Example:
        >>> scheduler = DDIMScheduler(set_alpha_to_one=False); scheduler.set_timesteps(50)
        >>> sched = sampling.DDIM.from_diffusers(scheduler)
        >>> x0, sol = sampling.sample(sampling.UNetModel(unet), x_T, sched)
    """
    from . import DDIM, Thresholding

    name = type(scheduler).__name__
    if name not in _DDIM + _DDPM:
        raise TypeError(
            f"scheduler must be one of diffusers' {', '.join(_DDIM + _DDPM)}, got {name} "
            "(its sampler is not a DDIM/DDPM chain; refusing rather than sampling another chain)"
        )
    config = scheduler.config
    train_steps = int(config.num_train_timesteps)
    timesteps = [int(t) for t in scheduler.timesteps.tolist()]
    prediction_type = _prediction_type(config, name)
    alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
    if getattr(config, "rescale_betas_zero_snr", False) and not (alphas_cumprod > 0).all():
        raise ValueError(
            f"{name}.config.rescale_betas_zero_snr=True is not supported: it makes "
            "alphas_cumprod[-1] = 0 exactly (zero terminal SNR), where a DDIM step divides by "
            "sqrt(alphas_cumprod) (x0 from epsilon) or by sqrt(1 - alphas_cumprod) at t = 0"
        )
    if name in _DDPM:
        if eta not in (None, 1.0):
            raise ValueError(f"eta must be None or 1.0 for {name} (DDPM is DDIM with eta=1), "
                             f"got {eta}")  # fmt: skip
        if config.variance_type not in _DDPM_VARIANCES:
            raise ValueError(
                f"{name}.config.variance_type must be one of {list(_DDPM_VARIANCES)} (the "
                f"posterior variance of DDIM with eta=1), got {config.variance_type!r}"
            )
        for option in ("clip_sample", "thresholding"):
            if getattr(config, option):
                raise ValueError(
                    f"{name}.config.{option}=True is not supported: DDPM then mixes the clipped "
                    "x0 estimate with x_t, which differs from a DDIM step; set it to False"
                )
        return DDIM(alphas_cumprod, torch.tensor(timesteps, dtype=torch.int64), eta=1.0,
                    final_alpha_cumprod=1.0, prediction_type=prediction_type)  # fmt: skip
    if scheduler.num_inference_steps is None:
        raise ValueError(f"{name}: call scheduler.set_timesteps(T) first (its step() needs it)")
    _check_ddim_chain(timesteps, train_steps, name, config)
    thresholding = None
    clip_sample = None
    if config.thresholding:
        thresholding = Thresholding(ratio=float(config.dynamic_thresholding_ratio),
                                    max_value=float(config.sample_max_value))  # fmt: skip
    elif config.clip_sample:
        clip_sample = float(config.clip_sample_range)
    final = float(torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64))
    return DDIM(
        alphas_cumprod,
        torch.tensor(timesteps, dtype=torch.int64),
        eta=0.0 if eta is None else eta,  # DDIM checks it (a real number in [0, 1])
        final_alpha_cumprod=final,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        thresholding=thresholding,
    )


class UNetModel(nn.Module):
    """``model(x, t) -> output`` from a diffusers ``UNet2DModel`` (or any module returning an
    object with ``.sample``), for :func:`~equilibria.sampling.sample` and
    :func:`~equilibria.sampling.invert`.

    Args:
        unet: the diffusers model; called as ``unet(x, t, **kwargs).sample``.
        kwargs: extra keyword arguments, the same for every call (the sampler stacks several
            timesteps of several samples into one call, so per-sample tensors do not fit).

    Example:
        >>> model = sampling.UNetModel(UNet2DModel(sample_size=8, ...))
        >>> x0, sol = sampling.sample(model, torch.randn(4, 3, 8, 8), sched)
    """

    def __init__(self, unet: nn.Module, **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(unet, nn.Module):
            raise TypeError(f"unet must be a torch.nn.Module, got {type(unet).__name__}")
        self.unet = unet
        self.kwargs = kwargs

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        kwargs = self.kwargs
        out = self.unet(x, t, **kwargs)
        sample = getattr(out, "sample", None)
        if not isinstance(sample, Tensor):
            raise TypeError(
                f"UNetModel: {type(self.unet).__name__} returned {type(out).__name__} without a "
                "tensor .sample"
            )
        return sample
