"""The one training loop of the recipes: a :class:`~equilibria.zoo.task.Task` in, a run folder out.

:func:`train` owns what every recipe needs: seeds and RNG state, CPU threads, data-parallel
training under ``torchrun`` (:mod:`equilibria.zoo.distributed`), the learning-rate schedule,
timing, peak memory, ``metrics.jsonl``, atomic safetensors checkpoints after every epoch with
bitwise resume (model, optimizer, torch/numpy/Python RNG and the task's data-stream state), the
summary, ``report.md`` and progress bars. :func:`load_model` and :func:`evaluate_checkpoint`
rebuild a saved model for ``equilibria eval``, bounding what a saved config may build.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import distributed
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, restore_rng, save_checkpoint
from .config import ConfigError, differences, to_dict
from .distributed import DistInfo
from .evaluation import check_fits, evaluate_model, seed_all
from .memory import PeakMemory
from .runs import (
    SUMMARY,
    MissingExtraError,
    ReportFailedError,
    RunFolder,
    RunFolderError,
    default_run_dir,
    num_threads,
    require_extras,
    write_json,
)
from .task import Schedule, Task

_PASS = (ConfigError, MissingExtraError, ReportFailedError, CheckpointError, RunFolderError)


def train(task: Task, *, on_epoch_end: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train ``task``'s model; write its run folder (rank 0) and return the summary.

    Under ``torchrun`` (``WORLD_SIZE > 1``, tasks with ``distributed = True``) it trains with
    DistributedDataParallel on the same global batches as a single process.

    Args:
        task: the recipe with its config.
        on_epoch_end: called with the epoch number after each epoch's checkpoint is written
            (tests use it to interrupt a run).

    Returns:
        The summary also written to ``summary.json``.

    Raises:
        ConfigError: invalid options, a run folder that holds a run (without ``resume``), is
            locked by another process or cannot be written, or a resume whose options differ.
        MissingExtraError: an optional dependency is missing (checked before anything is written).
        CheckpointError: ``resume`` from a damaged checkpoint, or one whose state cannot be
            restored and stepped; the folder is left as it is.
        RunFailedError: training stopped with another error after the run folder was set up;
            ``summary.json`` records it and ``resume`` continues from the last checkpoint.
            Interruptions (KeyboardInterrupt) pass through unrecorded.
        ReportFailedError: training finished and ``summary.json`` holds its results, but writing
            ``report.md`` failed (``equilibria report`` writes it again).
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a Task, got {type(task).__name__}")
    with num_threads(task.config.threads):
        info = distributed.setup(getattr(task.config, "device", "cpu"))
        try:
            return _train(task, info, on_epoch_end)
        finally:
            distributed.teardown(info)


def _train(task: Task, info: DistInfo, on_epoch_end: Callable[[int], None] | None) -> dict:
    wall_start = time.perf_counter()
    config = task.config
    if info.distributed and not task.distributed:
        raise ConfigError(
            f"recipe {task.name!r} has no distributed training, got WORLD_SIZE="
            f"{info.world_size}; run it as a single process"
        )
    task.check(info)
    require_extras(*task.extras, *(("matplotlib",) if config.report else ()))
    run = RunFolder(config.run_dir or (default_run_dir(task.name) if info.is_main else "."))
    task.config = config = dataclasses.replace(config, run_dir=str(run.path))
    saved_config = to_dict(config)
    ckpt = None
    try:
        error = None
        if info.is_main:  # only rank 0 writes the folder; every rank fails with its error
            try:
                if not config.resume:
                    run.start(task.name, saved_config)
                elif run.path.is_dir():
                    run.lock()  # before anything is read: a second --resume fails here
                    run.read_metrics()  # damaged: an error here, not after the others went on
            except (ConfigError, RunFolderError) as e:
                error = e
        distributed.raise_from_main(error, info)
        if config.resume:
            run.check_resume(task.name, saved_config, type(config), task.record_defaults)
            if run.checkpoint.exists():  # else: stopped before its first checkpoint, start over
                ckpt = load_checkpoint(run.checkpoint, recipe=task.name)
                diff = differences(ckpt.config, saved_config, type(config), task.record_defaults)
                if diff:
                    raise CheckpointError(
                        f"{ckpt.path}: checkpoint of another configuration: {diff}"
                    )
                _check_same_setting(ckpt, info)
                _check_restorable(task, ckpt)
        distributed.barrier(info)
        try:
            return _fit(task, saved_config, ckpt, run, info, on_epoch_end, wall_start)
        except _PASS:
            raise
        except Exception as e:  # recorded in the folder (rank 0), so a rerun there says so
            raise run.fail(e, record=info.is_main) from e
    finally:
        run.unlock()


def _check_same_setting(ckpt: Checkpoint, info: DistInfo) -> None:
    """Refuse a resume whose process count or CPU thread count differs from the saved run's:
    either changes the numbers (another split of each batch, other reductions), so the result
    would not be the uninterrupted run's. Checkpoints that predate the record pass."""
    saved = ckpt.extra.get("metrics", {})
    saved = saved if isinstance(saved, dict) else {}
    now = {"world_size": info.world_size}
    if info.device.type == "cpu":
        now["threads"] = torch.get_num_threads()
    hints = {
        "world_size": "run it under torchrun with --nproc-per-node {saved}",
        "threads": "pass --threads {saved}",
    }
    for key, value in now.items():
        was = saved.get(key)
        if isinstance(was, int) and was != value:
            raise ConfigError(
                f"--resume: the run in {ckpt.path.parent} was trained with {key}={was}, this "
                f"process has {value}; that changes the numbers, so the resumed run would not "
                f"match an uninterrupted one: {hints[key].format(saved=was)}"
            )


