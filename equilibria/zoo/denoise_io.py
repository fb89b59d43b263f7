"""Image files in and out of ``equilibria denoise``: PNG, JPEG, TIFF and NPY, 8/16-bit or float.

:func:`read_image` returns a :class:`LoadedImage`: the intensities as float64 in [0, 1] (``(H, W)``
grey or ``(H, W, 3)`` colour), the alpha channel untouched (same dtype and values as in the file)
and the file's bit depth; :func:`write_image` writes one back, at the same bit depth unless asked
otherwise, alpha rescaled only when the depth changes (8 → 16 multiplies by 257, exactly), so
alpha passes through a denoise bit-exact.

=========  ===============================================  ========================================
format     reads                                            writes
=========  ===============================================  ========================================
``.png``   1–16-bit grey, grey+alpha, RGB, RGBA, palette    8 or 16 bits, grey/RGB ± alpha
``.jpg``   8-bit grey, RGB (CMYK converted to RGB)          8 bits, quality 95, 4:4:4 chroma
``.tif``   uint8, uint16, float32/64; (H, W) or (H, W, C)   the same
``.npy``   uint8, uint16, float32/64; (H, W) or (H, W, C)   the same (``allow_pickle=False``)
=========  ===============================================  ========================================

An 8-bit PNG's colour-key transparency (tRNS) is read as an alpha channel.
A JPEG's EXIF orientation is applied when it is read (the output holds the pixels as displayed);
colour profiles and other metadata are not copied to the output.
``C`` is 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA); an ``(H, W, 1)`` array is written back
as ``(H, W, 1)`` to TIFF and NPY. Float files (bit depth 32) hold intensities in [0, 1]; values
outside (noise) are read as they are and the written result is clipped to [0, 1]. Pillow (8-bit
PNG, JPEG) and tifffile do the work; 16-bit PNG, which Pillow reads only as grey, is encoded and
decoded here (the PNG 1.2 specification, RFC 2083: zlib stream, five row filters; interlaced
16-bit files are refused).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "FORMATS",
    "BitDepth",
    "ImageError",
    "LoadedImage",
    "depths_of",
    "format_of",
    "read_image",
    "write_image",
]

BitDepth = Literal[8, 16, 32]
"""8 or 16: unsigned integer samples; 32: float32 samples in [0, 1] (TIFF and NPY only)."""

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff",
           ".npy": "npy"}  # fmt: skip
"""File suffix (lower case) → format name."""

_DEPTHS: dict[str, tuple[int, ...]] = {"png": (8, 16), "jpeg": (8,), "tiff": (8, 16, 32),
                                       "npy": (8, 16, 32)}  # fmt: skip
_MAX = {8: 255.0, 16: 65535.0}
_DTYPES = {8: np.uint8, 16: np.uint16}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type → samples per pixel (no palette at 16 bits)


class ImageError(ValueError):
    """A file that cannot be read or written as an image; the message names the file."""


@dataclass(frozen=True)
class LoadedImage:
    """An image read by :func:`read_image`.

    Attributes:
        pixels: float64 intensities in [0, 1] (float files as stored), ``(H, W)`` or ``(H, W, 3)``.
        alpha: the alpha channel ``(H, W)`` exactly as stored (uint8, uint16 or float), or None.
        bit_depth: 8, 16 or 32 (float) bits per sample in the file.
        channel_axis: whether a grey image was stored as ``(H, W, 1)`` (written back so).
    """

    pixels: np.ndarray
    alpha: np.ndarray | None
    bit_depth: BitDepth
    channel_axis: bool = False

    @property
    def color(self) -> bool:
        """Whether the image is RGB (else grey)."""
        return self.pixels.ndim == 3


def format_of(path: str | Path) -> str:
    """The format name of ``path`` from its suffix; :class:`ImageError` for an unsupported one."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ImageError(
            f"{path}: unsupported extension {suffix or '(none)'!r}; allowed: {', '.join(FORMATS)}"
        )
    return FORMATS[suffix]


def depths_of(fmt: str) -> tuple[int, ...]:
    """The bit depths a format can store (``format_of``'s names)."""
    return _DEPTHS[fmt]


# ---------------------------------------------------------------------------------------- reading


