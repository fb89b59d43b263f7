"""The digits recipe end to end: CLI run folder, eval, bitwise resume (also after SIGKILL)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from equilibria.zoo.checkpoint import CheckpointError, load_checkpoint
from equilibria.zoo.cli import main
from equilibria.zoo.config import ConfigError
from equilibria.zoo.digits import DigitsConfig, batch_loss, build_model, load_data, train

REPO = Path(__file__).resolve().parents[1]
# A tiny run: 2 steps of 64 per epoch, small state, short evaluation solve.
TINY = {
    "width": 8, "groups": 2, "epochs": 3, "train_subset": 128, "batch_size": 64,
    "eval_max_iter": 15, "quiet": True, "report": False, "measure_memory": False,
}  # fmt: skip
TINY_ARGS = [
    "--width", "8", "--groups", "2", "--train-subset", "128", "--eval-max-iter", "15", "--quiet",
]  # fmt: skip
METRIC_KEYS = {
    "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "fwd_iters_mean",
    "fwd_residual_max", "bwd_iters_mean", "eval_iters", "eval_residual_max", "eval_trace",
    "epoch_time_s", "step_ms", "peak_mem_mb", "mem_method",
}  # fmt: skip
TIMING_KEYS = {"epoch_time_s", "time_s", "step_ms"}


def test_cli_train_writes_run_folder_and_eval_reads_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = ["train", "digits", *TINY_ARGS, "--epochs", "1", "--run-dir", str(run)]
    assert main([*argv, "--backward", "implicit"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "report:" in out
    files = {p.name for p in run.iterdir()}
    expected = {"config.json", "metrics.jsonl", "checkpoint.safetensors", "summary.json",
                "report.md", "learning_curves.png", "residuals.png", "iterations.png"}  # fmt: skip
    assert expected <= files
    assert not [f for f in files if f.endswith(".tmp")]
    saved = json.loads((run / "config.json").read_text())
    assert saved["recipe"] == "digits" and saved["config"]["backward"] == "implicit"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and METRIC_KEYS <= set(rows[0])
    assert rows[0]["peak_mem_mb"] > 0 and rows[0]["bwd_iters_mean"] >= 1
    report = (run / "report.md").read_text()
    assert "![learning curves](learning_curves.png)" in report

    # eval rebuilds the model from the saved config and gets the same test accuracy
    assert main(["eval", str(run / "checkpoint.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_acc"] == rows[0]["test_acc"]
    assert result["eval_iters"] == rows[0]["eval_iters"]

    # the folder holds a run: starting again without --resume is refused, nothing is touched
    before = (run / "checkpoint.safetensors").read_bytes()
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "checkpoint.safetensors").read_bytes() == before


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run_dir)
    assert ckpt.optimizer is not None
    state = {f"model/{k}": v for k, v in ckpt.model.items()}
    for i, entry in ckpt.optimizer["state"].items():
        state.update({f"optim/{i}/{k}": v for k, v in entry.items()})
    return state


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _metrics_without_timing(run_dir: Path) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


class _Stop(Exception):
    pass


def test_resume_after_interruption_is_bitwise_identical(tmp_path: Path) -> None:
    full = DigitsConfig(**TINY, run_dir=str(tmp_path / "full"))
    train(full)

    def stop_after_first(epoch: int) -> None:
        if epoch == 1:
            raise _Stop

    part = dataclasses.replace(full, run_dir=str(tmp_path / "part"))
    with pytest.raises(_Stop):
        train(part, on_epoch_end=stop_after_first)
    assert load_checkpoint(part.run_dir).epoch == 1
    summary = train(dataclasses.replace(part, resume=True))
    assert summary["epochs"] == 3
    _assert_bitwise_equal(_final_state(tmp_path / "full"), _final_state(tmp_path / "part"))
    assert _metrics_without_timing(tmp_path / "full") == _metrics_without_timing(tmp_path / "part")


def test_resume_after_sigkill_is_bitwise_identical(tmp_path: Path) -> None:
    epochs = 6
    args = [*TINY_ARGS, "--epochs", str(epochs), "--no-report", "--no-measure-memory"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "equilibria", "train", "digits", *args, "--run-dir", str(killed)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.safetensors").exists():  # appears by an atomic rename
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stderr:
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(killed).epoch < epochs  # really interrupted mid-run
    subprocess.run(
        [sys.executable, "-m", "equilibria", "train", "digits", *args, "--run-dir", str(killed),
         "--resume"], cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    config = DigitsConfig(**{**TINY, "epochs": epochs}, run_dir=str(tmp_path / "full"))
    train(config)
    _assert_bitwise_equal(_final_state(tmp_path / "full"), _final_state(killed))
    assert _metrics_without_timing(tmp_path / "full") == _metrics_without_timing(killed)


def test_resume_refuses_corrupted_checkpoint_and_leaves_it(tmp_path: Path) -> None:
    config = DigitsConfig(**{**TINY, "epochs": 1}, run_dir=str(tmp_path / "run"))
    train(config)
    path = tmp_path / "run" / "checkpoint.safetensors"
    damaged = path.read_bytes()[:-1000]
    path.write_bytes(damaged)
    resumed = dataclasses.replace(config, resume=True, epochs=1)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        train(resumed)
    assert path.read_bytes() == damaged  # nothing was overwritten


def test_resume_refuses_other_options_and_missing_run(tmp_path: Path) -> None:
    config = DigitsConfig(**{**TINY, "epochs": 1}, run_dir=str(tmp_path / "run"))
    train(config)
    with pytest.raises(ConfigError, match=r"lr: saved 0\.003, now 0\.01"):
        train(dataclasses.replace(config, resume=True, lr=0.01))
    with pytest.raises(ConfigError, match="holds no run"):
        train(dataclasses.replace(config, resume=True, run_dir=str(tmp_path / "empty")))
    # run-control options may change
    summary = train(dataclasses.replace(config, resume=True, quiet=False, report=True))
    assert summary["epochs"] == 1 and Path(summary["report"]).is_file()


@pytest.mark.parametrize("backward", ["implicit", "phantom", "neumann", "jfb", "unrolled"])
def test_every_backward_method_trains(backward: str) -> None:
    config = DigitsConfig(width=8, groups=2, backward=backward)  # type: ignore[arg-type]
    model = build_model(config)
    x, y, _, _ = load_data()
    loss, logits = batch_loss(model, x[:16], y[:16], config)
    loss.backward()
    assert logits.shape == (16, 10)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    sol = model.deq.last_solution
    assert sol is not None and sol.nstep >= 1
    if backward == "implicit":
        assert sol.backward.nstep is not None and sol.backward.nstep >= 1


def test_fixed_point_correction_trains(tmp_path: Path) -> None:
    config = DigitsConfig(
        **{**TINY, "epochs": 1}, correction_states=3, run_dir=str(tmp_path / "run")
    )
    summary = train(config)
    assert 0.0 <= summary["test_acc"] <= 1.0
    model = build_model(config)
    x, y, _, _ = load_data()
    loss, logits = batch_loss(model, x[:8], y[:8], config)
    single, _ = batch_loss(model, x[:8], y[:8], dataclasses.replace(config, correction_states=0))
    assert logits.shape == (8, 10) and float(loss.detach()) > float(
        single.detach()
    )  # three weighted terms


@pytest.mark.slow
def test_default_recipe_reaches_98_percent(tmp_path: Path) -> None:
    """The configuration `make demo` trains (about 20-40 s on 2 cores)."""
    summary = train(DigitsConfig(run_dir=str(tmp_path / "run"), quiet=True))
    assert summary["test_acc"] >= 0.98
    assert summary["eval_converged"] == 1.0