def _check_restorable(task: Task, ckpt: Checkpoint) -> None:
    """Load the checkpoint into a throwaway model and optimizer and take one optimizer step
    there, before the folder is touched: optimizer metadata that loads but fails at its first
    step (e.g. a hyper-parameter of the wrong type) is a checkpoint error, not a training
    failure recorded over the run's summary."""
    check_fits(task, ckpt.model, ckpt.path)
    model = task.build_model()
    optimizer = task.make_optimizer(model)
    try:
        model.load_state_dict(ckpt.model)
        if ckpt.optimizer is None:
            raise ValueError("the checkpoint holds no optimizer state")
        # a deep copy: load_state_dict may keep the given tensors, which the dry step changes
        optimizer.load_state_dict(copy.deepcopy(ckpt.optimizer))
        lr = task.schedule().lr(ckpt.step, task.config.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        task.load_state_dict(ckpt.extra.get("task", {}))
    except Exception as e:
        raise CheckpointError(
            f"{ckpt.path}: its state cannot be restored into the model and optimizer of its "
            f"configuration ({type(e).__name__}: {e}); resume from an intact checkpoint or "
            "start a new run"[:600]
        ) from e


def _fit(
    task: Task,
    saved_config: dict[str, Any],
    ckpt: Checkpoint | None,
    run: RunFolder,
    info: DistInfo,
    on_epoch_end: Callable[[int], None] | None,
    wall_start: float,
) -> dict:
    """Training and evaluation of :func:`train` once the run folder is set up."""
    config = task.config
    seed_all(config.seed)
    model = task.build_model().to(info.device)
    optimizer = task.make_optimizer(model)
    task.setup(info.device)
    epoch, step = 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.optimizer)  # type: ignore[arg-type]
        restore_rng(ckpt.rng)
        task.load_state_dict(ckpt.extra.get("task", {}))
        epoch, step = ckpt.epoch, ckpt.step
    if config.resume and info.is_main:
        run.remove_temporaries()
        run.truncate_metrics(epoch)
    net: nn.Module = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    sched = task.schedule()
    show = info.is_main and not config.quiet
    last: dict[str, Any] = {}
    with _progress(sched.total, step, show, task.name) as bar:
        while epoch < sched.epochs:
            epoch += 1
            tic = time.perf_counter()
            row = _epoch(task, net, model, optimizer, info, epoch, step, sched, bar)
            step = row["step"]
            row["epoch_time_s"] = time.perf_counter() - tic
            row.update(evaluate_model(task, model, info))
            row["time_s"] = time.perf_counter() - tic
            last = row
            if info.is_main:
                run.append_metrics(row)
                extra = {"metrics": _scalars(row), "task": task.state_dict()}
                save_checkpoint(run.checkpoint, recipe=task.name, config=saved_config,
                                epoch=epoch, step=step, model=model, optimizer=optimizer,
                                extra=extra)  # fmt: skip
                if show:
                    bar.write(_epoch_line(task, row, sched.epochs))
            distributed.barrier(info)
            if on_epoch_end is not None:
                on_epoch_end(epoch)
    if not last:  # resumed a finished run: its last epoch's statistics, evaluated once more
        rows = run.read_metrics() if info.is_main else []
        last = {**(rows[-1] if rows else {}), "epoch": epoch, "step": step}
        last.update(evaluate_model(task, model, info))
    summary = _summary(task, run, info, model, last, time.perf_counter() - wall_start)
    if info.is_main:
        write_json(run.path / SUMMARY, summary)
        if config.report:
            from .report import write_report

            try:
                summary["report"] = str(write_report(run.path))
            except Exception as e:  # the run is done and summarised: do not record it as failed
                raise ReportFailedError(
                    f"training finished and {run.path / SUMMARY} holds its results, but writing "
                    f"the report failed ({type(e).__name__}: {e}); rerun it with "
                    f"`equilibria report {run.path}`"
                ) from e
            write_json(run.path / SUMMARY, summary)
    return summary


