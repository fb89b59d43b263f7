"""The recipe engine on a tiny test Task: bitwise resume of a step that draws from the global
RNGs, the dry step before a resume, bounded eval of crafted configs, run-folder locks and the
sweep runner's resumability."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_zoo_train import _final_state  # the checkpoint's model and optimizer tensors
from torch import Tensor, nn

from equilibria.zoo import trainer
from equilibria.zoo.checkpoint import CheckpointError, load_checkpoint
from equilibria.zoo.config import ConfigError, check_fields, option
from equilibria.zoo.distributed import DistInfo
from equilibria.zoo.evaluation import evaluate_checkpoint
from equilibria.zoo.runs import RunFolder
from equilibria.zoo.sweep import SweepConfig, run_sweep
from equilibria.zoo.task import Metric, Schedule, StepOutput, Task


@dataclass(frozen=True)
class NoisyConfig:
    """A regression whose training step draws from torch's, NumPy's and Python's global RNGs."""

    width: int = option(8, "hidden width")
    epochs: int = option(4, "epochs")
    lr: float = option(0.05, "peak learning rate")
    weight_decay: float = option(0.0, "weight decay")
    seed: int = option(0, "seed")
    threads: int = option(1, "threads", resumable=True)
    run_dir: str = option("", "run folder", resumable=True)
    resume: bool = option(False, "resume", resumable=True)
    quiet: bool = option(True, "quiet", resumable=True)
    measure_memory: bool = option(False, "memory", resumable=True)
    report: bool = option(False, "report", resumable=True)

    def __post_init__(self) -> None:
        check_fields(self)


