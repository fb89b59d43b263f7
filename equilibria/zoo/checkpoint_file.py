"""The checkpoint file: a safetensors file sealed by a SHA-256 of all its bytes, read with checks.

Layout (a valid safetensors file, readable by that library):

* the 8-byte little-endian header length, then the JSON header, whose first entry is
  ``__metadata__`` with, in this order, ``equilibria.sha256`` (the file's digest, 64 lowercase hex
  digits) and ``equilibria`` (the checkpoint's metadata as a JSON string, see
  :mod:`equilibria.zoo.checkpoint`); then one entry per tensor (``model/<name>``,
  ``optim/<param index>/<key>``, ``rng/torch``, ``rng/numpy``, ``rng/cuda<i>``), padded with
  spaces to a multiple of 8 bytes as safetensors pads;
* the tensors' bytes, back to back in the order of their offsets, up to the end of the file.

Integrity: the digest is the SHA-256 of the whole file with its own 64 digits written as ``0``, so
every byte of the length, the header (all metadata) and the data is covered and any flipped bit is
a :class:`CheckpointError` (the digits themselves are compared). Reading takes the length and the
header first (at most :data:`MAX_HEADER_BYTES`, the safetensors format's own limit), parses it as
strict JSON (UTF-8, no duplicate keys, no NaN or infinities, at most :data:`MAX_DEPTH` levels of
nesting) and checks every tensor's name, dtype, shape and offsets against the file's size before it
reads any tensor data; then it hashes the data in chunks, and only a file whose digest matches is
read into tensors (hashed once more on the way, so what is returned is what was verified). Format
``/1``, whose digest covered the tensors only, is refused with an explanation. Nothing is
unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

FORMAT = "equilibria.zoo.checkpoint/2"
"""The version in every checkpoint's metadata (``/1``: a digest of the tensors only)."""
MAX_HEADER_BYTES = 100_000_000
"""The largest header accepted, in bytes (the safetensors format's own limit)."""
MAX_DEPTH = 64
"""The deepest nesting of lists and objects accepted in the header and in the metadata."""
_META_KEY = "equilibria"
_DIGEST_KEY = "equilibria.sha256"
# the header's first bytes: the digest's 64 hex digits follow, then '"'
_PREFIX = b'{"__metadata__":{"' + _DIGEST_KEY.encode() + b'":"'
_ZEROS = b"0" * 64
_CHUNK = 1 << 20  # bytes hashed at a time
# safetensors dtype names (their byte size is the torch dtype's itemsize)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "C64": torch.complex64,
}  # fmt: skip
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_TENSOR_NAME = re.compile(r"model/.+|optim/[0-9]+/.+|rng/(torch|numpy|cuda[0-9]+)", re.DOTALL)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted, or does not match the run."""


def json_problem(value: Any) -> str | None:
    """Why ``value`` cannot be checkpoint metadata (nested over :data:`MAX_DEPTH` levels, holding
    a NaN or an infinity, or a key JSON would turn into a string, with where), else None.
    Iterative: deep values cannot overflow the stack."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        v, depth, where = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return (
                f"entry {where[1:] or '(the whole value)'} is {v} (JSON has no NaN or infinities)"
            )
        if isinstance(v, (dict, list, tuple)):
            if depth == MAX_DEPTH:
                return f"nests lists and objects more than {MAX_DEPTH} levels deep"
            if isinstance(v, dict) and not all(isinstance(k, str) for k in v):
                key = next(k for k in v if not isinstance(k, str))
                return f"entry {where[1:] or '(the whole value)'} has the key {key!r}, not a str"
            items = v.items() if isinstance(v, dict) else enumerate(v)
            stack.extend((c, depth + 1, f"{where}.{k}") for k, c in items)
    return None


def encode(tensors: dict[str, Tensor], metadata: str) -> bytearray:
    """The bytes of a checkpoint file: ``tensors`` (CPU, contiguous) and the metadata JSON text,
    sealed with the file's digest (see the module docstring)."""
    # the widest dtypes first, so every tensor starts at a multiple of its itemsize
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": {_DIGEST_KEY: _ZEROS.decode(), _META_KEY: metadata}}
    size = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(
                f"tensor {name!r} has dtype {t.dtype}; a checkpoint holds "
                f"{', '.join(str(d) for d in _DTYPE_NAMES)}"
            )
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
            "data_offsets": [size, size + n],
        }  # fmt: skip
        size += n
    text = json.dumps(header, separators=(",", ":")).encode()  # ASCII: the rest is escaped
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(
            f"checkpoint header of {len(text)} bytes exceeds the limit of {MAX_HEADER_BYTES} "
            "(config, extra and the optimizer's settings are too large)"
        )
    out = bytearray(8 + len(text) + size)
    out[:8] = struct.pack("<Q", len(text))
    out[8 : 8 + len(text)] = text
    data = np.frombuffer(out, dtype=np.uint8)
    pos = 8 + len(text)
    for name in names:
        raw = tensors[name].reshape(-1).view(torch.uint8).numpy()
        data[pos : pos + raw.size] = raw
        pos += raw.size
    at = 8 + len(_PREFIX)
    out[at : at + 64] = hashlib.sha256(out).hexdigest().encode()
    return out