def _from_array(path: Path, a: np.ndarray, channel_axis_ok: bool) -> LoadedImage:
    """Split a stored ``(H, W)`` / ``(H, W, C)`` array into intensities and alpha."""
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 2, 3, 4)):
        raise ImageError(
            f"{path}: not an image of shape (H, W) or (H, W, C) with C in 1–4, "
            f"got shape {tuple(a.shape)}"
        )
    if min(a.shape[:2]) < 8:
        raise ImageError(f"{path}: too small, {a.shape[0]} × {a.shape[1]} (at least 8 × 8)")
    if not a.dtype.isnative:  # e.g. a big-endian '>u2' NPY
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype == np.uint8:
        depth = 8
    elif a.dtype == np.uint16:
        depth = 16
    elif a.dtype in (np.float32, np.float64):
        depth = 32
        if not np.isfinite(a).all():
            raise ImageError(f"{path}: has non-finite values (nan or inf)")
    else:
        raise ImageError(f"{path}: unsupported sample type {a.dtype} (uint8, uint16, float32/64)")
    channel_axis = a.ndim == 3 and a.shape[2] == 1 and channel_axis_ok
    if a.ndim == 2 or a.shape[2] == 1:
        values, alpha = a.reshape(a.shape[:2]), None
    elif a.shape[2] == 2:
        values, alpha = a[..., 0], a[..., 1].copy()
    else:
        values, alpha = a[..., :3], (a[..., 3].copy() if a.shape[2] == 4 else None)
    pixels = values.astype(np.float64)
    if depth != 32:
        pixels /= _MAX[depth]
    return LoadedImage(pixels, alpha, depth, channel_axis)


def _png_header(data: bytes) -> tuple[int, int, int, int, int]:
    """(width, height, bit depth, colour type, interlace) from the IHDR chunk."""
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file (bad signature)")
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return width, height, depth, color_type, interlace


def _png_chunks(data: bytes):
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise ValueError("truncated PNG chunk")
        yield kind, body
        pos += 12 + length
        if kind == b"IEND":
            return
    raise ValueError("truncated PNG (no IEND chunk)")


def _unfilter_slow(kind: int, f: bytearray, prior: bytes, bpp: int) -> bytearray:
    """Average (3) and Paeth (4) rows: each byte depends on the reconstructed byte to its left."""
    out = bytearray(f)
    for i in range(len(out)):
        left = out[i - bpp] if i >= bpp else 0
        up = prior[i]
        if kind == 3:
            out[i] = (out[i] + ((left + up) >> 1)) & 0xFF
        else:
            up_left = prior[i - bpp] if i >= bpp else 0
            p = left + up - up_left
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
            pred = left if pa <= pb and pa <= pc else (up if pb <= pc else up_left)
            out[i] = (out[i] + pred) & 0xFF
    return out


def _read_png16(data: bytes) -> np.ndarray:
    width, height, _, color_type, interlace = _png_header(data)
    if color_type not in _PNG_CHANNELS:
        raise ValueError(f"16-bit PNG with colour type {color_type} is not valid")
    if interlace:
        raise ValueError("interlaced 16-bit PNG is not supported (save it without interlacing)")
    channels = _PNG_CHANNELS[color_type]
    raw = zlib.decompress(b"".join(body for kind, body in _png_chunks(data) if kind == b"IDAT"))
    bpp, stride = 2 * channels, 2 * channels * width
    if len(raw) < height * (stride + 1):
        raise ValueError("truncated PNG image data")
    rows = np.frombuffer(raw, np.uint8, height * (stride + 1)).reshape(height, stride + 1)
    out = np.empty((height, stride), np.uint8)
    prior = np.zeros(stride, np.uint8)
    for y in range(height):
        kind, f = int(rows[y, 0]), rows[y, 1:]
        if kind == 0:
            row = f
        elif kind == 1:  # Sub: a running sum along each byte lane, modulo 256
            row = (np.cumsum(f.reshape(width, bpp), axis=0, dtype=np.uint64) & 0xFF).astype(
                np.uint8
            )
            row = row.reshape(stride)
        elif kind == 2:  # Up
            row = f + prior  # uint8 wraps modulo 256
        elif kind in (3, 4):
            row = np.frombuffer(_unfilter_slow(kind, bytearray(f), prior.tobytes(), bpp), np.uint8)
        else:
            raise ValueError(f"bad PNG row filter {kind}")
        out[y] = row
        prior = out[y]
    return out.view(">u2").reshape(height, width, channels).astype(np.uint16)


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        opened.load()
        im = ImageOps.exif_transpose(opened)  # camera JPEGs: pixels as displayed, written so
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode == "PA":
            im = im.convert("RGBA")
        elif mode in ("L", "RGB") and "transparency" in im.info:  # a PNG colour key (tRNS)
            im = im.convert(mode[0] + "A" if mode == "L" else "RGBA")
        elif mode == "1":
            im = im.convert("L")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        elif mode not in ("L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I", "F"):
            raise ValueError(f"unsupported image mode {mode}")
        a = np.asarray(im)
    if a.dtype not in (np.uint8, np.uint16, np.float32):
        if a.dtype.kind in "iu" and a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"{mode} samples outside 0–65535")
        a = a.astype(np.uint16)
    return a