class NoisyTask(Task):
    name = "digits"  # a registered name, so that `equilibria` commands can read its folders
    config_class = NoisyConfig
    headline = Metric("test_loss", "test loss", higher_is_better=False)

    def setup(self, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(123)
        self.x = torch.randn(32, 4, generator=gen, dtype=torch.float64)
        self.y = self.x.sum(1, keepdim=True).sin()

    def build_model(self) -> nn.Module:
        w = self.config.width
        return nn.Sequential(nn.Linear(4, w), nn.Dropout(0.3), nn.Tanh(), nn.Linear(w, 1)).double()

    def schedule(self) -> Schedule:
        return Schedule(self.config.epochs, 4, 2)

    def batches(self, epoch: int, info: DistInfo) -> Iterator[tuple[Tensor, Tensor]]:
        for k in range(4):
            yield self.x[8 * k : 8 * k + 8], self.y[8 * k : 8 * k + 8]

    def train_step(self, net: nn.Module, model: nn.Module, batch: Any) -> StepOutput:
        x, y = batch
        noise = torch.randn_like(x) * 0.1  # torch's global RNG (and dropout's)
        scale = 1.0 + 0.01 * float(np.random.rand()) + 0.01 * random.random()  # noqa: NPY002
        return StepOutput(F.mse_loss(net(x + noise) * scale, y))

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        return {"test_loss": float(F.mse_loss(model(self.x), self.y))}


class _Stop(BaseException):
    """An interruption (not an Exception: not recorded as a failure)."""


def _stop_at(epoch: int) -> Any:
    def stop(done: int) -> None:
        if done == epoch:
            raise _Stop

    return stop


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    timing = {"epoch_time_s", "time_s", "step_ms"}
    rows = RunFolder(run_dir).read_metrics()
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def _straight_and_resumed(tmp_path: Path) -> tuple[Path, Path]:
    full = NoisyConfig(run_dir=str(tmp_path / "full"))
    trainer.train(NoisyTask(full))
    part = dataclasses.replace(full, run_dir=str(tmp_path / "part"))
    with pytest.raises(_Stop):
        trainer.train(NoisyTask(part), on_epoch_end=_stop_at(2))
    assert load_checkpoint(part.run_dir).epoch == 2
    torch.manual_seed(999)  # whatever the process did in between: the checkpoint's RNG counts
    np.random.seed(999)  # noqa: NPY002
    random.seed(999)
    trainer.train(NoisyTask(dataclasses.replace(part, resume=True)))
    return tmp_path / "full", tmp_path / "part"


def test_resume_of_a_step_that_draws_from_the_global_rng_is_bitwise(tmp_path: Path) -> None:
    full, part = _straight_and_resumed(tmp_path)
    a, b = _final_state(full), _final_state(part)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _rows(full) == _rows(part) and len(_rows(full)) == 4


def test_the_resume_test_fails_without_the_rng_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above is sensitive: a trainer that does not restore the RNG state diverges."""
    monkeypatch.setattr(trainer, "restore_rng", lambda rng: None)
    full, part = _straight_and_resumed(tmp_path)
    a, b = _final_state(full), _final_state(part)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_evaluation_does_not_change_the_training_stream(tmp_path: Path) -> None:
    """An evaluation that draws random numbers (here: dropout left on, and torch's, NumPy's and
    Python's global RNGs, which the training step draws from too) runs on a fork of the RNGs, so
    how often a run evaluates never changes its training."""

    class DrawingEval(NoisyTask):
        def evaluate(self, model: nn.Module) -> dict[str, Any]:
            torch.randn(100)
            np.random.rand(3)  # noqa: NPY002
            random.random()
            return super().evaluate(model)

    a, b = tmp_path / "a", tmp_path / "b"
    trainer.train(NoisyTask(NoisyConfig(run_dir=str(a))))
    trainer.train(DrawingEval(NoisyConfig(run_dir=str(b))))
    assert all(
        torch.equal(x, y) for x, y in zip(_final_state(a).values(), _final_state(b).values())
    )


def _edit_meta(path: Path, edit: Any) -> None:
    from equilibria.zoo import checkpoint_file

    tensors, text = checkpoint_file.read(path)
    meta = json.loads(text)
    edit(meta)
    path.write_bytes(checkpoint_file.encode(tensors, json.dumps(meta)))


@pytest.mark.parametrize(
    ("key", "value"), [("weight_decay", "0.1"), ("eps", "tiny"), ("betas", [0.9, "x"])]
)
def test_optimizer_metadata_that_fails_at_the_first_step_leaves_the_folder_untouched(
    tmp_path: Path, key: str, value: Any
) -> None:
    """It loads into the optimizer but its first step raises: this rewrote summary.json with a
    'failed' record and truncated metrics.jsonl; the README promises an untouched folder."""
    config = NoisyConfig(epochs=2, run_dir=str(tmp_path / "run"))
    with pytest.raises(_Stop):
        trainer.train(NoisyTask(config), on_epoch_end=_stop_at(1))
    run = tmp_path / "run"
    (run / "summary.json").write_text('{"note": "kept"}\n')

    def bad_group(meta: dict[str, Any]) -> None:
        meta["optimizer"]["param_groups"][0][key] = value

    _edit_meta(run / "checkpoint.safetensors", bad_group)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(CheckpointError, match="cannot be restored into the model and optimizer"):
        trainer.train(NoisyTask(dataclasses.replace(config, resume=True)))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_eval_refuses_a_crafted_config_before_building_its_model(tmp_path: Path) -> None:
    """width=200000 asked for a model of 1.4 TB (digits); here 4e10 parameters: refused from
    the meta device's count, before anything is allocated."""
    config = NoisyConfig(epochs=1, run_dir=str(tmp_path / "run"))
    trainer.train(NoisyTask(config))
    path = tmp_path / "run" / "checkpoint.safetensors"
    _edit_meta(path, lambda m: m["config"].__setitem__("width", 200_000))
    with pytest.raises(CheckpointError, match=r"a model of 1,200,001 parameters"):
        evaluate_checkpoint(_Limited, path)
    # within the bound but not the stored tensors' shapes: refused before building for real
    with pytest.raises(CheckpointError, match=r"do not fit the model of its saved config"):
        evaluate_checkpoint(NoisyTask, path)


class _Limited(NoisyTask):
    max_params = 1_000_000


def test_digits_eval_refuses_the_width_that_asked_for_1_4_tb(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from equilibria.zoo.cli import main
    from equilibria.zoo.digits import DigitsConfig, train

    tiny = {"width": 8, "groups": 2, "epochs": 1, "train_subset": 64, "eval_max_iter": 5,
            "quiet": True, "report": False, "measure_memory": False}  # fmt: skip
    train(DigitsConfig(**tiny, run_dir=str(tmp_path / "run")))
    path = tmp_path / "run" / "checkpoint.safetensors"
    _edit_meta(path, lambda m: m["config"].__setitem__("width", 200_000))
    assert main(["eval", str(path)]) == 1
    err = capsys.readouterr().err
    assert "a model of 360,130,400,010 parameters, more than the 50,000,000" in err


def test_a_second_process_in_a_run_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two --resume on one folder both ran (metrics doubled): the folder is locked."""
    config = NoisyConfig(epochs=2, run_dir=str(tmp_path / "run"))
    with pytest.raises(_Stop):
        trainer.train(NoisyTask(config), on_epoch_end=_stop_at(1))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    holder = RunFolder(tmp_path / "run")
    holder.lock()  # another process training there
    try:
        with pytest.raises(ConfigError, match=f"run folder {tmp_path / 'run'} is in use"):
            trainer.train(NoisyTask(dataclasses.replace(config, resume=True)))
        empty = RunFolder(tmp_path / "empty")
        empty.path.mkdir()
        empty.lock()
        with pytest.raises(ConfigError, match="is in use by another process"):
            trainer.train(NoisyTask(dataclasses.replace(config, run_dir=str(empty.path))))
        empty.unlock()
    finally:
        holder.unlock()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    summary = trainer.train(NoisyTask(dataclasses.replace(config, resume=True)))  # lock freed
    assert summary["epochs"] == 2


def test_the_lock_is_held_only_while_training(tmp_path: Path) -> None:
    config = NoisyConfig(epochs=1, run_dir=str(tmp_path / "run"))
    seen = []

    def probe(epoch: int) -> None:
        other = RunFolder(tmp_path / "run")
        with pytest.raises(ConfigError, match="in use"):
            other.lock()
        seen.append(epoch)

    trainer.train(NoisyTask(config), on_epoch_end=probe)
    assert seen == [1]
    RunFolder(tmp_path / "run").lock()  # released after the run


def test_sweep_reuses_finished_cells_and_tabulates_mean_and_std(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    variants = {"narrow": {"width": 4}, "wide": {"width": 16}}
    sweep = SweepConfig(seeds=(0, 1), run_dir=str(tmp_path / "s"))
    overrides = {"epochs": 1}
    with pytest.raises(_Stop):  # interrupted in the third cell

        def after(variant: str, seed: int, config: Any, summary: dict[str, Any]) -> dict:
            if (variant, seed) == ("wide", 0):
                raise _Stop
            return {}

        run_sweep(NoisyTask, sweep, overrides, variants=variants, after_run=after)
    trained = []
    real = trainer.train

    def counting(task: Task, **kwargs: Any) -> dict[str, Any]:
        trained.append((task.config.width, task.config.seed))
        return real(task, **kwargs)

    monkeypatch.setattr(trainer, "train", counting)
    with pytest.raises(ConfigError, match="pass --resume to continue it"):
        run_sweep(NoisyTask, sweep, overrides, variants=variants)
    result = run_sweep(
        NoisyTask, dataclasses.replace(sweep, resume=True), overrides, variants=variants
    )
    assert trained == [(16, 1)]  # the finished cells, ("wide", 0) included, were not rerun
    losses = {(r["variant"], r["seed"]): r["test_loss"] for r in result.runs}
    narrow = [losses["narrow", 0], losses["narrow", 1]]
    row = result.rows[0]
    assert row["variant"] == "narrow" and row["test_loss_mean"] == pytest.approx(np.mean(narrow))
    assert row["test_loss_std"] == pytest.approx(np.std(narrow, ddof=1))
    assert "| narrow |" in (tmp_path / "s" / "sweep.md").read_text()
    # resuming with other options: the finished cells are not taken for the new ones
    (tmp_path / "s" / "sweep.json").unlink()
    with pytest.raises(ConfigError, match=r"lr: saved 0\.05, now 0\.1"):
        run_sweep(NoisyTask, dataclasses.replace(sweep, resume=True), {**overrides, "lr": 0.1},
                  variants=variants)  # fmt: skip
    with pytest.raises(ConfigError, match=r"overrides \['width'\] are set by the compared"):
        run_sweep(NoisyTask, SweepConfig(run_dir=str(tmp_path / "t")), {"width": 3},
                  variants=variants)  # fmt: skip
    with pytest.raises(ConfigError, match=r"unknown variant\(s\) \['huge'\]"):
        run_sweep(NoisyTask, SweepConfig(variants=("huge",), run_dir=str(tmp_path / "t")),
                  variants=variants)  # fmt: skip
    assert not (tmp_path / "t").exists()


def test_sweep_refuses_repeated_seeds_and_variants() -> None:
    """``--seeds 0 0`` ran one cell and tabulated it as the mean ± std (0) of two seeds."""
    with pytest.raises(ConfigError, match="seeds must be distinct, got 0 1 0"):
        SweepConfig(seeds=(0, 1, 0))
    with pytest.raises(ConfigError, match="variants must be distinct, got a b a"):
        SweepConfig(variants=("a", "b", "a"))
    with pytest.raises(ConfigError, match="seeds must be distinct, got 3 3"):
        SweepConfig.parse(NoisyTask, ["--seeds", "3", "3"], prog="equilibria sweep noisy")


def test_sweep_names_the_closest_option_of_a_misspelt_one() -> None:
    """Like ``train``: the sweep's own and the recipe's options are suggested."""
    with pytest.raises(ConfigError, match=r"'--widht' \(did you mean '--width'\?\)"):
        SweepConfig.parse(NoisyTask, ["--widht", "3"], prog="equilibria sweep noisy")
    with pytest.raises(ConfigError, match=r"'--sedes' \(did you mean '--seeds'\?\)"):
        SweepConfig.parse(NoisyTask, ["--sedes", "3"], prog="equilibria sweep noisy")


def test_sweep_refuses_variants_that_share_a_run_folder(tmp_path: Path) -> None:
    """'a b' and 'A-b' both map to runs/a-b-seed0: the second cell found the first's run there
    and failed after it had trained; refused before the folder is created."""
    variants = {"a b": {"width": 4}, "A-b": {"width": 6}}
    with pytest.raises(ConfigError, match=r"variants 'a b' and 'A-b' would share the run folders"):
        run_sweep(NoisyTask, SweepConfig(seeds=(0,), run_dir=str(tmp_path / "s")), {"epochs": 1},
                  variants=variants)  # fmt: skip
    assert not (tmp_path / "s").exists()
