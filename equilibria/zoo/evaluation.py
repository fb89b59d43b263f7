"""Rebuilding saved models: ``equilibria eval`` and the checks a resume runs before training.

A checkpoint's config is data from a file: :func:`check_fits` builds its model on the meta device
first (no memory) and refuses one larger than the recipe's ``max_params`` or one that does not
match the stored tensors, so a crafted config cannot make the process allocate beyond the file.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .config import ConfigError, from_dict, to_dict
from .distributed import DistInfo
from .runs import num_threads
from .task import Task


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's global and torch's RNGs (what a run starts from)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds the global RNG that user code may use)
    torch.manual_seed(seed)


def check_fits(task: Task, state: dict[str, torch.Tensor], path: Path) -> None:
    """Build the model on the meta device (no memory) and refuse it before it is built for
    real if it has more than ``task.max_params`` parameters or does not match the stored
    tensors' names and shapes, so a crafted config cannot allocate beyond the file's tensors."""
    with torch.device("meta"):
        meta = task.build_model()
    count = sum(p.numel() for p in meta.parameters())
    if count > task.max_params:
        raise CheckpointError(
            f"{path}: its config asks for a model of {count:,} parameters, more than the "
            f"{task.max_params:,} recipe {task.name!r} builds; not building it"
        )
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in state.items()}
    if expected != stored:
        diff = sorted(
            k for k in expected.keys() | stored.keys() if expected.get(k) != stored.get(k)
        )
        raise CheckpointError(
            f"{path}: its tensors do not fit the model of its saved config (differing: "
            f"{', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''})"
        )


def evaluate_model(task: Task, model: nn.Module, info: DistInfo | None = None) -> dict[str, Any]:
    """``task.evaluate`` in eval mode, without gradients, on a fork of the torch, NumPy and
    Python global RNGs: evaluating never changes the training stream, so how often a run
    evaluates does not change its numbers."""
    devices = [info.device] if info is not None and info.device.type == "cuda" else []
    was_training = model.training
    model.eval()
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            return task.evaluate(model)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
        model.train(was_training)


def load_model(
    task_cls: type[Task], checkpoint: str | Path | Checkpoint, **overrides: Any
) -> tuple[nn.Module, Task]:
    """Rebuild the model of a checkpoint from its saved config and load its weights.

    Args:
        task_cls: the recipe's task class.
        checkpoint: ``checkpoint.safetensors``, its run folder, or a loaded checkpoint.
        overrides: config fields to change (e.g. ``eval_max_iter=100``).

    Returns:
        The model (CPU, eval mode not set) and the task holding the effective config.

    An option missing from the saved config (one the recipe gained after the run was saved) is
    taken from ``task_cls.record_defaults`` (a dict: the value such runs were trained with) if
    the task class declares it, else from the config class's default.

    Raises:
        CheckpointError: a damaged file, an invalid saved config, a model larger than
            ``task_cls.max_params``, or tensors that do not fit the config's model (checked on the
            meta device before anything is built).
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(
        checkpoint, recipe=task_cls.name
    )  # fmt: skip
    cls = task_cls.config_class
    # an option the saved config lacks (added to the recipe after the run) takes the value it
    # was trained with, ``task_cls.record_defaults``, not today's default
    record_defaults = dict(task_cls.record_defaults)
    # the saved config: checked on its own first, so a damaged one is a checkpoint error and a
    # bad override a config error
    try:
        saved = from_dict(cls, {**record_defaults, **ckpt.config, "resume": False})
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{ckpt.path}: its saved config is not valid ({e})"[:600]) from None
    task = task_cls(from_dict(cls, {**to_dict(saved), **overrides}) if overrides else saved)
    check_fits(task, ckpt.model, ckpt.path)
    seed_all(task.config.seed)
    model = task.build_model()
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        raise CheckpointError(
            f"{ckpt.path}: its tensors do not fit the model of its saved config ({e})"[:400]
        ) from None
    return model, task


def evaluate_checkpoint(
    task_cls: type[Task], checkpoint: str | Path | Checkpoint, **overrides: Any
) -> dict[str, Any]:
    """The task's held-out metrics of a saved model (``equilibria eval``).

    Args:
        task_cls: the recipe's task class.
        checkpoint: ``checkpoint.safetensors``, its run folder, or a loaded checkpoint.
        overrides: fields of ``task_cls.eval_options`` to change.
    """
    bad = sorted(set(overrides) - set(task_cls.eval_options))
    if bad:
        raise ConfigError(
            f"eval of recipe {task_cls.name!r} cannot override {bad}; allowed: "
            f"{list(task_cls.eval_options)}"
        )
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(checkpoint, recipe=task_cls.name)
    model, task = load_model(task_cls, checkpoint, **overrides)
    with num_threads(task.config.threads):
        task.setup(torch.device("cpu"))
        tic = time.perf_counter()
        result = evaluate_model(task, model)
        result["eval_time_s"] = time.perf_counter() - tic
    result.update(checkpoint=str(checkpoint.path), recipe=task.name)
    result.update({k: getattr(task.config, k) for k in task.eval_options})
    result.update(task.summary(result))
    return result
