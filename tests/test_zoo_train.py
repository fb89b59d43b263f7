"""The digits recipe end to end: CLI run folder, eval, bitwise resume (also after SIGKILL)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from equilibria.zoo import mosaic
from equilibria.zoo.checkpoint import CheckpointError, load_checkpoint
from equilibria.zoo.cli import main
from equilibria.zoo.config import ConfigError, from_dict
from equilibria.zoo.digits import DigitsConfig, batch_loss, build_model, load_data, train
from equilibria.zoo.runs import MissingExtraError

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


class _Stop(BaseException):
    """An interruption (like KeyboardInterrupt, not an Exception: not recorded as a failure)."""


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


def _kill_after_first_checkpoint(argv: list[str], run: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "equilibria", *argv, "--run-dir", str(run)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.safetensors").exists():  # appears by an atomic rename
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stderr:
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def test_resume_after_sigkill_is_bitwise_identical(tmp_path: Path) -> None:
    epochs = 6
    argv = ["train", "digits", *TINY_ARGS, "--epochs", str(epochs), "--no-report",
            "--no-measure-memory"]  # fmt: skip
    killed = tmp_path / "killed"
    _kill_after_first_checkpoint(argv, killed)
    assert load_checkpoint(killed).epoch < epochs  # really interrupted mid-run
    subprocess.run([sys.executable, "-m", "equilibria", *argv, "--run-dir", str(killed),
                    "--resume"], cwd=REPO, check=True, capture_output=True)  # fmt: skip
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


def _edit_checkpoint_meta(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the checkpoint's JSON metadata, re-sealed with a valid digest (a crafted file, as
    an attacker or a buggy tool would write it)."""
    from equilibria.zoo import checkpoint_file

    tensors, text = checkpoint_file.read(path)
    meta = json.loads(text)
    edit(meta)
    path.write_bytes(checkpoint_file.encode(tensors, json.dumps(meta)))


def _drop_a_parameter(meta: dict[str, Any]) -> None:
    meta["optimizer"]["param_groups"][0]["params"].pop()


def _weight_decay_as_text(meta: dict[str, Any]) -> None:  # loads, fails at the first step
    meta["optimizer"]["param_groups"][0]["weight_decay"] = "0.01"


@pytest.mark.parametrize("edit", [_drop_a_parameter, _weight_decay_as_text])
def test_resume_refuses_an_unrestorable_optimizer_before_touching_the_folder(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None]
) -> None:
    """The optimizer layout lives in the metadata; loading it failed inside training, which was
    reported as a training failure written over the finished run's summary.json (a layout that
    loads but fails at its first step still was: the resume now takes a dry step on a copy)."""
    config = DigitsConfig(**{**TINY, "epochs": 1}, run_dir=str(tmp_path / "run"))
    train(config)
    run = tmp_path / "run"
    _edit_checkpoint_meta(run / "checkpoint.safetensors", edit)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(CheckpointError, match="cannot be restored into the model and optimizer"):
        train(dataclasses.replace(config, resume=True))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_refuses_another_thread_or_process_count(tmp_path: Path) -> None:
    """Either changes the numbers (the README promises the uninterrupted run's bits)."""
    config = DigitsConfig(**{**TINY, "epochs": 2, "threads": 1}, run_dir=str(tmp_path / "run"))

    def stop(epoch: int) -> None:
        raise _Stop

    with pytest.raises(_Stop):
        train(config, on_epoch_end=stop)
    with pytest.raises(ConfigError, match=r"threads=1, this process has 2.*--threads 1"):
        train(dataclasses.replace(config, resume=True, threads=2))

    def two_processes(meta: dict[str, Any]) -> None:
        meta["extra"]["metrics"]["world_size"] = 2

    _edit_checkpoint_meta(tmp_path / "run" / "checkpoint.safetensors", two_processes)
    with pytest.raises(ConfigError, match=r"world_size=2, this process has 1.*nproc-per-node 2"):
        train(dataclasses.replace(config, resume=True))


def test_resuming_a_finished_run_keeps_its_training_statistics(tmp_path: Path) -> None:
    config = DigitsConfig(**{**TINY, "epochs": 1}, run_dir=str(tmp_path / "run"))
    first = train(config)
    again = train(dataclasses.replace(config, resume=True))
    for key in ("fwd_iters_mean", "fwd_residual_max", "bwd_iters_mean", "test_acc", "epochs"):
        assert again[key] == first[key] is not None, key


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
    assert summary["epochs"] == 1 and math.isfinite(summary["test_loss"])
    model = build_model(config)
    x, y, _, _ = load_data()
    loss, logits = batch_loss(model, x[:8], y[:8], config)
    # the correction loss is sum_i gamma^(n-1-i) CE(state i), computed here independently
    states = model(x[:8], states=3)
    assert isinstance(states, list) and len(states) == 3
    gamma = config.correction_gamma
    expected = sum(gamma ** (2 - i) * F.cross_entropy(out, y[:8]) for i, out in enumerate(states))
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-6, atol=0)
    assert torch.equal(logits, states[-1])
    single, _ = batch_loss(model, x[:8], y[:8], dataclasses.replace(config, correction_states=0))
    assert float(loss.detach()) > float(single.detach())  # three weighted terms


