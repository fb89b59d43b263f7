"""Checkpoints in safetensors: model, optimizer and RNG state, written atomically, checked on load.

A checkpoint holds the tensors ``model/<name>`` (the model's ``state_dict``),
``optim/<param index>/<key>`` (the optimizer's per-parameter state), ``rng/torch``, ``rng/numpy``
(and ``rng/cuda<i>``), and one metadata string ``equilibria`` holding JSON: format version,
recipe, config, progress (epoch, step), the optimizer's non-tensor state (param groups, scalars),
the Python RNG state and whatever the caller adds (``extra``). The file is sealed by a SHA-256 of
all its bytes, metadata included, and read with bounds and checks before any tensor is built (see
:mod:`equilibria.zoo.checkpoint_file`).

No pickle anywhere: loading never executes code from the file. Writing goes to a temporary file in
the same folder, is flushed to disk, then renamed over the old checkpoint (``os.replace`` is atomic
on POSIX), so a crash or a full disk leaves the last good checkpoint in place.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint_file import FORMAT, CheckpointError, encode, json_problem, parse_json, read
from .runs import write_bytes

__all__ = [
    "FORMAT", "Checkpoint", "CheckpointError", "capture_rng", "load_checkpoint", "restore_rng",
    "save_checkpoint",
]  # fmt: skip

# the metadata entries and what each must hold (bool is not accepted as an int)
_TYPES: dict[str, tuple[type, ...]] = {
    "recipe": (str,), "config": (dict,), "epoch": (int,), "step": (int,),
    "optimizer": (dict, type(None)), "rng": (dict,), "extra": (dict,),
}  # fmt: skip
_REQUIRED = tuple(_TYPES)


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: where it was read from.
        recipe: the recipe that wrote it.
        config: the run's config as a dict.
        epoch: completed epochs.
        step: completed optimizer steps.
        model: the model's state dict.
        optimizer: the optimizer's state dict (``None`` if none was saved).
        rng: RNG states as saved (restore with :func:`restore_rng`).
        extra: anything else the writer stored (JSON values).
    """

    path: Path
    recipe: str
    config: dict[str, Any]
    epoch: int
    step: int
    model: dict[str, Tensor]
    optimizer: dict[str, Any] | None
    rng: dict[str, Any]
    extra: dict[str, Any]


