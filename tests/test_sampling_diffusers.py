"""diffusers interop: DDIM.from_diffusers against diffusers' own scheduler.step loop on a
random-init tiny UNet2DModel (float64), the settings it refuses by name, and diffusers' parallel
DDIM batch step, which is wrong at the last step for set_alpha_to_one=False."""

from __future__ import annotations

import re

import pytest
import torch

from equilibria import sampling

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.no_device_mode  # diffusers' models are built on the CPU here
SHAPE = (3, 1, 8, 8)


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    return net.double().eval().requires_grad_(False)


def _float64(scheduler):
    """The scheduler computing in float64 (diffusers keeps its schedule in float32)."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    final = torch.as_tensor(scheduler.final_alpha_cumprod if hasattr(scheduler,
                            "final_alpha_cumprod") else 1.0)  # fmt: skip
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = final.double()
    else:
        scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def _diffusers_loop(unet, scheduler, x, eta=0.0, noise=None):
    """diffusers' reference: for t in scheduler.timesteps: x = scheduler.step(unet(x, t), t, x)."""
    for k, t in enumerate(scheduler.timesteps):
        out = unet(x, t).sample
        kwargs = {} if noise is None else {"variance_noise": noise[k]}
        x = scheduler.step(out, t, x, eta=eta, **kwargs).prev_sample
    return x


def _our_loop(model, sched, x, noise=None):
    """An independent loop over sched.step (the schedule's reference update)."""
    for k, t in enumerate(sched.timesteps.tolist()):
        out = model(x, torch.full((x.shape[0],), t, dtype=torch.int64))
        x = sched.step(x, out, k, None if noise is None else noise[k])
    return x


CASES = {
    "alpha_to_one": {"set_alpha_to_one": True},
    "final_alpha_0": {"set_alpha_to_one": False},
    "v_prediction": {"set_alpha_to_one": False, "prediction_type": "v_prediction"},
    "sample_pred": {"prediction_type": "sample", "clip_sample": False},
    "clip_0.8": {"clip_sample": True, "clip_sample_range": 0.8},
    "thresholding": {"thresholding": True, "sample_max_value": 1.5, "clip_sample": False},
    "no_clip_offset1": {"clip_sample": False, "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing", "clip_sample": False},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                      "beta_end": 0.012, "set_alpha_to_one": False},
}  # fmt: skip


@pytest.mark.parametrize("eta", [0.0, 0.6])
@pytest.mark.parametrize("case", list(CASES))
def test_from_diffusers_matches_diffusers_step_loop(unet, case: str, eta: float) -> None:
    scheduler = diffusers.DDIMScheduler(**CASES[case])
    scheduler.set_timesteps(10)
    sched = sampling.DDIM.from_diffusers(scheduler, eta=eta)  # η: a step() argument in diffusers
    assert sched.eta == eta and len(sched) == 10
    assert torch.equal(sched.timesteps, scheduler.timesteps)
    assert sched.prediction_type == scheduler.config.prediction_type
    gen = torch.Generator().manual_seed(1)
    x_T = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    noise = torch.randn((10, *SHAPE), generator=gen, dtype=torch.float64) if eta else None
    ours = _our_loop(sampling.UNetModel(unet), sched, x_T, noise)
    theirs = _diffusers_loop(unet, _float64(scheduler), x_T, eta, noise)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_float32_schedule_agrees_to_float32_roundoff(unet) -> None:
    """diffusers as shipped (float32 schedule) against ours (the same ᾱ kept in float64)."""
    scheduler = diffusers.DDIMScheduler(set_alpha_to_one=False)
    scheduler.set_timesteps(20)
    sched = sampling.DDIM.from_diffusers(scheduler)
    assert sched.final_alpha_cumprod == float(scheduler.alphas_cumprod[0])
    x_T = torch.randn(SHAPE, dtype=torch.float64)
    ours = _our_loop(sampling.UNetModel(unet), sched, x_T)
    theirs = _diffusers_loop(unet, scheduler, x_T)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [None, 8])
def test_ddpm_is_ddim_with_eta_one(unet, prediction_type: str, steps: int | None) -> None:
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=40, clip_sample=False,
                                        prediction_type=prediction_type)  # fmt: skip
    if steps:
        scheduler.set_timesteps(steps)
    sched = sampling.DDIM.from_diffusers(scheduler)
    T = len(scheduler.timesteps)
    assert sched.eta == 1.0 and sched.final_alpha_cumprod == 1.0 and len(sched) == T
    x_T = torch.randn(SHAPE, dtype=torch.float64)
    # diffusers draws the noise of each step with t > 0 from the generator, in order
    gen = torch.Generator().manual_seed(3)
    noise = torch.zeros((T, *SHAPE), dtype=torch.float64)
    for k, t in enumerate(scheduler.timesteps.tolist()):
        if t > 0:
            noise[k] = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    ours = _our_loop(sampling.UNetModel(unet), sched, x_T, noise)
    scheduler = _float64(scheduler)
    gen = torch.Generator().manual_seed(3)
    theirs = x_T
    for t in scheduler.timesteps:
        theirs = scheduler.step(unet(theirs, t).sample, t, theirs, generator=gen).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


