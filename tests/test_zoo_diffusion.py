"""The diffusion recipe: Fréchet distance, a tiny run on the engine, eval, bitwise resume, the
model loader other code uses, and the config checks."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from equilibria import sampling
from equilibria.zoo.checkpoint import load_checkpoint
from equilibria.zoo.cli import main
from equilibria.zoo.config import ConfigError
from equilibria.zoo.diffusion import (
    DiffusionConfig,
    ddim_schedule,
    load_eps_model,
    train,
    trained_eps_model,
)
from equilibria.zoo.diffusion_model import (
    CLASSIFIER_FILE,
    EpsMLP,
    feature_net,
    frechet_distance,
    load_digits01,
)

pytestmark = pytest.mark.no_device_mode  # the recipe builds its own CPU data

TINY = {
    "width": 16, "depth": 1, "emb": 8, "steps": 6, "eval_every": 2, "batch_size": 16,
    "sample_steps": 6, "eval_samples": 24, "quiet": True, "report": False,
    "measure_memory": False,
}  # fmt: skip
TIMING = {"epoch_time_s", "time_s", "step_ms", "seq_cpu_s", "par_cpu_s"}


def test_frechet_distance_of_the_test_set_to_itself_is_zero_and_of_noise_is_large() -> None:
    net = feature_net()
    x_train, _, x_test, _ = load_digits01(torch.float64)
    ref = net.features(x_test)
    assert frechet_distance(ref, ref) < 1e-8
    real = frechet_distance(net.features(x_train[:360]), ref)
    noise = frechet_distance(net.features(torch.rand(360, 1, 8, 8, dtype=torch.float64) * 2 - 1),
                             ref)  # fmt: skip
    assert noise > 30 * real, (real, noise)
    # symmetric, and a shifted copy is as far as the squared shift of the means
    shifted = ref + 0.5
    assert frechet_distance(ref, shifted) == pytest.approx(0.25 * ref.shape[1], rel=1e-9)
    assert frechet_distance(shifted, ref) == pytest.approx(frechet_distance(ref, shifted))


def test_frechet_distance_checks_its_input() -> None:
    with pytest.raises(ValueError, match=re.escape("features must be (N, D) with one D")):
        frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="features must be finite"):
        frechet_distance(torch.full((4, 2), float("nan")), torch.zeros(4, 2))
    with pytest.raises(
        ValueError, match=re.escape("at least 2 rows each (a covariance), got 1 and 4")
    ):
        frechet_distance(torch.zeros(1, 2), torch.zeros(4, 2))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"emb": 7}, "emb must be even"), ({"width": 0}, "width must be a positive int, got 0"),
     ({"depth": 2.0}, "depth must be a positive int, got 2.0"),
     ({"emb": True}, "emb must be a positive int, got True")],
)  # fmt: skip
def test_eps_mlp_refuses_bad_sizes(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        EpsMLP(**kwargs)


def test_feature_net_is_cached_in_the_run_folder_and_retrained_identically(tmp_path) -> None:
    first = feature_net(tmp_path)
    assert (tmp_path / CLASSIFIER_FILE).is_file()
    again = feature_net(tmp_path)  # loaded from the file
    fresh = feature_net()  # trained (this process's cached weights)
    for a, b, c in zip(first.state_dict().values(), again.state_dict().values(),
                       fresh.state_dict().values()):  # fmt: skip
        assert torch.equal(a, b) and torch.equal(a, c)
    x_test, y_test = load_digits01(torch.float64)[2:]
    assert float((first(x_test).argmax(1) == y_test).double().mean()) > 0.9


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


class _Stop(BaseException):
    pass


def test_tiny_run_eval_and_bitwise_resume(tmp_path: Path, capsys) -> None:
    full = DiffusionConfig(**TINY, run_dir=str(tmp_path / "full"))
    summary = train(full)
    assert summary["epochs"] == 3
    assert summary["params"] == sum(p.numel() for p in EpsMLP(16, 1, 8).parameters())
    for key in ("fd_parallel", "fd_sequential", "rounds", "nfe", "max_rel_diff", "test_loss"):
        assert summary[key] is not None, key
    assert summary["seq_rounds"] == TINY["sample_steps"] and summary["converged"] == 1.0
    assert summary["rounds"] <= TINY["sample_steps"] and summary["max_rel_diff"] < 1e-2

    def stop_after_first(epoch: int) -> None:
        if epoch == 1:
            raise _Stop

    part = dataclasses.replace(full, run_dir=str(tmp_path / "part"))
    with pytest.raises(_Stop):
        train(part, on_epoch_end=stop_after_first)
    assert load_checkpoint(part.run_dir).epoch == 1
    train(dataclasses.replace(part, resume=True))
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert _rows(tmp_path / "full") == _rows(tmp_path / "part")

    # eval rebuilds the model and scores the same samples; the solver can be changed
    assert main(["eval", str(tmp_path / "full"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fd_parallel"] == pytest.approx(summary["fd_parallel"], rel=1e-9)
    assert main(["eval", str(tmp_path / "full"), "--json", "--solver", "sequential"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rounds"] == TINY["sample_steps"] and result["max_rel_diff"] == 0.0

    # the loader other code uses: model(x, t) -> eps and the training schedule
    model, alphas = load_eps_model(tmp_path / "full")
    assert isinstance(model, EpsMLP) and alphas.dtype == torch.float64 and alphas.shape == (1000,)
    x = torch.randn(5, 1, 8, 8)
    assert model(x, torch.arange(5)).shape == x.shape
    sched = ddim_schedule(alphas, 20)
    x0, sol = sampling.sample(model, x, sched, solver="picard", tol=1e-4)
    ref, _ = sampling.sample(model, x, sched, solver="sequential")
    rel = (x0 - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert sol.rounds <= 20 and float(rel.max()) < 1e-3


def test_stochastic_evaluation_agrees_with_the_sequential_loop(tmp_path: Path) -> None:
    summary = train(DiffusionConfig(**{**TINY, "steps": 2}, eta=0.7, run_dir=str(tmp_path / "r")))
    assert summary["max_rel_diff"] < 1e-2 and summary["fd_gap"] < 0.05 * summary["fd_sequential"]


def test_trained_eps_model_trains_only_when_needed(tmp_path: Path) -> None:
    run = tmp_path / "bench"
    model, _ = trained_eps_model(run, **{**TINY, "steps": 2})
    stamp = (run / "checkpoint.safetensors").stat().st_mtime_ns
    again, _ = trained_eps_model(run)
    assert (run / "checkpoint.safetensors").stat().st_mtime_ns == stamp
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))  # fmt: skip
    # the same options again are fine; other ones would silently return the wrong model
    trained_eps_model(run, **{**TINY, "steps": 2})
    with pytest.raises(ConfigError, match=re.escape("width: saved 16, asked 32")):
        trained_eps_model(run, **{**TINY, "steps": 2, "width": 32})
    assert (run / "checkpoint.safetensors").stat().st_mtime_ns == stamp


def test_ddim_schedule_uses_leading_spacing() -> None:
    alphas = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    sched = ddim_schedule(alphas, 4)
    assert sched.timesteps.tolist() == [750, 500, 250, 0] and sched.final_alpha_cumprod == 1.0
    with pytest.raises(ValueError, match=re.escape("steps must be an int in [1, 1000]")):
        ddim_schedule(alphas, 0)
    with pytest.raises(
        ValueError, match=re.escape("in [1, 1000] (the training schedule's length), got 2.5")
    ):
        ddim_schedule(alphas, 2.5)
    with pytest.raises(
        ValueError, match=re.escape("alphas_cumprod must be a 1-d tensor (N,), got (2, 500)")
    ):
        ddim_schedule(alphas.view(2, 500), 4)


@pytest.mark.parametrize(
    "bad, fragment",
    [({"emb": 7}, "emb must be even"), ({"sample_steps": 2000}, "sample_steps"),
     ({"eta": 1.5}, "eta"), ({"tol": 0.0}, "tol"), ({"eval_samples": 1}, "eval_samples")],
)  # fmt: skip
def test_bad_config_is_refused(bad: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        DiffusionConfig(**bad)


@pytest.mark.parametrize(
    "argv, fragment",
    [(["benchmarks/inversion.py", "--images", "0"], "--images must be in [1, 360]"),
     (["benchmarks/inversion.py", "--budget", "-1"], "--budget must be > 0, got -1.0"),
     (["benchmarks/sampling.py", "--seeds", "0"], "--seeds must be >= 1, got 0"),
     (["benchmarks/sampling.py", "--recipe-runs", "runs/none", "--quick"],
      "--recipe-runs takes no solver-benchmark options, got --quick"),
     (["benchmarks/sampling.py", "--recipe-runs", "/nonexistent/run"],
      "--recipe-runs must be finished diffusion runs, no summary.json in /nonexistent/run")],
)  # fmt: skip
def test_benchmarks_refuse_bad_options_before_training(argv: list, fragment: str) -> None:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, *argv, "--out", "/nonexistent"], cwd=root,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and fragment in done.stderr, done.stderr
