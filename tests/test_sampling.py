"""equilibria.sampling: the DDIM step against an independent loop, every solver against the
sequential trajectory, windows, chunks, warm starts, budgets and bad inputs (float64)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from equilibria import NonFiniteError, sampling

SOLVER_NAMES = [*sampling.SOLVERS.names(), "default"]
PARALLEL = [n for n in SOLVER_NAMES if n != "sequential"]
N_TRAIN = 1000


def _schedule(kind: str) -> torch.Tensor:
    """alphas_cumprod of diffusers' beta schedules (linear, scaled_linear, squaredcos_cap_v2)."""
    if kind == "linear":
        betas = torch.linspace(1e-4, 0.02, N_TRAIN, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, N_TRAIN, dtype=torch.float64) ** 2
    else:
        f = [math.cos((i / N_TRAIN + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(N_TRAIN + 1)]
        betas = torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(N_TRAIN)])
    return torch.cumprod(1 - betas.double(), 0)


def _timesteps(T: int, offset: int = 0) -> torch.Tensor:
    """diffusers' "leading" spacing: (0, s, 2s, ...) reversed, plus steps_offset."""
    return torch.arange(0, T).mul(N_TRAIN // T).flip(0) + offset


class _Model:
    """The exact ε of a Gaussian mixture under the linear schedule (float64), counting its rows:
    smooth, nonlinear, and contracting like a trained model's (Pokle et al. 2022 use such toys)."""

    def __init__(self, dim: int = 6, seed: int = 0, scale: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(3, dim, generator=g, dtype=torch.float64) * scale  # (K, D)
        self.var = 0.1
        self.ac = _schedule("linear")
        self.rows = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.int64 and t.shape == x.shape[:1]
        self.rows += x.shape[0]
        a = self.ac[t].reshape(-1, 1, 1)  # (M, 1, 1)
        v = a * self.var + 1 - a  # each component's variance at t
        diff = x.flatten(1)[:, None, :] - a.sqrt() * self.mu[None]  # (M, K, D)
        w = torch.softmax(-(diff**2).sum(-1, keepdim=True) / (2 * v), 1)  # (M, K, 1)
        score = -(w * diff).sum(1) / v[:, 0]  # (M, D)
        return (-(1 - a[:, 0]).sqrt() * score).reshape(x.shape)


def _reference(model, x, ac, ts, *, eta=0.0, final=1.0, pred="epsilon", clip=None, thr=None,
               noise=None):  # fmt: skip
    """DDIM written out step by step with Python scalars (Song et al. 2021, eq. 12; diffusers'
    DDIMScheduler.step), thresholding with numpy's quantile."""
    x = x.clone()
    for i in range(len(ts)):
        t = int(ts[i])
        at = float(ac[t])
        ap = float(ac[int(ts[i + 1])]) if i + 1 < len(ts) else final
        out = model(x, torch.full((x.shape[0],), t, dtype=torch.int64))
        if pred == "epsilon":
            x0, e = (x - math.sqrt(1 - at) * out) / math.sqrt(at), out
        elif pred == "sample":
            x0 = out
            e = (x - math.sqrt(at) * x0) / math.sqrt(1 - at)
        else:
            x0 = math.sqrt(at) * x - math.sqrt(1 - at) * out
            e = math.sqrt(at) * out + math.sqrt(1 - at) * x
        if thr is not None:
            ratio, max_value = thr
            rows = []
            for row in x0.reshape(x0.shape[0], -1).numpy():
                s = min(max(float(np.quantile(np.abs(row), ratio)), 1.0), max_value)
                rows.append(np.clip(row, -s, s) / s)
            x0 = torch.from_numpy(np.stack(rows)).reshape(x0.shape)
        elif clip is not None:
            x0 = x0.clamp(-clip, clip)
        var = (1 - ap) / (1 - at) * (1 - at / ap)
        std = eta * math.sqrt(var)
        x = math.sqrt(ap) * x0 + math.sqrt(max(1 - ap - std**2, 0.0)) * e
        if eta > 0:
            x = x + std * noise[i]
    return x


CASES = [  # (schedule, T, offset, eta, final, prediction, clip, thresholding)
    ("linear", 25, 0, 0.0, 1.0, "epsilon", None, None),
    ("linear", 50, 1, 0.0, "first", "epsilon", None, None),
    ("scaled_linear", 20, 1, 0.7, 1.0, "epsilon", None, None),
    ("cosine", 40, 0, 1.0, "first", "epsilon", None, None),
    ("linear", 20, 0, 0.0, 1.0, "v_prediction", None, None),
    ("scaled_linear", 20, 0, 0.3, 1.0, "v_prediction", None, None),
    ("linear", 20, 0, 0.0, 1.0, "sample", 1.0, None),
    ("cosine", 20, 0, 0.0, 1.0, "epsilon", 0.5, None),
    ("linear", 20, 0, 0.0, 1.0, "epsilon", None, (0.9, 1.5)),
    ("scaled_linear", 20, 1, 0.5, "first", "sample", None, (0.995, 2.0)),
]


def _build(case, N=3, dim=6, seed=0):
    kind, T, offset, eta, final, pred, clip, thr = case
    ac = _schedule(kind)
    final = float(ac[0]) if final == "first" else final
    sched = sampling.DDIM(
        ac,
        _timesteps(T, offset),
        eta=eta,
        final_alpha_cumprod=final,
        prediction_type=pred,
        clip_sample=clip,
        thresholding=None if thr is None else sampling.Thresholding(*thr),
    )
    g = torch.Generator().manual_seed(seed + 1)
    x_T = torch.randn(N, dim, generator=g, dtype=torch.float64)
    noise = torch.randn(T, N, dim, generator=g, dtype=torch.float64) if eta > 0 else None
    return sched, x_T, noise, dict(eta=eta, final=final, pred=pred, clip=clip, thr=thr)


@pytest.mark.parametrize("case", CASES)
def test_sequential_equals_independent_loop(case):
    sched, x_T, noise, kw = _build(case)
    model = _Model()
    want = _reference(model, x_T, sched.alphas_cumprod, sched.timesteps, noise=noise, **kw)
    model.rows = 0
    x0, sol = sampling.sample(model, x_T, sched, solver="sequential", noise=noise)
    torch.testing.assert_close(x0, want, rtol=0, atol=1e-12)
    T, N = len(sched), x_T.shape[0]
    assert sol.rounds == T and sol.nfe == T * N and model.rows == T * N
    assert bool(sol.converged.all()) and sol.residuals.shape == (N, T)
    assert torch.equal(sol.trajectory[0], x_T) and torch.equal(sol.trajectory[-1], x0)


def test_step_matches_reference_per_row_and_int():
    sched, x_T, noise, _ = _build(CASES[2])
    model = _Model()
    t = sched.timesteps[3].repeat(x_T.shape[0])
    out = model(x_T, t)
    one = sched.step(x_T, out, 3, noise[3])
    rows = sched.step(x_T, out, torch.full((x_T.shape[0],), 3), noise[3])
    torch.testing.assert_close(one, rows, rtol=0, atol=0)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5], CASES[9]])