class _Entry(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data region
    end: int


class _Layout(NamedTuple):
    head: bytes  # the length and the header as hashed (the digest's digits as zeros)
    digest: str
    metadata: str  # the JSON text of the equilibria metadata
    entries: list[_Entry]  # in the order of their offsets
    data_bytes: int


def _corrupted(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupted checkpoint: {why}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):  # json.loads would keep the last silently
        seen: set[str] = set()
        raise ValueError(f"duplicate key {next(k for k, _ in pairs if k in seen or seen.add(k))!r}")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str, path: Path, what: str) -> Any:
    """Strict JSON: no duplicate keys, NaN, infinities or nesting over :data:`MAX_DEPTH`."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:  # deeper than the interpreter's limit (about 1000 levels)
        problem: str | None = f"nests lists and objects more than {MAX_DEPTH} levels deep"
    except ValueError as e:  # JSONDecodeError, the hooks, an int of over 4300 digits
        problem = f"is not valid JSON ({str(e)[:200]})"
    else:
        problem = json_problem(value)  # deep but parsed, or 1e999 read as inf
        if problem is None:
            return value
    raise _corrupted(path, f"its {what} {problem}")


def _read_into(fh: IO[bytes], buf: Any, path: Path) -> None:
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        n = fh.readinto(view[done:])  # type: ignore[attr-defined]
        if not n:
            raise CheckpointError(f"{path}: truncated checkpoint (it shrank while it was read)")
        done += n


def _entry(name: str, info: Any, path: Path) -> _Entry:
    """One tensor's entry of the header, checked: allowed name and dtype, sizes that fit."""
    if not _TENSOR_NAME.fullmatch(name):
        raise _corrupted(
            path, f"unexpected tensor {name[:100]!r} (a checkpoint holds model/<name>, "
            "optim/<index>/<key>, rng/torch, rng/numpy and rng/cuda<i>)",
        )  # fmt: skip
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _corrupted(
            path, f"the entry of tensor {name!r} must be an object of dtype, shape and "
            f"data_offsets, got {str(info)[:100]}",
        )  # fmt: skip
    dtype = _DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise _corrupted(
            path, f"tensor {name!r} has dtype {str(info['dtype'])[:50]!r}, not one of "
            f"{', '.join(_DTYPES)}",
        )  # fmt: skip
    shape, offsets = info["shape"], info["data_offsets"]
    if not (
        isinstance(shape, list) and len(shape) <= MAX_DEPTH
        and all(type(d) is int and 0 <= d < 2**63 for d in shape)
    ):  # fmt: skip
        raise _corrupted(
            path, f"tensor {name!r} has shape {str(shape)[:100]}, not a list of at most "
            f"{MAX_DEPTH} sizes in [0, 2**63)",
        )  # fmt: skip
    if not (
        isinstance(offsets, list) and len(offsets) == 2
        and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]
    ):  # fmt: skip
        raise _corrupted(
            path, f"tensor {name!r} has data_offsets {str(offsets)[:100]}, not two integers "
            "0 <= begin <= end",
        )  # fmt: skip
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if nbytes != offsets[1] - offsets[0]:
        raise _corrupted(
            path, f"tensor {name!r} of shape {shape} and dtype {info['dtype']} takes {nbytes} "
            f"bytes, its data_offsets {offsets} span {offsets[1] - offsets[0]}",
        )  # fmt: skip
    return _Entry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _unsupported(metadata: str, path: Path) -> CheckpointError:
    """The error for a header that does not start with the digest: another format or writer."""
    try:
        version = json.loads(metadata).get("format")
    except (ValueError, AttributeError, RecursionError):
        version = None
    if not isinstance(version, str) or version == FORMAT:
        return CheckpointError(
            f"{path}: corrupted checkpoint or not written by equilibria (its header does not "
            f"start with the {_DIGEST_KEY!r} entry)"
        )
    why = ""
    if version == "equilibria.zoo.checkpoint/1":
        why = (
            " (its SHA-256 covers the tensors only, so its metadata - epoch, config, optimizer "
            "settings - cannot be verified; load it with the equilibria version that wrote it, "
            "or train again)"
        )
    return CheckpointError(
        f"{path}: unsupported checkpoint format {version[:100]!r}, expected {FORMAT!r}{why}"
    )