REFUSED = [
    (lambda: diffusers.EulerDiscreteScheduler(), None, TypeError, "EulerDiscreteScheduler"),
    (lambda: diffusers.DDIMScheduler(timestep_spacing="linspace"), 10, ValueError,
     "timestep_spacing='linspace'"),
    (lambda: diffusers.DDIMScheduler(timestep_spacing="trailing"), 7, ValueError,
     "timestep_spacing='trailing'"),
    (lambda: diffusers.DDIMScheduler(steps_offset=100), 10, ValueError, "steps_offset=100"),
    (lambda: diffusers.DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
     10, ValueError, "rescale_betas_zero_snr"),
    (lambda: diffusers.DDIMScheduler(), None, ValueError, "set_timesteps"),
    (lambda: diffusers.DDPMScheduler(), 10, ValueError, "clip_sample=True"),
    (lambda: diffusers.DDPMScheduler(clip_sample=False, thresholding=True), 10, ValueError,
     "thresholding=True"),
    (lambda: diffusers.DDPMScheduler(clip_sample=False, variance_type="fixed_large"), 10,
     ValueError, "variance_type"),
]  # fmt: skip


@pytest.mark.parametrize("make, steps, error, fragment", REFUSED)
def test_unsupported_settings_are_refused_by_name(make, steps, error, fragment) -> None:
    scheduler = make()
    if steps:
        scheduler.set_timesteps(steps)
    with pytest.raises(error, match=re.escape(fragment)):
        sampling.DDIM.from_diffusers(scheduler)


def test_eta_must_be_one_for_ddpm() -> None:
    scheduler = diffusers.DDPMScheduler(clip_sample=False)
    with pytest.raises(ValueError, match=re.escape("eta must be None or 1.0")):
        sampling._diffusers.ddim_from_diffusers(scheduler, eta=0.5)


@pytest.mark.parametrize("eta, error", [(True, TypeError), ("0.5", TypeError), (1.5, ValueError)])
def test_eta_is_checked_not_converted(eta, error) -> None:
    scheduler = diffusers.DDIMScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(error, match=r"eta must be (a real number )?in"):
        sampling.DDIM.from_diffusers(scheduler, eta=eta)


def test_unet_adapter_checks_its_input() -> None:
    with pytest.raises(TypeError, match=re.escape("unet must be a torch.nn.Module")):
        sampling.UNetModel("unet")  # type: ignore[arg-type]

    class Plain(torch.nn.Module):  # returns a tensor, not an output object with .sample
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return x

    bad = sampling.UNetModel(Plain())
    with pytest.raises(TypeError, match=re.escape("without a tensor .sample")):
        bad(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64))


def test_diffusers_parallel_batch_step_is_wrong_at_the_last_step(unet) -> None:
    """DDIMParallelScheduler.batch_step_no_noise (diffusers' parallel DDIM, ParaDiGMS' pipeline)
    sets ᾱ_prev = 1 at the last step instead of final_alpha_cumprod: with set_alpha_to_one=False
    it disagrees with its own step() there (and with ours), and agrees at every other step."""
    scheduler = _float64(diffusers.DDIMParallelScheduler(set_alpha_to_one=False))
    scheduler.set_timesteps(10)
    sched = sampling.DDIM.from_diffusers(scheduler)
    x = torch.randn((10, *SHAPE[1:]), dtype=torch.float64)  # one state per step
    t = scheduler.timesteps
    out = unet(x, t).sample
    batch = scheduler.batch_step_no_noise(out, t, x)
    single = torch.stack([scheduler.step(out[k : k + 1], t[k], x[k : k + 1]).prev_sample[0]
                          for k in range(10)])  # fmt: skip
    ours = sched.step(x, out, torch.arange(10))
    torch.testing.assert_close(ours, single, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batch[:-1], single[:-1], rtol=1e-12, atol=1e-12)
    gap = (batch[-1] - single[-1]).abs().max()
    assert gap > 1e-3, f"the last batched step agrees with step() ({gap:.1e}): bug fixed?"


@pytest.mark.parametrize("solver", ["sequential", "picard", "default"])
def test_parallel_sample_of_a_unet_matches_diffusers(unet, solver: str) -> None:
    """sample() on the joint fixed point (stochastic, set_alpha_to_one=False) reproduces
    diffusers' loop with the same noise."""
    scheduler = diffusers.DDIMScheduler(set_alpha_to_one=False, clip_sample=False)
    scheduler.set_timesteps(8)
    sched = sampling._diffusers.ddim_from_diffusers(scheduler, eta=0.5)
    gen = torch.Generator().manual_seed(2)
    x_T = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    noise = torch.randn((8, *SHAPE), generator=gen, dtype=torch.float64)
    x0, sol = sampling.sample(sampling.UNetModel(unet), x_T, sched, solver=solver, tol=1e-12,
                              noise=noise)  # fmt: skip
    theirs = _diffusers_loop(unet, _float64(scheduler), x_T, 0.5, noise)
    torch.testing.assert_close(x0, theirs, rtol=1e-9, atol=1e-9)
    assert bool(sol.converged.all())