def test_picard_after_T_rounds_equals_sequential(case):
    sched, x_T, noise, _ = _build(case)
    model = _Model()
    ref, _ = sampling.sample(model, x_T, sched, solver="sequential", noise=noise)
    # a tolerance nothing but an exact step meets: every round fixes exactly one more step
    x0, sol = sampling.sample(model, x_T, sched, solver="picard", tol=1e-300, noise=noise)
    assert sol.rounds <= len(sched) and bool(sol.converged.all())
    torch.testing.assert_close(x0, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(sol.trajectory, _trajectory(model, x_T, sched, noise), rtol=0,
                               atol=1e-12)  # fmt: skip


def _trajectory(model, x_T, sched, noise):
    _, sol = sampling.sample(model, x_T, sched, solver="sequential", noise=noise)
    return sol.trajectory


@pytest.mark.parametrize("name", PARALLEL)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[8]])
def test_every_solver_reaches_the_sequential_trajectory(name, case):
    sched, x_T, noise, _ = _build(case)
    model = _Model()
    want = _trajectory(model, x_T, sched, noise)
    x0, sol = sampling.sample(model, x_T, sched, solver=name, tol=1e-11, noise=noise)
    assert bool(sol.converged.all())
    assert sol.rounds <= len(sched)
    torch.testing.assert_close(sol.trajectory, want, rtol=0, atol=1e-8)
    torch.testing.assert_close(x0, want[-1], rtol=0, atol=1e-8)
    assert float(sol.residuals.nan_to_num(1.0).max()) <= 1e-11