def _read_layout(fh: IO[bytes], size: int, path: Path) -> _Layout:
    """Read and check the length and the header, without reading any tensor data."""
    if size < 8:
        raise CheckpointError(f"{path}: truncated checkpoint ({size} bytes)")
    length = bytearray(8)
    _read_into(fh, length, path)
    (n,) = struct.unpack("<Q", length)
    if n > MAX_HEADER_BYTES:
        raise _corrupted(path, f"its header length {n} exceeds the limit of {MAX_HEADER_BYTES}")
    if n > size - 8:
        raise CheckpointError(
            f"{path}: truncated or corrupted checkpoint (header of {n} bytes, file has {size} "
            "bytes)"
        )
    raw = bytearray(n)
    _read_into(fh, raw, path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _corrupted(path, f"its header is not UTF-8 ({e})") from None
    header = parse_json(text, path, "header")
    if not isinstance(header, dict):
        raise _corrupted(path, f"its header is a {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not isinstance(meta.get(_META_KEY), str):
        raise CheckpointError(
            f"{path}: corrupted checkpoint or not written by equilibria (its header has no "
            f"{_META_KEY!r} metadata string)"
        )
    if not raw.startswith(_PREFIX):
        raise _unsupported(meta[_META_KEY], path)
    at = len(_PREFIX)
    digest = bytes(raw[at : at + 64])
    if not re.fullmatch(rb'[0-9a-f]{64}"', raw[at : at + 65]) or set(meta) != {
        _DIGEST_KEY, _META_KEY
    }:  # fmt: skip
        raise _corrupted(
            path, f"its metadata must be {_DIGEST_KEY!r} (64 lowercase hex digits) and "
            f"{_META_KEY!r}, got the keys {sorted(meta)}"[:300],
        )  # fmt: skip
    raw[at : at + 64] = _ZEROS
    # by (begin, end): an empty tensor at the offset where the next one starts comes first
    entries = sorted(
        (_entry(k, v, path) for k, v in header.items()), key=lambda e: (e.begin, e.end)
    )
    data_bytes, end = size - 8 - n, 0
    for e in entries:  # back to back from 0: no gap, no overlap, nothing past the file
        if e.begin != end:
            raise _corrupted(
                path, f"tensor {e.name!r} starts at data byte {e.begin}, expected {end} (tensors "
                "lie back to back, without gaps or overlaps)",
            )  # fmt: skip
        end = e.end
    if end != data_bytes:
        raise CheckpointError(
            f"{path}: truncated or corrupted checkpoint (its header places {end} bytes of tensor "
            f"data, the file has {data_bytes} after the header)"
        )
    return _Layout(bytes(length + raw), digest.decode(), meta[_META_KEY], entries, data_bytes)


def _read_data(fh: IO[bytes], layout: _Layout, path: Path, *, keep: bool) -> dict[str, Tensor]:
    """Hash the data after the header in chunks (``keep``: read it into tensors instead, hashing
    each), and raise a CheckpointError unless the file's digest matches."""
    h = hashlib.sha256(layout.head)
    fh.seek(len(layout.head))
    tensors: dict[str, Tensor] = {}
    if keep:
        for e in layout.entries:
            buf = torch.empty(e.end - e.begin, dtype=torch.uint8, device="cpu")
            _read_into(fh, buf.numpy(), path)
            h.update(buf.numpy())
            tensors[e.name] = buf.view(e.dtype).reshape(e.shape)
    else:
        chunk, left = bytearray(min(_CHUNK, layout.data_bytes)), layout.data_bytes
        while left:
            part = memoryview(chunk)[: min(left, len(chunk))]
            _read_into(fh, part, path)
            h.update(part)
            left -= len(part)
    if h.hexdigest() != layout.digest:
        raise _corrupted(
            path, "the file changed while it was read" if keep else "its SHA-256 does not "
            "match the one recorded when it was written",
        )  # fmt: skip
    for name, t in tensors.items():  # a bool byte other than 0 or 1 is undefined in torch
        if t.dtype == torch.bool and t.numel() and int(t.view(torch.uint8).max()) > 1:
            raise _corrupted(path, f"bool tensor {name!r} holds bytes other than 0 and 1")
    return tensors


def read(path: Path) -> tuple[dict[str, Tensor], str]:
    """The tensors and the metadata JSON text of a checkpoint file, verified (see the module
    docstring).

    Raises:
        CheckpointError: if the file is unreadable, truncated, corrupted or malformed; its message
            starts with the file's path.
    """
    try:
        with open(path, "rb") as fh:
            layout = _read_layout(fh, os.fstat(fh.fileno()).st_size, path)
            _read_data(fh, layout, path, keep=False)  # no tensor is built from a damaged file
            return _read_data(fh, layout, path, keep=True), layout.metadata
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e})") from None
