"""Checkpoints: exact round trip, clear errors for damaged and crafted files, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from equilibria.zoo import checkpoint as ckpt_mod
from equilibria.zoo import checkpoint_file as ckpt_file
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


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write a crafted checkpoint: these tensors and metadata, with a valid digest."""
    path.write_bytes(ckpt_file.encode(tensors, json.dumps(meta)))


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
        ({"recipe": "digits"}, "config, epoch, step, optimizer, rng, extra"),
        (
            {"recipe": "digits", "config": {}, "epoch": 1, "step": 2, "rng": {"numpy": []},
             "extra": {}},
            "optimizer, rng.python",
        ),
    ],
)  # fmt: skip
def test_checkpoint_with_missing_keys_is_rejected(
    tmp_path: Path, meta: dict[str, object], missing: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from equilibria.zoo.cli import main

    path = tmp_path / "checkpoint.safetensors"
    _write(path, {"model/w": torch.zeros(2)}, {"format": ckpt_mod.FORMAT, **meta})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: corrupted checkpoint: its metadata lacks {missing}")
    assert "optimizer, rng, extra)" in str(info.value)  # what a checkpoint has
    assert main(["eval", str(path)]) == 1
    assert f"metadata lacks {missing}" in capsys.readouterr().err


def test_checkpoint_whose_metadata_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(ckpt_file.encode({"model/w": torch.zeros(2)}, "[1, 2]"))
    with pytest.raises(CheckpointError, match="its metadata is a list, not an object"):
        load_checkpoint(path)


_VALID_META = {
    "recipe": "digits", "config": {}, "epoch": 1, "step": 2, "optimizer": None,
    "rng": {"numpy": [], "python": []}, "extra": {},
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
    path = tmp_path / "checkpoint.safetensors"
    data = {"model/w": torch.zeros(2), **{f"rng/{k}": torch.zeros(1) for k in tensors}}
    _write(path, data, {"format": ckpt_mod.FORMAT, **_VALID_META, **change})
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
    """A crafted file (its digest recomputed, as anyone can) whose contents pass the type checks
    but cannot be restored gives a CheckpointError at load time (they were a KeyError or
    ValueError traceback in eval and resume), and the CLI reports it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from equilibria.zoo.cli import main

    path = _save(tmp_path / "checkpoint.safetensors", *_trained_pair())
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["equilibria"])
    meta.update(change)
    _write(path, load_file(str(path)), meta)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: corrupted checkpoint: ")
    assert fragment in str(info.value)
    assert main(["eval", str(path)]) == 1
    assert "corrupted checkpoint" in capsys.readouterr().err


# Integrity: the digest covers every byte of the file


def _tiny(path: Path, *, lr: float = 1e-3) -> Path:
    """A small but complete checkpoint: model, Adam state (tensors and hyper-parameters), RNG."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.01)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    return save_checkpoint(
        path, recipe="digits", config={"lr": lr, "width": 8}, epoch=3, step=42, model=model,
        optimizer=optimizer, extra={"note": "x"},
    )  # fmt: skip


def _accepted_flips(path: Path, bits: list[int]) -> list[int]:
    """The bits (file offset * 8 + bit) whose flip alone still loads; each is flipped in place
    and back. Any error other than a CheckpointError propagates."""
    data = path.read_bytes()
    accepted = []
    fd = os.open(path, os.O_RDWR)
    try:
        for bit in bits:
            at, shift = divmod(bit, 8)
            os.pwrite(fd, bytes([data[at] ^ (1 << shift)]), at)
            try:
                load_checkpoint(path)
            except CheckpointError:
                pass
            else:
                accepted.append(bit)
            finally:
                os.pwrite(fd, data[at : at + 1], at)
    finally:
        os.close(fd)
    load_checkpoint(path)  # restored
    return accepted


def test_every_header_byte_and_sampled_data_bits_flipped_are_rejected(tmp_path: Path) -> None:
    """Format /1 hashed the tensors only: 86 of 400 random header bit flips loaded (epoch,
    optimizer hyper-parameters, config changed silently). Now: one random bit of every byte of
    the length and the header (all metadata), all 64 bits of the length, and 400 random bits of
    the tensor data."""
    path = _tiny(tmp_path / "checkpoint.safetensors")
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    bits = [8 * at + rng.randrange(8) for at in range(header_end)] + list(range(64))
    bits += [rng.randrange(8 * header_end, 8 * len(data)) for _ in range(400)]
    assert header_end > 5000 and len(data) - header_end > 5000  # both regions are sampled
    assert _accepted_flips(path, bits) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('\\"epoch\\": 3', '\\"epoch\\": 2'),  # a digit of the epoch
        ('config\\": {\\"lr\\": 1e-05', 'config\\": {\\"lr\\": 1E-05'),  # same number
        ('\\"width\\": 8', '\\"Width\\": 8'),  # a letter of a key
        ('\\"weight_decay\\": 0.01', '\\"weight_decay\\": 0.00'),  # an optimizer setting
    ],
    ids=["epoch", "exponent", "key", "weight-decay"],
)
def test_metadata_flips_that_still_parse_are_rejected(tmp_path: Path, old: str, new: str) -> None:
    """One-bit changes of the JSON metadata that still parse (format /1 loaded each of them)."""
    path = _tiny(tmp_path / "checkpoint.safetensors", lr=1e-5)
    data = path.read_bytes()
    assert data.count(old.encode()) == 1
    changed = data.replace(old.encode(), new.encode())
    diff = [a ^ b for a, b in zip(data, changed) if a != b]
    assert len(diff) == 1 and bin(diff[0]).count("1") == 1  # one bit
    path.write_bytes(changed)
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        load_checkpoint(path)