@pytest.mark.parametrize("name", PARALLEL)
def test_parallel_solvers_take_fewer_rounds(name):
    sched, x_T, _noise, _ = _build(CASES[1])
    ref, _ = sampling.sample(_Model(), x_T, sched, solver="sequential")
    x0, sol = sampling.sample(_Model(), x_T, sched, solver=name, tol=1e-6)
    # fewer rounds for a sample that is still the sequential one (10 to 21 of 50 rounds measured,
    # all within 3e-7 of it): stopping early without converging does not count
    assert bool(sol.converged.all()) and sol.rounds <= len(sched) // 2
    assert float((x0 - ref).abs().max()) < 1e-5
    assert sol.trace.shape == (sol.rounds,)


def test_generator_draws_the_noise_at_once():
    sched, x_T, _, _ = _build(CASES[2])
    T, N = len(sched), x_T.shape[0]
    noise = torch.randn(T, N, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    a, _ = sampling.sample(_Model(), x_T, sched, solver="sequential", noise=noise)
    b, _ = sampling.sample(
        _Model(), x_T, sched, solver="picard", tol=1e-12, generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("window", [1, 3, 7])
def test_window_gives_the_same_sample(window):
    sched, x_T, noise, _ = _build(CASES[2])
    model = _Model()
    ref, _full = sampling.sample(model, x_T, sched, solver="picard", tol=1e-12, noise=noise)
    x0, sol = sampling.sample(
        model, x_T, sched, solver="picard", tol=1e-12, noise=noise, window=window
    )
    torch.testing.assert_close(x0, ref, rtol=0, atol=1e-9)
    assert sol.window == window and bool(sol.converged.all())
    # the window bounds every round's batch
    seen = []

    def spy(x, t):
        seen.append(x.shape[0])
        return model(x, t)

    again, _ = sampling.sample(
        spy, x_T, sched, solver="picard", tol=1e-12, noise=noise, window=window
    )
    assert torch.equal(again, x0) and max(seen) <= window * x_T.shape[0]
    assert sol.nfe == sum(seen) <= sol.rounds * window * x_T.shape[0]
    if window == 1:
        assert sol.rounds == len(sched)


def test_chunk_splits_model_calls_not_rounds():
    sched, x_T, _noise, _ = _build(CASES[1])
    model = _Model()
    ref, a = sampling.sample(model, x_T, sched, solver="picard", tol=1e-8)
    seen = []

    def spy(x, t):
        seen.append(x.shape[0])
        return model(x, t)

    x0, b = sampling.sample(spy, x_T, sched, solver="picard", tol=1e-8, chunk=5)
    torch.testing.assert_close(x0, ref, rtol=0, atol=1e-12)
    assert (b.rounds, b.nfe) == (a.rounds, a.nfe) and b.calls > a.calls == a.rounds
    assert max(seen) == 5 and sum(seen) == b.nfe and len(seen) == b.calls


@pytest.mark.parametrize("name", PARALLEL)
def test_init_from_the_converged_trajectory_takes_one_round(name):
    sched, x_T, noise, _ = _build(CASES[2])
    model = _Model()
    traj = _trajectory(model, x_T, sched, noise)
    x0, sol = sampling.sample(
        model, x_T, sched, solver=name, noise=noise, init=traj, window=len(sched)
    )
    assert sol.rounds == 1 and bool(sol.converged.all())
    torch.testing.assert_close(x0, traj[-1], rtol=0, atol=1e-12)


def test_warm_start_from_a_nearby_trajectory_saves_rounds():
    sched, x_T, _, _ = _build(CASES[1])
    _, cold = sampling.sample(_Model(seed=0), x_T, sched, solver="picard", tol=1e-6)
    _, warm = sampling.sample(
        _Model(seed=0, scale=1.02), x_T, sched, solver="picard", tol=1e-6, init=cold.trajectory
    )
    _, cold2 = sampling.sample(_Model(seed=0, scale=1.02), x_T, sched, solver="picard", tol=1e-6)
    assert warm.rounds < cold2.rounds


def test_max_rounds_is_reported_not_raised():
    sched, x_T, _, _ = _build(CASES[1])
    x0, sol = sampling.sample(_Model(), x_T, sched, solver="picard", tol=1e-12, max_rounds=3)
    assert sol.rounds == 3 and not bool(sol.converged.any())
    assert torch.isnan(sol.residuals).any() and torch.isfinite(x0).all()
    # every round accepted one step at least; the last ones were not reached
    assert sol.residuals[:, :3].isfinite().all() and sol.residuals[:, -1].isnan().all()


def test_per_sample_convergence_counts_honest_nfe():
    sched, x_T, _, _ = _build(CASES[1])
    model = _Model()
    traj = _trajectory(model, x_T, sched, None)
    init = traj.clone()
    init[1:, 1] = x_T[1]  # sample 1 starts cold, samples 0 and 2 at their solution
    model.rows = 0
    x0, sol = sampling.sample(model, x_T, sched, solver="picard", tol=1e-10, init=init)
    T = len(sched)
    assert bool(sol.converged.all()) and sol.rounds > 1
    assert sol.nfe == model.rows and sol.nfe < sol.rounds * T * 3
    assert sol.nfe <= 2 * T + sol.rounds * T  # samples 0 and 2 are done after the first round
    torch.testing.assert_close(x0, traj[-1], rtol=0, atol=1e-8)


def test_trace_records_history():
    sched, x_T, _, _ = _build(CASES[0])
    x0, sol = sampling.sample(_Model(), x_T, sched, solver="picard", tol=1e-8, trace=True)
    T, N = len(sched), x_T.shape[0]
    assert sol.residual_history.shape == (sol.rounds, N, T)
    assert sol.sample_history.shape == (sol.rounds, N, 6)
    torch.testing.assert_close(sol.sample_history[-1], x0, rtol=0, atol=0)
    _, quiet = sampling.sample(_Model(), x_T, sched, solver="picard", tol=1e-8)
    assert quiet.residual_history is None and quiet.sample_history is None


def test_paradigms_rule_is_noise_relative():
    sched, x_T, _, _ = _build(CASES[1])
    model = _Model()
    ref, _ = sampling.sample(model, x_T, sched, solver="sequential")
    loose, a = sampling.sample(model, x_T, sched, solver="paradigms", rule="paradigms", tol=0.1)
    tight, b = sampling.sample(model, x_T, sched, solver=sampling.Paradigms(rule="paradigms"),
                               tol=1e-9)  # fmt: skip
    assert bool(a.converged.all()) and a.rounds < b.rounds
    assert (tight - ref).abs().max() < 1e-8 < (loose - ref).abs().max()


def test_images_and_float32():
    sched, _, _, _ = _build(CASES[0])
    x_T = torch.randn(2, 2, 3, 3)

    def model(x, t):
        return torch.tanh(x * 0.5) * (t.float() / N_TRAIN).reshape(-1, 1, 1, 1)

    ref, _ = sampling.sample(model, x_T, sched, solver="sequential")
    x0, _sol = sampling.sample(model, x_T, sched, solver="picard", tol=1e-5)
    assert x0.dtype == torch.float32 and x0.shape == x_T.shape
    torch.testing.assert_close(x0, ref, rtol=1e-4, atol=1e-4)


def test_non_finite_model_output_names_the_timestep():
    sched, x_T, _, _ = _build(CASES[0])

    def model(x, t):
        out = torch.zeros_like(x)
        out[t == int(sched.timesteps[4])] = float("nan")
        return out

    for name in ("sequential", "picard"):
        with pytest.raises(NonFiniteError, match=f"timestep {int(sched.timesteps[4])}"):
            sampling.sample(model, x_T, sched, solver=name)


def _ok_sched():
    return sampling.DDIM(_schedule("linear"), _timesteps(10))


BAD_DDIM = [
    (dict(alphas_cumprod=torch.ones(3, 3)), ValueError, "1-D"),
    (dict(alphas_cumprod=torch.tensor([0.9, 1.2])), ValueError, "in \\(0, 1\\)"),
    (dict(alphas_cumprod=torch.tensor([0.5, 0.9])), ValueError, "non-increasing"),
    (dict(timesteps=torch.tensor([1, 5])), ValueError, "strictly decreasing"),
    (dict(timesteps=torch.tensor([1000, 5])), ValueError, "\\[0, 999\\]"),
    (dict(timesteps=torch.tensor([5.0, 1.0])), TypeError, "int"),
    (dict(eta=1.5), ValueError, "eta"),
    (dict(final_alpha_cumprod=0.0), ValueError, "final_alpha_cumprod"),
    (
        dict(final_alpha_cumprod=0.5),
        ValueError,
        "final_alpha_cumprod must be in \\[alphas_cumprod\\[0\\]",
    ),
    (dict(prediction_type="noise"), ValueError, "prediction_type"),
    (dict(clip_sample=-1.0), ValueError, "clip_sample"),
    (dict(thresholding=0.9), TypeError, "thresholding"),
    (dict(clip_sample=1.0, thresholding=sampling.Thresholding()), ValueError, "exclude"),
]


@pytest.mark.parametrize(("kw", "exc", "match"), BAD_DDIM)
def test_ddim_rejects(kw, exc, match):
    args = dict(alphas_cumprod=_schedule("linear"), timesteps=_timesteps(10)) | kw
    with pytest.raises(exc, match=match):
        sampling.DDIM(**args)


def test_thresholding_rejects():
    with pytest.raises(ValueError, match="ratio"):
        sampling.Thresholding(ratio=0.0)
    with pytest.raises(ValueError, match="max_value"):
        sampling.Thresholding(max_value=-1.0)


def test_ddim_attributes():
    sched = sampling.DDIM(_schedule("linear").float(), _timesteps(10), eta=0.5)
    assert sched.alphas_cumprod.dtype == torch.float64 and sched.timesteps.dtype == torch.int64
    assert len(sched) == 10 and sched.stochastic and sched.final_alpha_cumprod == 1.0
    assert (sched.step_variance()[:-1] > 0).all() and sched.step_variance()[-1] == 0


def _x(n=2):
    return torch.randn(n, 6, dtype=torch.float64)


BAD_SAMPLE = [
    (dict(solver="newton"), ValueError, "unknown solver 'newton'"),
    (dict(solver=sampling.Picard), TypeError, "solver must be"),
    (dict(tol=0.0), ValueError, "tol"),
    (dict(max_rounds=0), ValueError, "max_rounds"),
    (dict(window=0), ValueError, "window"),
    (dict(window=2.5), TypeError, "window"),
    (dict(chunk=0), ValueError, "chunk"),
    (dict(trace=1), TypeError, "trace"),
    (dict(solver="sequential", window=3), ValueError, "one step per round"),
    (dict(noise=torch.zeros(10, 2, 6, dtype=torch.float64)), ValueError, "deterministic"),
    (dict(init=torch.zeros(10, 2, 6, dtype=torch.float64)), ValueError, "init must have shape"),
    (dict(init=torch.full((11, 2, 6), float("inf"))), NonFiniteError, "init"),
    (dict(solver="picard", windw=3), TypeError, "unknown option"),
    (dict(solver=sampling.Picard(), window_size=3), TypeError, "by name"),
    (dict(generator=3), TypeError, "generator"),
    (dict(process_group=object()), ValueError, "initialised"),
]


@pytest.mark.parametrize(("kw", "exc", "match"), BAD_SAMPLE)
def test_sample_rejects(kw, exc, match):
    with pytest.raises(exc, match=match):
        sampling.sample(_Model(), _x(), _ok_sched(), **kw)


def test_sample_rejects_bad_inputs():
    sched = _ok_sched()
    with pytest.raises(ValueError, match="x_T"):
        sampling.sample(_Model(), torch.zeros(6), sched)
    with pytest.raises(NonFiniteError, match="x_T"):
        sampling.sample(_Model(), torch.full((2, 6), float("nan")), sched)
    for empty in (torch.zeros(0, 6, dtype=torch.float64), torch.zeros(2, 0, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"x_T must hold at least one sample.*got shape"):
            sampling.sample(_Model(), empty, sched)
    with pytest.raises(TypeError, match="sched"):
        sampling.sample(_Model(), _x(), "ddim")
    with pytest.raises(TypeError, match="model"):
        sampling.sample(None, _x(), sched)
    with pytest.raises(ValueError, match="shaped like x"):
        sampling.sample(lambda x, t: x[:, :2], _x(), sched)
    noisy = sampling.DDIM(_schedule("linear"), _timesteps(10), eta=1.0)
    with pytest.raises(ValueError, match="noise must have shape"):
        sampling.sample(_Model(), _x(), noisy, noise=torch.zeros(9, 2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="not both"):
        sampling.sample(_Model(), _x(), noisy, noise=torch.zeros(10, 2, 6, dtype=torch.float64),
                        generator=torch.Generator())  # fmt: skip
    with pytest.raises(ValueError, match="step index"):
        sched.step(_x(), _x(), 10)


def test_ddim_step_refuses_tensor_indices_out_of_range():
    """A per-row k outside [0, T) is refused by name: a negative one wrapped around to the last
    steps' coefficients (k = -1 silently took step T-1), a float one failed in indexing."""
    sched, x = _ok_sched(), _x()
    for k in (torch.tensor([-1, 0]), torch.tensor([0, 10])):
        with pytest.raises(ValueError, match=re.escape("k must hold step indices in [0, 10), got")):
            sched.step(x, x, k)
    with pytest.raises(TypeError, match="k must hold integer step indices"):
        sched.step(x, x, torch.tensor([0.0, 1.0]))
    ok = sched.step(x, x, torch.tensor([9, 0]))
    torch.testing.assert_close(ok[0], sched.step(x[:1], x[:1], 9)[0], rtol=0, atol=0)


def test_ddim_step_takes_uint8_indices_as_indices_not_as_a_mask():
    """A uint8 k indexed the coefficients as a boolean mask: with M = T rows of k = 3 every row
    got a different step's coefficients (c[0], ..., c[T-1]) instead of step 3's, silently."""
    sched, x = _ok_sched(), _x(10)
    expected = sched.step(x, x, 3)
    for dtype in (torch.uint8, torch.int8, torch.int32, torch.int64):
        got = sched.step(x, x, torch.full((10,), 3, dtype=dtype))
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_register_solver_by_name():
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass(frozen=True)
    class Damped(sampling.SamplingSolver):
        name: ClassVar[str] = "test-damped"

        def init(self, system):
            return None

        def update(self, system, block, state):
            return block.x[1:] + 0.5 * block.g, state

    sampling.register_solver(Damped)
    try:
        sched, x_T, _, _ = _build(CASES[0])
        ref, _ = sampling.sample(_Model(), x_T, sched, solver="sequential")
        x0, sol = sampling.sample(_Model(), x_T, sched, solver="test-damped", tol=1e-12)
        assert sol.solver == "test-damped" and bool(sol.converged.all())
        torch.testing.assert_close(x0, ref, rtol=0, atol=1e-9)
    finally:
        sampling.SOLVERS._classes.pop("test-damped")


def test_guide_example_runs_and_prints_what_it_says(capsys):
    """The sampling guide's first example (docs/guides/diffusion-sampling.md, a ```py block that
    the docs test leaves alone, run here) prints what its comments say."""
    from pathlib import Path

    page = Path(__file__).resolve().parent.parent / "docs" / "guides" / "diffusion-sampling.md"
    code = page.read_text().split("```py\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    exec(compile(code, "diffusion-sampling.md example", "exec"), {"__name__": "__docs__"})
    said = [line.split("# ", 1)[1] for line in code.splitlines() if "print(" in line]
    out = capsys.readouterr().out.splitlines()
    assert [o.strip() for o in out] == [s.split(":")[0].strip() for s in said]


def test_thresholding_splits_rows_past_quantiles_limit(monkeypatch):
    """torch.quantile refuses over 2**24 elements; the rows go through in pieces."""
    from equilibria.sampling import _schedule

    x0 = torch.randn(7, 3, 4, dtype=torch.float64) * 2
    thr = sampling.Thresholding(ratio=0.8, max_value=2.5)
    whole = thr(x0)
    monkeypatch.setattr(_schedule, "_QUANTILE_MAX", 25)  # two rows of 12 per piece
    torch.testing.assert_close(thr(x0), whole, rtol=0, atol=0)
    s = torch.quantile(x0.reshape(7, -1).abs(), 0.8, dim=1).clamp(1, 2.5)[:, None, None]
    torch.testing.assert_close(whole, x0.clamp(-s, s) / s, rtol=0, atol=1e-15)


@pytest.mark.slow
def test_thresholding_past_quantiles_real_limit():
    x0 = torch.randn(17, 2**20 + 1) * 2
    got = sampling.Thresholding(ratio=0.9, max_value=3.0)(x0)
    s = torch.stack([torch.quantile(r.abs(), 0.9) for r in x0]).clamp(1, 3)[:, None]
    torch.testing.assert_close(got, x0.clamp(-s, s) / s)


def test_paradigms_rule_with_alpha_ending_at_one():
    """The last step's posterior variance is 0 when ᾱ ends at 1: it takes the smallest positive
    one instead of dividing by zero (ParaDiGMS pads its inverse with 0)."""
    sched, x_T, _, _ = _build(CASES[0])
    assert float(sched.step_variance()[-1]) == 0.0
    ref, _ = sampling.sample(_Model(), x_T, sched, solver="sequential")
    x0, sol = sampling.sample(_Model(), x_T, sched, solver="paradigms", rule="paradigms", tol=1e-8)
    assert bool(sol.converged.all()) and torch.isfinite(sol.residuals).all()
    torch.testing.assert_close(x0, ref, rtol=0, atol=1e-6)


def test_import_does_not_need_diffusers():
    import subprocess
    import sys

    code = "import sys, equilibria.sampling; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bfloat16_parallel_sample_as_close_as_the_bfloat16_loop():
    """In bfloat16 a step moves the state by about one rounding. The sequential solver is the
    plain bfloat16 loop exactly (it kept unevaluated copies X[k+1] = X[k] where a step moved
    less than 4 eps ||f||), and Picard lands as close to the float64 sample as that loop, in
    fewer than T rounds (with a 4 eps ||f|| allowance per step it was 9x further, in 4 rounds)."""
    ac = _schedule("linear")
    sched = sampling.DDIM(ac, torch.arange(990, -1, -10))

    def model(x, t):  # the exact eps of data N(0, 0.25 I)
        a = ac[t].to(x.dtype).reshape(-1, 1, 1, 1)
        return (1 - a).sqrt() * x / (0.25 * a + 1 - a)

    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref, _ = sampling.sample(model, x_T, sched, solver="sequential")
    loop = x_T.bfloat16()
    for k in range(len(sched)):
        loop = sched.step(loop, model(loop, sched.timesteps[k].expand(4)), k)
    seq, _ = sampling.sample(model, x_T.bfloat16(), sched, solver="sequential")
    assert torch.equal(seq, loop)
    x0, sol = sampling.sample(model, x_T.bfloat16(), sched, solver="picard", tol=1e-3)
    assert bool(sol.converged.all()) and sol.rounds < len(sched) // 2
    err_seq = float((seq.double() - ref).norm() / ref.norm())
    err_par = float((x0.double() - ref).norm() / ref.norm())
    assert err_par <= 1.5 * err_seq


@pytest.mark.parametrize("solver", ["picard", "default", "paradigms"])
def test_unevaluated_copies_are_never_accepted(solver):
    """A large tol accepts what the rule lets through, but never a state that entered the
    window as a copy of an earlier one (x_T came back as the sample in one round)."""
    sched, x_T, _, _ = _build(CASES[0])
    x0, sol = sampling.sample(_Model(), x_T, sched, solver=solver, tol=10.0)
    assert sol.rounds >= 2 and not torch.equal(x0, x_T)


def test_reprs_are_short():
    sched = sampling.DDIM(_schedule("linear"), _timesteps(10), clip_sample=1.0)
    assert repr(sched) == (
        "DDIM(T=10, timesteps=[900, ..., 0], n_train=1000, eta=0, final_alpha_cumprod=1, "
        "prediction_type='epsilon', clip_sample=1.0)"
    )
    _, sol = sampling.sample(_Model(), _x(), sched, solver="picard", tol=1e-6)
    assert repr(sol) == (
        f"SamplingSolution(solver='picard', rounds={sol.rounds}, nfe={sol.nfe}, converged=2/2, "
        "T=10, window=10, tol=1e-06)"
    )


@pytest.mark.parametrize("option", [["--seeds", "0"], ["--samples", "0"]])
def test_recipe_runs_refuses_every_solver_benchmark_option(option):
    """benchmarks/sampling.py --recipe-runs takes none of the solver benchmark's options; an
    explicit 0 (--seeds 0, --samples 0) equals False and was ignored silently."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    argv = ["benchmarks/sampling.py", "--recipe-runs", "/nonexistent/run", *option]
    done = subprocess.run([sys.executable, *argv, "--out", "/nonexistent"], cwd=root,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    expected = f"--recipe-runs takes no solver-benchmark options, got {option[0]}"
    assert done.returncode == 2 and expected in done.stderr, done.stderr