@pytest.mark.parametrize(("module", "report"), [("sklearn", False), ("matplotlib", True)])
def test_missing_extra_fails_before_the_run_folder_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, report: bool
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    run = tmp_path / "run"
    config = DigitsConfig(**{**TINY, "epochs": 1, "report": report}, run_dir=str(run))
    with pytest.raises(MissingExtraError) as info:
        train(config)
    assert f"missing optional dependency {module}" in str(info.value)
    assert "pip install 'equilibria[zoo]'" in str(info.value)
    assert not run.exists()
    # through the CLI: a clear error, exit 1, nothing written (so a rerun is not refused)
    flag = "--report" if report else "--no-report"
    argv = ["train", "digits", *TINY_ARGS, "--epochs", "1", flag, "--run-dir", str(run)]
    assert main(argv) == 1
    assert not run.exists()


def test_without_report_matplotlib_is_not_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    summary = train(DigitsConfig(**{**TINY, "epochs": 1}, run_dir=str(tmp_path / "run")))
    assert summary["epochs"] == 1 and "report" not in summary


def test_report_of_a_folder_without_metrics_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    assert main(["report", str(missing)]) == 2
    assert f"equilibria: error: report: {missing} is not a folder" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"recipe": "mosaic", "config": {}}')
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"report: {tmp_path} holds no per-epoch metrics (metrics.jsonl)" in err


def test_warmup_longer_than_training_is_refused_for_new_runs_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"warmup_epochs must be <= epochs=2 .*got 3"):
        train(DigitsConfig(**{**TINY, "epochs": 2, "warmup_epochs": 3}, run_dir=str(run)))
    assert not run.exists()
    argv = ["train", "digits", *TINY_ARGS, "--epochs", "2", "--warmup-epochs", "3"]
    assert main([*argv, "--run-dir", str(run)]) == 2
    assert "warmup_epochs must be <= epochs=2" in capsys.readouterr().err
    assert not run.exists()
    # a saved run from before the rule still rebuilds its config (eval, resume)
    saved = {**TINY, "epochs": 2, "warmup_epochs": 3}
    assert from_dict(DigitsConfig, saved).warmup_epochs == 3


MOSAIC_TINY = [
    "--grid", "2", "--channels", "8", "--rank", "2", "--steps", "2", "--batch-size", "4",
    "--test-canvases", "4", "--threads", "1", "--quiet", "--no-report",
]  # fmt: skip