def read_image(path: str | Path) -> LoadedImage:
    """Read an image file (PNG, JPEG, TIFF or NPY) as float intensities in [0, 1] plus alpha.

    Args:
        path: the file; its suffix chooses the format (see :data:`FORMATS`).

    Returns:
        A :class:`LoadedImage`.

    Raises:
        ImageError: a missing or unreadable file, an unsupported extension, a shape other than
            (H, W) / (H, W, C ≤ 4), smaller than 8 × 8, or an unsupported sample type.
    """
    path = Path(path)
    fmt = format_of(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    try:
        if fmt == "npy":
            a = np.load(path, allow_pickle=False)
        elif fmt == "tiff":
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                a = series.asarray()
                if series.axes.endswith("SYX"):  # planar (separate) samples: channels last
                    a = np.moveaxis(a, -3, -1)
        else:
            with open(path, "rb") as fh:
                head = fh.read(29)
            if fmt == "png" and len(head) == 29 and _png_header(head)[2] == 16:
                a = _read_png16(path.read_bytes())
            else:
                a = _read_pillow(path)
    except ImageError:
        raise
    except Exception as e:  # every reader's own error types: one message naming the file
        raise ImageError(f"{path}: cannot read it as {fmt.upper()}: {e}") from e
    return _from_array(path, np.asarray(a), channel_axis_ok=fmt in ("npy", "tiff"))


# ---------------------------------------------------------------------------------------- writing


def _convert_alpha(alpha: np.ndarray, depth: int) -> np.ndarray:
    src = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(alpha.dtype, 32)
    if src == depth:
        return alpha
    if src == 8 and depth == 16:
        return alpha.astype(np.uint16) * np.uint16(257)  # exact: 255 → 65535
    if depth == 32:
        return (alpha.astype(np.float64) / _MAX[src]).astype(np.float32)
    scaled = alpha.astype(np.float64) * (_MAX[depth] / _MAX[src] if src != 32 else _MAX[depth])
    return np.round(np.clip(scaled, 0, _MAX[depth])).astype(_DTYPES[depth])


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _write_png16(path: Path, a: np.ndarray) -> None:
    a = a if a.ndim == 3 else a[..., None]
    height, width, channels = a.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = np.ascontiguousarray(a, dtype=">u2").view(np.uint8).reshape(height, -1)
    up = rows.copy()
    up[1:] -= rows[:-1]  # the Up filter (type 2), modulo 256
    filtered = np.concatenate([np.full((height, 1), 2, np.uint8), up], axis=1)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    data = _PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr)
    data += _png_chunk(b"IDAT", zlib.compress(filtered.tobytes(), 6)) + _png_chunk(b"IEND", b"")
    path.write_bytes(data)


def write_image(path: str | Path, image: LoadedImage, *, bit_depth: BitDepth | None = None) -> int:
    """Write ``image`` to ``path`` in the format its suffix names.

    Args:
        path: the output file (overwritten if it exists: the caller decides whether it may be).
        image: intensities in [0, 1] (clipped), alpha and the depth to keep.
        bit_depth: 8, 16 or 32 (float); None keeps ``image.bit_depth``.

    Returns:
        The bit depth written.

    Raises:
        ImageError: an unsupported extension, a depth the format cannot store (JPEG: 8; PNG: 8,
            16), alpha to JPEG, or a failed write.
    """
    path = Path(path)
    fmt = format_of(path)
    depth = image.bit_depth if bit_depth is None else bit_depth
    if depth not in _DEPTHS[fmt]:
        raise ImageError(
            f"{path}: {fmt.upper()} stores bit depths {', '.join(map(str, _DEPTHS[fmt]))}, not "
            f"{depth}; choose one with --bit-depth or another extension"
        )
    if fmt == "jpeg" and image.alpha is not None:
        raise ImageError(f"{path}: JPEG has no alpha channel; write .png, .tif or .npy")
    pixels = np.clip(image.pixels, 0.0, 1.0)
    if depth == 32:
        values = pixels.astype(np.float32)
    else:
        values = np.round(pixels * _MAX[depth]).astype(_DTYPES[depth])
    if image.alpha is not None:
        alpha = _convert_alpha(image.alpha, depth)
        parts = [values[..., None] if values.ndim == 2 else values, alpha[..., None]]
        a = np.concatenate(parts, axis=2)
    elif image.channel_axis and fmt in ("npy", "tiff"):
        a = values[..., None]
    else:
        a = values
    try:
        if fmt == "npy":
            with open(path, "wb") as fh:
                np.save(fh, a, allow_pickle=False)
        elif fmt == "tiff":
            import tifffile

            rgb = a.ndim == 3 and a.shape[2] >= 3
            extra = ["unassalpha"] if image.alpha is not None else None
            tifffile.imwrite(
                path, a, photometric="rgb" if rgb else "minisblack", extrasamples=extra
            )
        elif fmt == "png" and depth == 16:
            _write_png16(path, a)
        else:
            from PIL import Image

            im = Image.fromarray(a)  # uint8 (H, W) / (H, W, 2, 3, 4): L, LA, RGB, RGBA
            if fmt == "jpeg":
                im.save(path, format="JPEG", quality=95, subsampling=0)
            else:
                im.save(path, format="PNG")
    except OSError as e:
        raise ImageError(f"{path}: cannot write it: {e}") from e
    return depth