def test_the_file_is_a_safetensors_file(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _tiny(tmp_path / "checkpoint.safetensors")
    ckpt = load_checkpoint(path)
    tensors = load_file(str(path))
    ours = {f"model/{k}": v for k, v in ckpt.model.items()}
    ours.update({f"rng/{k}": v for k, v in ckpt.rng.items() if isinstance(v, torch.Tensor)})
    assert ckpt.optimizer is not None
    for index, state in ckpt.optimizer["state"].items():
        ours.update({f"optim/{index}/{k}": v for k, v in state.items()})
    assert sorted(tensors) == sorted(ours)
    assert all(torch.equal(tensors[k], ours[k]) for k in tensors)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert set(meta) == {"equilibria", "equilibria.sha256"}
    assert (
        json.loads(meta["equilibria"])["format"]
        == ckpt_mod.FORMAT
        == ("equilibria.zoo.checkpoint/2")
    )


class _Buffers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bf16", torch.randn(3).to(torch.bfloat16))
        self.register_buffer("mask", torch.tensor([[True, False], [False, True]]))
        self.register_buffer("complex", torch.randn(2, dtype=torch.complex64))
        self.register_buffer("scalar", torch.tensor(2.5, dtype=torch.float64))
        self.register_buffer("empty", torch.zeros(0, 3, dtype=torch.int8))
        self.register_buffer("bytes", torch.arange(5, dtype=torch.uint8))
        self.register_buffer("f16", torch.randn(7).half())


def test_every_dtype_and_shape_round_trips_and_safetensors_agrees(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = _Buffers()
    path = save_checkpoint(
        tmp_path / "c.safetensors", recipe="r", config={}, epoch=0, step=0, model=model
    )
    ckpt = load_checkpoint(path)
    theirs = load_file(str(path))
    for name, expected in model.state_dict().items():
        for got in (ckpt.model[name], theirs[f"model/{name}"]):
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got, expected)


def test_save_refuses_metadata_that_would_not_load_back(tmp_path: Path) -> None:
    """NaN and infinities are not JSON (format /1 wrote them as NaN literals); nesting is bounded
    on load, so deeper metadata is refused when written, not when it is read back."""
    model = torch.nn.Linear(2, 1)
    path = tmp_path / "c.safetensors"

    def save(extra: dict[str, Any], module: torch.nn.Module = model) -> Path:
        return save_checkpoint(
            path, recipe="r", config={}, epoch=0, step=0, model=module, extra=extra
        )

    with pytest.raises(ValueError, match=r"entry extra\.metrics\.loss is nan \(JSON has no NaN"):
        save({"metrics": {"loss": float("nan")}})
    with pytest.raises(ValueError, match=r"entry extra\.x\.1 is -inf"):
        save({"x": [1.0, float("-inf")]})
    deep: Any = 0
    for _ in range(62):  # the metadata, extra, "a" and 62 lists: 64 levels
        deep = [deep]
    save({"a": deep})
    assert load_checkpoint(path).extra == {"a": deep}
    path.unlink()
    with pytest.raises(ValueError, match="nests lists and objects more than 64 levels deep"):
        save({"a": [deep]})
    model.register_buffer("c128", torch.zeros(2, dtype=torch.complex128))
    with pytest.raises(ValueError, match=r"tensor 'model/c128' has dtype torch\.complex128"):
        save({})
    assert not path.exists()


def test_format_1_is_refused_with_the_reason(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "checkpoint.safetensors"
    meta = {"format": "equilibria.zoo.checkpoint/1", **_VALID_META, "sha256": "0" * 64}
    save_file({"model/w": torch.zeros(2)}, path, metadata={"equilibria": json.dumps(meta)})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(
        f"{path}: unsupported checkpoint format 'equilibria.zoo.checkpoint/1', expected "
        "'equilibria.zoo.checkpoint/2' (its SHA-256 covers the tensors only"
    )


def test_a_file_that_changes_while_it_is_read_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tensors returned are the bytes that were verified: the second read hashes again."""
    path = _tiny(tmp_path / "checkpoint.safetensors")
    read_data = ckpt_file._read_data

    def change_after_the_check(fh: Any, layout: Any, where: Path, *, keep: bool) -> Any:
        result = read_data(fh, layout, where, keep=keep)
        if not keep:  # another process rewrites a byte in place between the two passes
            with open(where, "r+b") as other:
                other.seek(-1, os.SEEK_END)
                byte = other.read(1)
                other.seek(-1, os.SEEK_END)
                other.write(bytes([byte[0] ^ 1]))
        return result

    monkeypatch.setattr(ckpt_file, "_read_data", change_after_the_check)
    with pytest.raises(CheckpointError, match="corrupted checkpoint: the file changed while"):
        load_checkpoint(path)


def test_unreadable_file_is_a_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _tiny(tmp_path / "checkpoint.safetensors")

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ckpt_file, "open", denied, raising=False)
    with pytest.raises(CheckpointError, match=r"cannot read the checkpoint \(\[Errno 13\]"):
        load_checkpoint(path)


# Crafted files: each a CheckpointError naming the file, before any tensor is built

_DIGEST_ENTRY = '{"__metadata__":{"equilibria.sha256":"' + "0" * 64 + '"'
_DIGEST_AT = 8 + len(_DIGEST_ENTRY) - 65  # where the digest's 64 digits lie in the file
_GOOD_META = json.dumps({"format": ckpt_mod.FORMAT, **_VALID_META})
_W = '"model/w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'


def _seal(header: str | bytes, data: bytes = b"") -> bytes:
    """A file of this header (starting with the digest entry) and data, with a valid digest."""
    raw = header.encode() if isinstance(header, str) else header
    raw += b" " * (-len(raw) % 8)
    out = bytearray(struct.pack("<Q", len(raw)) + raw + data)
    assert out[_DIGEST_AT : _DIGEST_AT + 64] == b"0" * 64
    out[_DIGEST_AT : _DIGEST_AT + 64] = hashlib.sha256(out).hexdigest().encode()
    return bytes(out)


def _crafted(meta: str = _GOOD_META, entries: str = _W, metadata_extra: str = "") -> str:
    return (
        f'{_DIGEST_ENTRY},"equilibria":{json.dumps(meta)}{metadata_extra}}}'
        + ("," + entries if entries else "")
        + "}"
    )


_ZERO8 = bytes(8)
_CRAFTED = {
    "deep-metadata": (_crafted("[" * 100_000 + "]" * 100_000), _ZERO8, "its metadata nests lists"),
    "metadata-65-levels": (_crafted("[" * 65 + "]" * 65), _ZERO8, "more than 64 levels deep"),
    "deep-header": (
        _crafted(entries='"model/w":' + "[" * 100_000 + "]" * 100_000), _ZERO8,
        "its header nests lists and objects more than 64 levels deep",
    ),
    "duplicate-metadata-key": (
        _crafted(_GOOD_META[:-1] + ', "epoch": 9}'), _ZERO8, "duplicate key 'epoch'"
    ),
    "duplicate-tensor": (_crafted(entries=f"{_W},{_W}"), _ZERO8, "duplicate key 'model/w'"),
    "nan-literal": (_crafted(_GOOD_META.replace("{}", '{"lr": NaN}', 1)), _ZERO8, "NaN is not"),
    "infinity": (_crafted(_GOOD_META.replace("{}", '{"lr": -Infinity}', 1)), _ZERO8, "-Infin"),
    "overflowing-number": (
        _crafted(_GOOD_META.replace("{}", '{"lr": 1e999}', 1)), _ZERO8,
        "its metadata entry config.lr is inf",
    ),
    "huge-integer": (
        _crafted(_GOOD_META.replace('"epoch": 1', '"epoch": ' + "9" * 5000)), _ZERO8,
        "its metadata is not valid JSON",
    ),
    "non-utf8": (
        _crafted().encode().replace(b'"recipe', b'"\xffrecipe'), _ZERO8, "header is not UTF-8"
    ),
    "dtype": (_crafted(entries=_W.replace("F32", "F128")), _ZERO8, "has dtype 'F128', not one"),
    "shape-overflow": (
        _crafted(entries=_W.replace("[2]", f"[{2**62},{2**62}]")), _ZERO8,
        f"takes {2**124 * 4} bytes, its data_offsets [0, 8] span 8",
    ),
    "shape-out-of-int64": (
        _crafted(entries=_W.replace("[2]", f"[{2**64}]")), _ZERO8, "sizes in [0, 2**63)"
    ),
    "shape-bool": (_crafted(entries=_W.replace("[2]", "[true,2]")), _ZERO8, "has shape [True"),
    "negative-offset": (
        _crafted(entries=_W.replace("[2]", "[0]").replace("[0,8]", "[-8,-8]")), b"",
        "data_offsets [-8, -8], not two integers 0 <= begin <= end",
    ),
    "overlap": (
        _crafted(entries=_W + "," + _W.replace("model/w", "model/v").replace("0,8", "4,12")),
        bytes(12), "tensor 'model/v' starts at data byte 4, expected 8",
    ),
    "gap": (
        _crafted(entries=_W + "," + _W.replace("model/w", "model/v").replace("0,8", "12,20")),
        bytes(20), "tensor 'model/v' starts at data byte 12, expected 8",
    ),
    "past-the-end": (
        _crafted(entries=_W.replace("[2]", "[4]").replace("0,8", "0,16")), _ZERO8,
        "truncated or corrupted checkpoint (its header places 16 bytes",
    ),
    "trailing-bytes": (_crafted(), bytes(12), "the file has 12 after the header"),
    "bool-byte": (
        _crafted(entries=_W.replace("F32", "BOOL").replace("0,8", "0,2")), b"\x01\x02",
        "bool tensor 'model/w' holds bytes other than 0 and 1",
    ),
    "tensor-name": (_crafted(entries=_W.replace("model/w", "weights")), _ZERO8, "unexpected ten"),
    "entry-keys": (
        _crafted(entries=_W.replace("}", ',"x":1}')), _ZERO8,
        "the entry of tensor 'model/w' must be an object of dtype, shape and data_offsets",
    ),
    "metadata-key": (
        _crafted(metadata_extra=',"more":"x"'), _ZERO8,
        "got the keys ['equilibria', 'equilibria.sha256', 'more']",
    ),
}  # fmt: skip


@pytest.mark.parametrize(("header", "data", "fragment"), _CRAFTED.values(), ids=list(_CRAFTED))
def test_crafted_files_give_a_checkpoint_error_naming_the_file(
    tmp_path: Path, header: str | bytes, data: bytes, fragment: str
) -> None:
    """Each file carries a valid digest, as anyone can compute one: the structure and the JSON
    are checked for themselves. Format /1 raised RecursionError for the deep ones, accepted
    duplicates (the last kept), NaN, a bool byte 2 and unknown tensors."""
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(_seal(header, data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: ")
    assert fragment in str(info.value)


def test_the_crafting_helper_makes_loadable_files(tmp_path: Path) -> None:
    """The crafted files above differ from a loadable one only where they say."""
    path = tmp_path / "checkpoint.safetensors"
    rng_tensors, rng_values = ckpt_mod.capture_rng()
    meta = json.dumps({"format": ckpt_mod.FORMAT, **_VALID_META, "rng": rng_values})
    entries, body = [], b""
    for name, t in [*rng_tensors.items(), ("model/w", torch.arange(2.0))]:
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        dtype = {torch.uint8: "U8", torch.int64: "I64", torch.float32: "F32"}[t.dtype]
        offsets = f"[{len(body)},{len(body) + len(raw)}]"
        entries.append(
            f'"{name}":{{"dtype":"{dtype}","shape":{list(t.shape)},"data_offsets":{offsets}}}'
        )
        body += raw
    path.write_bytes(_seal(_crafted(meta, ",".join(entries)), body))
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.model["w"], torch.arange(2.0)) and ckpt.epoch == 1


def _bytes_read() -> int:
    """Bytes this process has read through read() calls (Linux's rchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts reads with /proc/self/io")
@pytest.mark.parametrize(
    ("header", "size", "fragment"),
    [
        (
            _crafted(entries=_W.replace("[2]", f"[{2**40}]").replace("0,8", f"0,{2**42}")),
            3 << 30,
            "truncated or corrupted checkpoint (its header places 4398046511104 bytes",
        ),
        (None, 256 << 20, "its header length 200000000 exceeds the limit of 100000000"),
    ],
    ids=["tensor-larger-than-the-file", "header-over-the-limit"],
)
def test_a_huge_file_is_refused_from_its_header_without_reading_it(
    tmp_path: Path, header: str | None, size: int, fragment: str
) -> None:
    """Format /1 read a 3 GB file whole before looking at its header. Sparse files: they take
    no disk space."""
    path = tmp_path / "checkpoint.safetensors"
    with open(path, "wb") as f:
        f.write(_seal(header) if header is not None else struct.pack("<Q", 200_000_000))
        f.truncate(size)
    load_checkpoint(_tiny(tmp_path / "warm.safetensors"))  # first-use imports read files too
    before = _bytes_read()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert _bytes_read() - before < 1 << 20
    assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value)


def test_a_large_damaged_file_is_hashed_in_chunks_before_any_tensor_is_built(
    tmp_path: Path,
) -> None:
    """A 256 MB file whose header is consistent but whose digest is wrong: its data is hashed
    chunk by chunk and no tensor is built, so the peak memory of a fresh process grows by far
    less than the file (format /1 held the file and its tensors: over twice its size)."""
    size = 256 << 20
    path = tmp_path / "checkpoint.safetensors"
    header = _crafted(
        entries=f'"model/w":{{"dtype":"U8","shape":[{size}],"data_offsets":[0,{size}]}}'
    )
    sealed = bytearray(_seal(header))
    sealed[_DIGEST_AT : _DIGEST_AT + 64] = b"1" * 64  # a wrong digest
    with open(path, "wb") as f:
        f.write(sealed)
        f.truncate(len(sealed) + size)
    script = (
        "import resource, sys\n"
        "from equilibria.zoo.checkpoint import CheckpointError, load_checkpoint\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    load_checkpoint(sys.argv[1])\n"
        "except CheckpointError as e:\n    print(e, file=sys.stderr)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], cwd=repo, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    assert int(done.stdout) < 64 << 10  # KiB: the peak grew by under 64 MB
    assert "its SHA-256 does not match" in done.stderr


# RNG states that a cast or an ordering would change silently


def _cuda_states(n: int) -> dict[str, torch.Tensor]:
    return {f"cuda{i}": torch.full((16,), i, dtype=torch.uint8) for i in range(n)}


def test_cuda_rng_states_are_restored_in_device_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sorted as strings, cuda10 and cuda11 came before cuda2: on 12 GPUs the states went to
    the wrong devices."""
    rng = load_checkpoint(_tiny(tmp_path / "checkpoint.safetensors")).rng
    restored: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    restore_rng({**rng, **_cuda_states(12)})
    assert [int(s[0]) for s in restored[0]] == list(range(12))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (
            {"rng/numpy": torch.full((624,), 2**32 + 5, dtype=torch.int64)},
            "the NumPy RNG keys must be int64 in [0, 2**32), got torch.int64 from 4294967301",
        ),
        (
            {"rng/numpy": torch.full((624,), 5.5, dtype=torch.float64)},
            "the NumPy RNG keys must be int64 in [0, 2**32), got torch.float64",
        ),
        (
            {f"rng/{k}": v for k, v in _cuda_states(3).items() if k != "cuda1"},
            "the CUDA RNG states must be cuda0, cuda1, ... without gaps, got ['cuda0', 'cuda2']",
        ),
        (
            {"rng/cuda0": torch.zeros(4, dtype=torch.float32)},
            "a CUDA RNG state must be a 1-D uint8 tensor, got torch.float32",
        ),
    ],
    ids=["numpy-key-over-uint32", "numpy-float-keys", "cuda-gap", "cuda-dtype"],
)
def test_rng_tensors_that_would_change_on_restore_are_rejected(
    tmp_path: Path, change: dict[str, torch.Tensor], fragment: str
) -> None:
    """A crafted file (valid digest): format /1 cast the NumPy keys to uint32, wrapping
    2**32 + 5 to 5 and truncating 5.5, and accepted any CUDA state names."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _tiny(tmp_path / "checkpoint.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["equilibria"])
    _write(path, {**load_file(str(path)), **change}, meta)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: corrupted checkpoint: its RNG states cannot be")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"recipe": 1}, TypeError, "save_checkpoint: 'recipe' must be str, got int 1"),
        ({"config": [1]}, TypeError, "save_checkpoint: 'config' must be dict, got list [1]"),
        ({"epoch": True}, TypeError, "save_checkpoint: 'epoch' must be int, got bool True"),
        ({"step": 1.5}, TypeError, "save_checkpoint: 'step' must be int, got float 1.5"),
        ({"epoch": -1}, ValueError, "save_checkpoint: 'epoch' must be >= 0, got -1"),
        ({"extra": [1]}, TypeError, "save_checkpoint: 'extra' must be dict, got list [1]"),
        ({"extra": {1: "a"}}, ValueError, "its entry extra has the key 1, not a str"),
        ({"config": {"lr": float("inf")}}, ValueError, "its entry config.lr is inf"),
        ({"config": {"p": Path("x")}}, TypeError, "must be JSON values (config, extra): Object"),
    ],
)
def test_save_refuses_arguments_that_load_would_refuse(
    tmp_path: Path, arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Format /1 wrote each of these, and load_checkpoint then refused the file (or, for an int
    key, returned it as a string)."""
    path = tmp_path / "checkpoint.safetensors"
    valid: dict[str, Any] = {"recipe": "r", "config": {}, "epoch": 0, "step": 0}
    with pytest.raises(error) as info:
        save_checkpoint(path, **{**valid, **arguments}, model=torch.nn.Linear(2, 1))
    assert message in str(info.value)
    assert not path.exists()


def test_an_empty_tensor_may_share_its_offset_with_the_next_one(tmp_path: Path) -> None:
    """Offsets are checked in (begin, end) order, whatever the header's order: an empty tensor
    listed after the one that starts where it lies is not an overlap (safetensors agrees)."""
    from safetensors.torch import load_file

    path = tmp_path / "checkpoint.safetensors"
    later = _W.replace("model/w", "model/e").replace("[2]", "[0]").replace("0,8", "0,0")
    path.write_bytes(_seal(_crafted(entries=f"{_W},{later}"), bytes(8)))
    assert load_file(str(path))["model/e"].shape == (0,)
    with pytest.raises(CheckpointError, match="lacks the tensors"):  # checked past the offsets
        load_checkpoint(path)


def test_a_file_that_shrinks_before_its_length_is_read_is_a_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The size is taken once (fstat); a file cut below 8 bytes after that was a struct.error."""
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"\x00" * 4)
    real = os.fstat

    def grown(fd: int) -> os.stat_result:
        st = list(real(fd))
        st[6] = 4096  # st_size: as it was before the file was cut
        return os.stat_result(st)

    monkeypatch.setattr(ckpt_file.os, "fstat", grown)
    with pytest.raises(
        CheckpointError, match="truncated checkpoint \\(it shrank while it was read"
    ):
        load_checkpoint(path)