def capture_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The torch, numpy and Python RNG states as (tensors, JSON values)."""
    # the legacy global numpy RNG is what user code seeds with np.random.seed: capture it
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]  # noqa: NPY002
    tensors = {
        "rng/torch": torch.get_rng_state(),
        "rng/numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
    }
    version, state, gauss = random.getstate()
    values = {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(state), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    return tensors, values


def _rng_states(
    rng: dict[str, Any],
) -> tuple[Tensor, tuple[Any, ...], tuple[Any, ...], list[Tensor]]:
    """The torch, NumPy, Python and CUDA states of ``Checkpoint.rng`` in the forms their setters
    take; a ValueError for keys a cast would change or CUDA states out of order."""
    kind, pos, has_gauss, cached = rng["numpy_meta"]
    keys = rng["numpy"]
    lo, hi = (keys.min().item(), keys.max().item()) if keys.numel() else (0, 0)
    if keys.dtype != torch.int64 or not 0 <= lo <= hi < 2**32:  # else the uint32 cast wraps
        raise ValueError(
            f"the NumPy RNG keys must be int64 in [0, 2**32), got {keys.dtype} from {lo} to {hi}"
        )
    version, state, gauss = rng["python"]
    # numerically: "cuda10" sorts before "cuda2" as a string
    names = sorted((k for k in rng if k.startswith("cuda")), key=lambda k: int(k[4:]))
    if names != [f"cuda{i}" for i in range(len(names))]:
        raise ValueError(f"the CUDA RNG states must be cuda0, cuda1, ... without gaps, got {names}")
    return (
        rng["torch"], (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached),
        (version, tuple(state), gauss), [rng[k] for k in names],
    )  # fmt: skip


def restore_rng(rng: dict[str, Any]) -> None:
    """Restore the RNG states saved by :func:`capture_rng` (as found in ``Checkpoint.rng``)."""
    torch_state, numpy_state, python_state, cuda = _rng_states(rng)
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_state)  # noqa: NPY002
    random.setstate(python_state)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON-ready remainder."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split("/", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entry in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):  # JSON turned the tuple into a list
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _metadata_text(meta: dict[str, Any]) -> str:
    problem = json_problem(meta)
    if problem is not None:
        raise ValueError(f"checkpoint metadata must be JSON that loads back: its {problem}")
    try:
        return json.dumps(meta, allow_nan=False)
    except TypeError as e:  # e.g. a Path in the config
        raise TypeError(f"checkpoint metadata must be JSON values (config, extra): {e}") from None


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    recipe: str,
    config: dict[str, Any],
    epoch: int,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (:func:`equilibria.zoo.runs.write_bytes`).

    Args:
        path: target file, usually ``<run folder>/checkpoint.safetensors``.
        recipe: the recipe's registry name.
        config: the run's config as a dict (see :func:`equilibria.zoo.config.to_dict`).
        epoch: completed epochs.
        step: completed optimizer steps.
        model: its ``state_dict`` is saved (unwrap DistributedDataParallel first).
        optimizer: its state is saved so training resumes exactly.
        extra: more JSON values to keep (e.g. the latest metrics).

    Returns:
        The path written.

    Raises:
        TypeError: if ``recipe``, ``config``, ``epoch``, ``step`` or ``extra`` has a type
            :func:`load_checkpoint` refuses, or the metadata holds a value that is not JSON.
        ValueError: if ``epoch`` or ``step`` is negative, or the metadata (config, extra, the
            optimizer's settings) holds a NaN, an infinity or a key that is not a str, nests
            more than :data:`~equilibria.zoo.checkpoint_file.MAX_DEPTH` levels or makes a header
            over :data:`~equilibria.zoo.checkpoint_file.MAX_HEADER_BYTES`, or a tensor has a
            dtype safetensors lacks. Nothing is written then: such a file would not load back.
    """
    extra = {} if extra is None else extra
    problem = _entry_problem(
        {"recipe": recipe, "config": config, "epoch": epoch, "step": step, "extra": extra}
    )
    if problem is not None:  # what load_checkpoint would refuse
        raise problem[0](f"save_checkpoint: {problem[1]}")
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim_meta = None
    if optimizer is not None:
        optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update({k: v.detach().cpu().contiguous() for k, v in optim_tensors.items()})
    rng_tensors, rng_values = capture_rng()
    tensors.update(rng_tensors)
    meta = {
        "format": FORMAT,
        "recipe": recipe,
        "config": config,
        "epoch": epoch,
        "step": step,
        "optimizer": optim_meta,
        "rng": rng_values,
        "extra": extra,
    }
    return write_bytes(path, encode(tensors, _metadata_text(meta)))


def _entry_problem(meta: dict[str, Any]) -> tuple[type[Exception], str] | None:
    """The first of ``meta``'s entries (those present) of a wrong type or value, as the error
    type for an argument and the message; the same rules for writing and reading."""
    for key, kinds in _TYPES.items():
        value = meta.get(key)
        if key in meta and (isinstance(value, bool) or not isinstance(value, kinds)):
            allowed = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            got = f"{type(value).__name__} {value!r}"[:200]
            return TypeError, f"{key!r} must be {allowed}, got {got}"
    for key in ("epoch", "step"):
        if key in meta and meta[key] < 0:
            return ValueError, f"{key!r} must be >= 0, got {meta[key]}"
    return None