def _progress(total: int, initial: int, show: bool, desc: str) -> Any:
    """A tqdm bar when tqdm is installed and shown, else a silent stand-in."""
    if show:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, initial=initial, desc=desc, unit="step",
                        dynamic_ncols=True, leave=False)  # fmt: skip
        except ImportError:
            pass
    return _NoBar()


class _NoBar:
    """What the loop calls on a tqdm bar, doing nothing (``write`` prints)."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, flush=True)


def _epoch(
    task: Task,
    net: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    info: DistInfo,
    epoch: int,
    step: int,
    sched: Schedule,
    bar: Any,
) -> dict[str, Any]:
    """One epoch of training steps; returns its metrics row (without evaluation)."""
    config = task.config
    net.train()
    sums: dict[str, float] = {}
    values: dict[str, list[Any]] = {}
    step_ms: list[float] = []
    peak, mem_method, lr, k = None, None, config.lr, -1
    for k, batch in enumerate(task.batches(epoch, info)):
        lr = sched.lr(step + k, config.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        measure = config.measure_memory and k == 0
        optimizer.zero_grad(set_to_none=True)
        tic = time.perf_counter()
        with PeakMemory(info.device, enabled=measure) as mem:
            out = task.train_step(net, model, batch)
            out.loss.backward()
        optimizer.step()
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        if measure:
            peak, mem_method = mem.peak_bytes, mem.method
        else:  # the memory tracker slows its step down: keep it out of the timings
            step_ms.append(1e3 * (time.perf_counter() - tic))
        loss_value = float(out.loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"non-finite training loss at epoch {epoch}, step {k}")
        step_sums, step_values = task.step_metrics(model, batch, out)
        for key, v in step_sums.items():
            sums[key] = sums.get(key, 0.0) + v
        for key, v in step_values.items():
            values.setdefault(key, []).append(v)
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{loss_value:.3f}", refresh=False)
    totals = distributed.all_sum(list(sums.values()), info)
    return {
        "epoch": epoch,
        "step": step + k + 1,
        "lr": lr,
        **task.epoch_metrics(dict(zip(sums, totals)), values),
        "step_ms": statistics.median(step_ms) if step_ms else None,
        "peak_mem_mb": None if peak is None else peak / 2**20,
        "mem_method": mem_method,
        "world_size": info.world_size,
        "threads": torch.get_num_threads(),
    }


def _scalars(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not isinstance(v, (list, dict))}


def _epoch_line(task: Task, row: dict[str, Any], epochs: int) -> str:
    cols = " | ".join(f"{m.label} {m.show(row.get(m.key))}" for m in task.epoch_columns[:6])
    mem = "" if row["peak_mem_mb"] is None else f" | mem {row['peak_mem_mb']:.1f} MB"
    return f"epoch {row['epoch']:>3}/{epochs} | {cols} | {row['epoch_time_s']:.1f}s{mem}"


def _summary(
    task: Task,
    run: RunFolder,
    info: DistInfo,
    model: nn.Module,
    last: dict[str, Any],
    wall_s: float,
) -> dict[str, Any]:
    rows = run.read_metrics() if info.is_main else [last]
    peaks = [r["peak_mem_mb"] for r in rows if r.get("peak_mem_mb") is not None]
    head = task.headline
    return {
        "recipe": task.name,
        "run_dir": str(run.path),
        "checkpoint": str(run.checkpoint),
        "headline": {
            "key": head.key,
            "label": head.label,
            "value": last.get(head.key),
            "higher_is_better": head.higher_is_better,
        },
        **_scalars(last),
        "epochs": last.get("epoch"),
        "train_time_s": sum(r.get("epoch_time_s", 0.0) for r in rows),
        "wall_time_s": wall_s,
        "peak_mem_mb": max(peaks) if peaks else None,
        "params": sum(p.numel() for p in model.parameters()),
        "world_size": info.world_size,
        "device": str(info.device),
        "threads": torch.get_num_threads(),
        **task.summary(last),
        "config": to_dict(task.config),
    }