def test_mosaic_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "mosaic"
    assert main(["train", "mosaic", *MOSAIC_TINY, f"--run-dir={run}"]) == 0  # the `=` form
    out = capsys.readouterr().out
    assert f"run folder: {run}" in out and "mosaic: mIoU" in out
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.safetensors", "config.json", "metrics.jsonl", "summary.json",
    ]  # fmt: skip
    assert main(["train", "mosaic", *MOSAIC_TINY, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"run folder {run} already holds a run; pass --resume to continue it" in err
    for empty in (["--run-dir="], ["--run-dir", ""]):
        assert main(["train", "mosaic", *empty]) == 2
        assert "--run-dir needs a folder" in capsys.readouterr().err
    for recipe in ("mosaic", "digits"):  # digits kept the last one silently
        assert main(["train", recipe, "--run-dir", "a", "--run-dir=b"]) == 2
        assert "--run-dir given 2 times; give one folder" in capsys.readouterr().err
    assert not (Path("a").exists() or Path("b").exists())
    # eval and report work on the mosaic run folder
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert result["miou"] == summary["miou"] and result["recipe"] == "mosaic"
    assert set(summary["iou"]) == {"background", "match", "other"}
    assert main(["eval", str(run)]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert main(["eval", str(run), "--eval-max-iter", "3"]) == 2  # a digits option
    assert "unknown option(s) ['--eval-max-iter', '3']" in capsys.readouterr().err
    assert main(["report", str(run)]) == 0
    assert "| mIoU |" in (run / "report.md").read_text() and (run / "miou.png").is_file()
    # several torchrun processes: refused before anything is written
    monkeypatch.setenv("WORLD_SIZE", "2")
    other = tmp_path / "ddp"
    assert main(["train", "mosaic", *MOSAIC_TINY, "--run-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert "recipe 'mosaic' has no distributed training, got WORLD_SIZE=2" in err
    assert "recipes that train under torchrun: digits" in err
    assert not other.exists()


def test_mosaic_resumes_bitwise_after_sigkill(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mosaic had no checkpoints: a killed run started over. Its Hamburger draws random bases
    from torch's RNG and its canvases come from a NumPy stream; both are restored."""
    tiny = [a if a != "2" or MOSAIC_TINY[i - 1] != "--steps" else "16"
            for i, a in enumerate(MOSAIC_TINY)]  # fmt: skip
    argv = ["train", "mosaic", *tiny, "--eval-every", "2", "--block", "ham", "--ham-init", "random"]
    killed = tmp_path / "killed"
    _kill_after_first_checkpoint(argv, killed)
    assert load_checkpoint(killed).epoch < 8  # really interrupted mid-run
    subprocess.run([sys.executable, "-m", "equilibria", *argv, "--run-dir", str(killed),
                    "--resume"], cwd=REPO, check=True, capture_output=True)  # fmt: skip
    full = tmp_path / "full"
    assert main([*argv, "--run-dir", str(full)]) == 0
    _assert_bitwise_equal(_final_state(full), _final_state(killed))
    assert _metrics_without_timing(full) == _metrics_without_timing(killed)
    assert len(_metrics_without_timing(full)) == 8
    capsys.readouterr()
    assert main(["eval", str(killed), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == _metrics_without_timing(full)[-1]["miou"]
    assert main(["report", str(killed)]) == 0 and (killed / "report.md").is_file()


def test_a_failed_run_is_recorded_and_named_on_a_rerun(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a learning rate this large makes the first loss non-finite: a clear error (no traceback),
    # the failure recorded in the folder, and a rerun there says that the run failed
    run = tmp_path / "mosaic"
    argv = ["train", "mosaic", *MOSAIC_TINY, "--lr", "1e10", "--aux-weight", "0"]
    assert main([*argv, "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("equilibria: error: training stopped: FloatingPointError: non-finite")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("FloatingPointError")
    assert main(["train", "mosaic", *MOSAIC_TINY, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"run folder {run} already holds a run that failed (FloatingPointError" in err


def test_a_failed_digits_run_is_recorded_and_can_be_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # digits writes its own run folder: a failure there is recorded like mosaic's, exit 1 with a
    # clear error (it was a traceback, and a rerun only said the folder "holds a run")
    from equilibria.zoo import digits

    def nan_loss(*args, **kwargs):
        loss, logits = batch_loss(*args, **kwargs)
        return loss * math.nan, logits

    run = tmp_path / "digits"
    argv = ["train", "digits", *TINY_ARGS, "--epochs", "1", "--no-report", "--run-dir", str(run)]
    monkeypatch.setattr(digits, "batch_loss", nan_loss)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("equilibria: error: training stopped: FloatingPointError: non-finite")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("FloatingPointError")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"run folder {run} already holds a run that failed (FloatingPointError" in err
    assert "pass --resume to continue it" in err
    monkeypatch.setattr(digits, "batch_loss", batch_loss)  # the cause fixed: resume
    assert main([*argv, "--resume"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1


def test_mosaic_sweep_refuses_to_overwrite_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["sweep", "mosaic", "--seeds", "0", "--variants", "conv only", *MOSAIC_TINY]
    assert main([*argv, "--run-dir", str(out)]) == 0
    table = (out / "sweep.md").read_text()
    assert table.count("| conv only |") == 1 and "| variant | mIoU | IoU match |" in table
    record = json.loads((out / "sweep.json").read_text())
    assert record["runs"][0]["grid"] == 2 if "grid" in record["runs"][0] else True
    assert (out / "runs" / "conv-only-seed0" / "checkpoint.safetensors").is_file()
    capsys.readouterr()
    before = (out / "sweep.json").read_text()
    assert main([*argv, "--run-dir", str(out)]) == 2
    assert f"{out} already holds a finished sweep" in capsys.readouterr().err
    assert (out / "sweep.json").read_text() == before
    with pytest.raises(ConfigError, match="already holds a finished sweep"):
        mosaic.compare(out, variants=["conv only"])
    assert main(["sweep", "mosaic", "--lr", "0", "--run-dir", str(tmp_path / "x")]) == 2
    assert "MosaicConfig: lr must be in (0, inf), got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_default_recipe_reaches_98_percent(tmp_path: Path) -> None:
    """The configuration `make demo` trains (about 20-40 s on 2 cores)."""
    summary = train(DigitsConfig(run_dir=str(tmp_path / "run"), quiet=True))
    assert summary["test_acc"] >= 0.98
    assert summary["eval_converged"] == 1.0


def test_cli_errors_instead_of_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --run-dir that is a file, --device cuda without CUDA, eval without its extras: each was
    a Python traceback."""
    afile = tmp_path / "afile"
    afile.write_text("")
    for recipe, extra in (("digits", TINY_ARGS), ("mosaic", ["--steps", "1"])):
        assert main(["train", recipe, *extra, "--run-dir", str(afile)]) == 2
        assert f"--run-dir {afile} is a file, not a folder" in capsys.readouterr().err
    if not torch.cuda.is_available():
        argv = ["train", "digits", *TINY_ARGS, "--device", "cuda", "--run-dir", str(tmp_path / "c")]
        assert main(argv) == 2
        assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    train(DigitsConfig(**{**TINY, "epochs": 1}, run_dir=str(tmp_path / "run")))
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert main(["eval", str(tmp_path / "run")]) == 1
    assert "missing optional dependency sklearn" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m["rng"]["python"][1].__setitem__(0, 2**70), "RNG states cannot be restored"),
        (lambda m: m["config"].__setitem__("width", 64), "do not fit the model of its saved"),
        (lambda m: m["config"].__setitem__("width", "wide"), "its saved config is not valid"),
    ],
    ids=["rng-overflow", "config-vs-tensors", "config-type"],
)
def test_damaged_checkpoint_metadata_is_a_checkpoint_error_in_eval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Any, fragment: str
) -> None:
    """Metadata is outside the tensors' SHA-256: these were an OverflowError traceback, a
    load_state_dict size-mismatch traceback, and a config error that did not name the file."""
    train(DigitsConfig(**{**TINY, "epochs": 1}, run_dir=str(tmp_path / "run")))
    path = tmp_path / "run" / "checkpoint.safetensors"
    _edit_checkpoint_meta(path, edit)
    assert main(["eval", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and fragment in err


def test_a_failing_report_keeps_the_finished_runs_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing the report after training replaced summary.json with a 'failed' record."""
    from equilibria.zoo import report
    from equilibria.zoo.runs import ReportFailedError

    def no_space(run_dir: Any) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_report", no_space)
    config = DigitsConfig(**{**TINY, "epochs": 1, "report": True}, run_dir=str(tmp_path / "run"))
    with pytest.raises(ReportFailedError, match="equilibria report"):
        train(config)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "status" not in summary and summary["test_acc"] > 0


def test_shifted_training_digits_take_the_background_in_not_a_grey_stroke() -> None:
    """The digits are standardised (a blank pixel is about -0.81), so the pixels a shift brings
    in must take that value: shift_images padded with 0, the mean intensity, which drew a grey
    line along the edge shifted in (the bug Prelax's augmentation had, e60fd70)."""
    from equilibria.zoo.digits import DigitsTask, background_value, shift_images
    from equilibria.zoo.distributed import DistInfo

    x = load_data()[0]
    background = background_value()
    assert background == float(x.min()) == float(x[:64].amin(dim=(1, 2, 3)).max())
    assert -0.82 < background < -0.80
    # the training batches: every pixel a shift brought in is background
    task = DigitsTask(DigitsConfig(**TINY))
    task.setup(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0 * 1_000_003 + 0)  # batches(0)'s permutation, shifts
    perm = torch.randperm(128, generator=gen)
    shifts = torch.randint(0, 3, (128, 2), generator=gen)[perm[:64]]
    images, _ = next(task.batches(0, DistInfo()))
    assert torch.equal(images, shift_images(x[perm[:64]], shifts, background))
    rows, cols = shifts[:, 0], shifts[:, 1]  # 0: shifted down (row 0 new), 2: up (row 7 new)
    new = torch.zeros_like(images, dtype=torch.bool)
    new[rows == 0, :, 0, :] = True
    new[rows == 2, :, -1, :] = True
    new[cols == 0, :, :, 0] = True
    new[cols == 2, :, :, -1] = True
    assert 0 < int(new.sum()) and bool((images[new] == background).all())
    # shift_images itself: any fill; the default 0 is kept for Prelax's call on offsets
    one = x[:1]
    down_right = shift_images(one, torch.tensor([[0, 0]]), fill=-2.0)
    assert bool((down_right[0, 0, 0] == -2.0).all())  # the new top row
    assert bool((down_right[0, 0, :, 0] == -2.0).all())  # the new left column
    assert torch.equal(down_right[0, 0, 1:, 1:], one[0, 0, :-1, :-1])
    assert bool((shift_images(one, torch.tensor([[2, 1]]))[0, 0, -1] == 0).all())
    assert torch.equal(shift_images(one, torch.tensor([[1, 1]]), fill=5.0), one)
    with pytest.raises(ValueError, match=r"fill must be in \(-inf, inf\), got nan"):
        shift_images(one, torch.tensor([[0, 0]]), fill=float("nan"))