def _read_metadata(text: str, path: Path) -> dict[str, Any]:
    meta = parse_json(text, path, "metadata")
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{path}: corrupted checkpoint or not written by equilibria (its metadata is a "
            f"{type(meta).__name__}, not an object)"
        )
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: unsupported checkpoint format {str(meta.get('format'))[:100]!r}, expected "
            f"{FORMAT!r}"
        )
    missing = [k for k in _REQUIRED if k not in meta]
    if "rng" in meta:
        rng = meta["rng"] if isinstance(meta["rng"], dict) else {}
        missing += [f"rng.{k}" for k in ("numpy", "python") if k not in rng]
    if missing:
        raise CheckpointError(
            f"{path}: corrupted checkpoint: its metadata lacks {', '.join(missing)} (a checkpoint "
            f"of format {FORMAT!r} has {', '.join(_REQUIRED)})"
        )
    problem = _entry_problem(meta)
    if problem is not None:
        raise CheckpointError(f"{path}: corrupted checkpoint: its metadata {problem[1]}")
    return meta


def _check_rng(rng: dict[str, Any], path: Path) -> None:
    """Restore the saved RNG states into throwaway generators: a malformed state fails here,
    with a CheckpointError, instead of in :func:`restore_rng` halfway through a resume."""
    try:
        torch_state, numpy_state, python_state, cuda = _rng_states(rng)
        for state in cuda:  # what torch.cuda.set_rng_state takes, checked without a GPU
            if state.dtype != torch.uint8 or state.dim() != 1:
                raise TypeError(f"a CUDA RNG state must be a 1-D uint8 tensor, got {state.dtype}")
        torch.Generator().set_state(torch_state)
        np.random.RandomState().set_state(numpy_state)
        random.Random().setstate(python_state)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:  # huge ints: Overflow
        raise CheckpointError(
            f"{path}: corrupted checkpoint: its RNG states cannot be restored "
            f"({type(e).__name__}: {e})"[:300]
        ) from None


def load_checkpoint(path: str | os.PathLike[str], *, recipe: str | None = None) -> Checkpoint:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the ``.safetensors`` file, or a run folder containing ``checkpoint.safetensors``.
        recipe: if given, the recipe the checkpoint must come from.

    Raises:
        CheckpointError: if the file is missing, unreadable, truncated, corrupted (any changed
            byte: the digest covers the whole file), malformed (see
            :mod:`equilibria.zoo.checkpoint_file`), of another format or of another recipe. Its
            message starts with the file's path.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.safetensors"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    tensors, metadata = read(path)
    meta = _read_metadata(metadata, path)
    if recipe is not None and meta["recipe"] != recipe:
        raise CheckpointError(
            f"{path}: checkpoint of recipe {meta['recipe']!r}, expected {recipe!r}"
        )
    model = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    optimizer = None
    if meta["optimizer"] is not None:
        optim = {k: v for k, v in tensors.items() if k.startswith("optim/")}
        try:
            optimizer = _unflatten_optimizer(optim, meta["optimizer"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(
                f"{path}: corrupted checkpoint: its optimizer state is malformed "
                f"({type(e).__name__}: {e})"[:300]
            ) from None
    rng: dict[str, Any] = {k[len("rng/") :]: v for k, v in tensors.items() if k.startswith("rng/")}
    lacking = [f"rng/{k}" for k in ("torch", "numpy") if k not in rng]
    if lacking:
        raise CheckpointError(f"{path}: corrupted checkpoint: it lacks the tensors {lacking}")
    rng["numpy_meta"] = meta["rng"]["numpy"]
    rng["python"] = meta["rng"]["python"]
    _check_rng(rng, path)
    return Checkpoint(
        path=path,
        recipe=meta["recipe"],
        config=meta["config"],
        epoch=int(meta["epoch"]),
        step=int(meta["step"]),
        model=model,
        optimizer=optimizer,
        rng=rng,
        extra=meta["extra"],
    )
