"""Checkpoints: exact round trip, clear errors for damaged files, atomic writes."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from equilibria.zoo import checkpoint as ckpt_mod
from equilibria.zoo.checkpoint import CheckpointError, load_checkpoint, restore_rng, save_checkpoint
from equilibria.zoo.config import to_dict
from equilibria.zoo.digits import DigitsConfig, batch_loss, build_model, load_data, make_optimizer

CONFIG = DigitsConfig(width=8, groups=2)


def _trained_pair() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model(CONFIG)
    optimizer = make_optimizer(model, CONFIG)
    x, y, _, _ = load_data()
    for i in range(2):
        optimizer.zero_grad()
        loss, _ = batch_loss(model, x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16], CONFIG)
        loss.backward()
        optimizer.step()
    return model, optimizer


def _save(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    return save_checkpoint(
        path, recipe="digits", config=to_dict(CONFIG), epoch=3, step=42, model=model,
        optimizer=optimizer, extra={"note": "x"},
    )  # fmt: skip


def test_round_trip_restores_model_optimizer_and_rng(tmp_path: Path) -> None:
    model, optimizer = _trained_pair()
    torch.manual_seed(123)
    np.random.seed(7)  # noqa: NPY002 (the legacy global RNG is what is checkpointed)
    random.seed(5)
    path = _save(tmp_path / "checkpoint.safetensors", model, optimizer)
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002

    ckpt = load_checkpoint(tmp_path)  # a run folder works too
    assert (ckpt.recipe, ckpt.epoch, ckpt.step, ckpt.extra) == ("digits", 3, 42, {"note": "x"})
    assert ckpt.config == to_dict(CONFIG) and ckpt.path == path
    restored = build_model(CONFIG)
    restored.load_state_dict(ckpt.model)
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = make_optimizer(restored, CONFIG)
    assert ckpt.optimizer is not None
    opt2.load_state_dict(ckpt.optimizer)
    s1, s2 = optimizer.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for key, value in s1["state"][i].items():
            assert torch.equal(value, s2["state"][i][key])
    restore_rng(ckpt.rng)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])  # noqa: NPY002
    assert random.random() == expected[2]


def _corrupt(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "tiny":
        return data[:5]
    if how == "empty":
        return b""
    if how == "flipped":  # one byte of tensor data: only the digest notices
        buf = bytearray(data)
        buf[-100] ^= 0xFF
        return bytes(buf)
    if how == "header":
        buf = bytearray(data)
        buf[8:20] = b"\x00" * 12
        return bytes(buf)
    return b"not a safetensors file at all, just text"


@pytest.mark.parametrize("how", ["truncated", "tiny", "empty", "flipped", "header", "garbage"])
def test_damaged_checkpoint_gives_clear_error(tmp_path: Path, how: str) -> None:
    model, optimizer = _trained_pair()
    path = _save(tmp_path / "checkpoint.safetensors", model, optimizer)
    path.write_bytes(_corrupt(path.read_bytes(), how))
    with pytest.raises(CheckpointError, match=r"checkpoint\.safetensors.*(truncated|corrupted)"):
        load_checkpoint(path)


def test_missing_checkpoint_and_wrong_recipe(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.safetensors")
    model, optimizer = _trained_pair()
    path = _save(tmp_path / "c.safetensors", model, optimizer)
    with pytest.raises(CheckpointError, match="recipe 'digits', expected 'mosaic'"):
        load_checkpoint(path, recipe="mosaic")


def test_foreign_safetensors_file_is_rejected(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not written by equilibria"):
        load_checkpoint(path)


def test_failed_write_keeps_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = _trained_pair()
    path = _save(tmp_path / "checkpoint.safetensors", model, optimizer)
    good = path.read_bytes()

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.os, "fsync", fail)  # dies after part of the bytes went out
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        _save(path, model, optimizer)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]  # no temp
    load_checkpoint(path)


@pytest.mark.parametrize(
    ("meta", "missing"),
    [
        ({"recipe": "digits"}, "config, epoch, step, optimizer, rng, sha256"),
        (
            {"recipe": "digits", "config": {}, "epoch": 1, "step": 2, "rng": {"numpy": []},
             "sha256": ""},
            "optimizer, rng.python",
        ),
    ],
)  # fmt: skip
def test_checkpoint_with_missing_keys_is_rejected(
    tmp_path: Path, meta: dict[str, object], missing: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from safetensors.torch import save_file

    from equilibria.zoo.cli import main

    path = tmp_path / "checkpoint.safetensors"
    header = json.dumps({"format": ckpt_mod.FORMAT, **meta})
    save_file({"model/w": torch.zeros(2)}, path, metadata={"equilibria": header})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: corrupted checkpoint: its metadata lacks {missing}")
    assert "optimizer, rng, sha256)" in str(info.value)  # what a checkpoint has
    assert main(["eval", str(path)]) == 1
    assert f"metadata lacks {missing}" in capsys.readouterr().err


def test_checkpoint_whose_metadata_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "checkpoint.safetensors"
    save_file({"model/w": torch.zeros(2)}, path, metadata={"equilibria": "[1, 2]"})
    with pytest.raises(CheckpointError, match="its metadata is a list, not an object"):
        load_checkpoint(path)


_VALID_META = {
    "recipe": "digits", "config": {}, "epoch": 1, "step": 2, "optimizer": None,
    "rng": {"numpy": [], "python": []},
}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "tensors", "fragment"),
    [
        ({"epoch": "one"}, ("torch", "numpy"), "its metadata 'epoch' must be int, got str 'one'"),
        ({"epoch": True}, ("torch", "numpy"), "its metadata 'epoch' must be int, got bool"),
        ({"config": [1]}, ("torch", "numpy"), "its metadata 'config' must be dict, got list"),
        ({"optimizer": "x"}, ("torch", "numpy"), "'optimizer' must be dict or null, got str"),
        ({}, ("numpy",), "it lacks the tensors ['rng/torch']"),
    ],
)
def test_checkpoint_with_wrong_metadata_types_is_rejected(
    tmp_path: Path, change: dict[str, object], tensors: tuple[str, ...], fragment: str
) -> None:
    import json

    from safetensors.torch import save_file

    path = tmp_path / "checkpoint.safetensors"
    data = {"model/w": torch.zeros(2), **{f"rng/{k}": torch.zeros(1) for k in tensors}}
    meta = {**_VALID_META, **change, "sha256": ckpt_mod._digest(data)}
    header = json.dumps({"format": ckpt_mod.FORMAT, **meta})
    save_file(data, path, metadata={"equilibria": header})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: corrupted checkpoint: ")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"optimizer": {}}, "its optimizer state is malformed (KeyError: 'scalars')"),
        ({"optimizer": {"param_groups": [1], "scalars": {}}}, "optimizer state is malformed"),
        ({"rng": {"numpy": "x", "python": 5}}, "its RNG states cannot be restored (ValueError"),
        ({"rng": {"numpy": ["MT19937", 0, 0, 0.0], "python": 5}}, "RNG states cannot be restored"),
        ({"epoch": -3}, "its metadata 'epoch' must be >= 0, got -3"),
        ({"extra": [1]}, "its metadata 'extra' must be dict, got list [1]"),
    ],
)
def test_checkpoint_with_malformed_metadata_contents_is_rejected(
    tmp_path: Path, change: dict[str, object], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Metadata is not covered by the tensors' SHA-256: contents that pass the type checks but
    cannot be restored give a CheckpointError at load time (they were a KeyError or ValueError
    traceback in eval and resume), and the CLI reports it."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from equilibria.zoo.cli import main

    path = _save(tmp_path / "checkpoint.safetensors", *_trained_pair())
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["equilibria"])
    meta.update(change)
    save_file(load_file(str(path)), path, metadata={"equilibria": json.dumps(meta)})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: corrupted checkpoint: ")
    assert fragment in str(info.value)
    assert main(["eval", str(path)]) == 1
    assert "corrupted checkpoint" in capsys.readouterr().err
