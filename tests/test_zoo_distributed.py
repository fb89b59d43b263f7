"""torchrun with 2 processes (gloo, loopback) takes the same step as 1 process on the global batch.

With plain SGD (no momentum, no weight decay) and learning rate 1, one optimizer step moves the
parameters by exactly minus the gradient, so comparing the checkpoints compares the gradients that
DistributedDataParallel averaged with the single-process gradient of the same 64 images. Float64,
and tolerances set unreachable so that the forward and adjoint solves run a fixed number of
iterations: every sample's computation is then independent of how the batch is split.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from equilibria.zoo.checkpoint import load_checkpoint
from equilibria.zoo.config import to_dict
from equilibria.zoo.digits import DigitsConfig, build_model, train

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {
    "backward": "implicit", "optimizer": "sgd", "lr": 1.0, "warmup_epochs": 0, "epochs": 1,
    "train_subset": 64, "batch_size": 64, "dtype": "float64", "tol": 1e-30, "max_iter": 12,
    "implicit_tol": 1e-30, "implicit_max_iter": 15, "eval_max_iter": 5, "width": 8, "groups": 2,
    "quiet": True, "report": False, "measure_memory": False,
}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(options: dict[str, object]) -> list[str]:
    out = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    return out


def test_two_processes_give_the_single_process_gradient(tmp_path: Path) -> None:
    ddp_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "equilibria", "train", "digits", *_argv(OPTIONS), "--run-dir", str(ddp_dir),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout  # printed once, by rank 0
    assert done.stdout.count("test accuracy") == 1
    # only rank 0 wrote files, and nothing was left half-written
    assert sorted(p.name for p in ddp_dir.iterdir()) == [
        "checkpoint.safetensors", "config.json", "metrics.jsonl", "summary.json",
    ]  # fmt: skip

    config = DigitsConfig(**OPTIONS, run_dir=str(tmp_path / "single"))  # type: ignore[arg-type]
    train(config)
    start = build_model(config).state_dict()
    two = load_checkpoint(ddp_dir).model
    one = load_checkpoint(tmp_path / "single").model
    for name, p0 in start.items():
        grad_one, grad_two = p0 - one[name], p0 - two[name]  # lr = 1: the gradients
        assert grad_one.abs().max() > 0, name
        torch.testing.assert_close(grad_two, grad_one, rtol=1e-9, atol=1e-12, msg=name)
    assert load_checkpoint(ddp_dir).extra["metrics"]["world_size"] == 2

    # starting again in the same folder: every rank fails with the same clear error
    before = (ddp_dir / "checkpoint.safetensors").read_bytes()
    cmd[cmd.index("--master-port") + 1] = str(_free_port())
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0
    message = f"equilibria: error: run folder {ddp_dir} already holds a run"
    assert again.stderr.count(message) == 2, again.stderr[-3000:]
    assert "gloo" not in again.stderr.lower() and "Connection closed" not in again.stderr
    assert (ddp_dir / "checkpoint.safetensors").read_bytes() == before  # untouched


def test_a_folder_error_of_rank_0_is_every_rank_s_error_line(tmp_path: Path) -> None:
    """Creating, locking and reading the run folder is rank 0's work: when it fails, the other
    process prints the same error line too (it waited in its next collective call before and died
    with gloo's "Connection closed by peer" traceback once rank 0 exited)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*options: str) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
            "-m", "equilibria", "train", "digits", *_argv(OPTIONS), *options,
        ]  # fmt: skip
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    (tmp_path / "a-file").write_text("")
    unwritable = tmp_path / "a-file" / "run"
    done = torchrun("--run-dir", str(unwritable))
    assert done.returncode != 0
    message = f"equilibria: error: --run-dir {unwritable} cannot be written"
    assert done.stderr.count(message) == 2, done.stderr[-3000:]
    assert "gloo" not in done.stderr.lower() and "Connection closed" not in done.stderr

    # a resume whose metrics.jsonl is damaged (config.json intact, no checkpoint yet)
    run_dir = tmp_path / "damaged"
    run_dir.mkdir()
    config = DigitsConfig(**OPTIONS, run_dir=str(run_dir))  # type: ignore[arg-type]
    saved = {"recipe": "digits", "config": to_dict(config)}
    (run_dir / "config.json").write_text(json.dumps(saved))
    (run_dir / "metrics.jsonl").write_text('not json\n{"epoch": 1}\n')
    done = torchrun("--run-dir", str(run_dir), "--resume")
    assert done.returncode != 0
    message = f"equilibria: error: {run_dir / 'metrics.jsonl'} is damaged: line 1"
    assert done.stderr.count(message) == 2, done.stderr[-3000:]
    assert "gloo" not in done.stderr.lower() and "Connection closed" not in done.stderr
    assert (run_dir / "metrics.jsonl").read_text() == 'not json\n{"epoch": 1}\n'


_STOP_AFTER_EPOCH_1 = """
import json, sys
from equilibria.zoo import trainer
from equilibria.zoo.digits import DigitsConfig, DigitsTask

class Stop(BaseException):
    pass

def stop(epoch):
    if epoch == 1:
        raise Stop

try:
    trainer.train(DigitsTask(DigitsConfig(**json.loads(sys.argv[1]))), on_epoch_end=stop)
except Stop:
    pass
"""


def test_a_resumed_torchrun_run_is_bitwise_the_uninterrupted_one(tmp_path: Path) -> None:
    """What the README says is tested: 2 processes stopped after epoch 1 and resumed with
    ``--resume`` end with the parameters and optimizer state of an uninterrupted 2-process run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    options = {**OPTIONS, "epochs": 2, "optimizer": "adamw", "lr": 0.01, "batch_size": 32,
               "warmup_epochs": 1}  # fmt: skip

    def torchrun(*args: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]  # fmt: skip
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    full, part = tmp_path / "full", tmp_path / "part"
    torchrun("-m", "equilibria", "train", "digits", *_argv(options), "--run-dir", str(full))
    script = tmp_path / "stop.py"
    script.write_text(_STOP_AFTER_EPOCH_1)
    torchrun(str(script), json.dumps({**options, "run_dir": str(part)}))
    assert load_checkpoint(part).epoch == 1
    torchrun("-m", "equilibria", "train", "digits", *_argv(options), "--run-dir", str(part),
             "--resume")  # fmt: skip
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert b.epoch == 2 and b.extra["metrics"]["world_size"] == 2
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name]), name
    assert a.optimizer is not None and b.optimizer is not None and a.optimizer["state"]
    for k, state in a.optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(b.optimizer["state"][k][key])
            )
    rows = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
